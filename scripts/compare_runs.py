"""Comparison table (markdown) and curves (PNG) of a plan's runs, mean +- sd over seeds.

    python scripts/compare_runs.py experiments/trajectory_compare.yaml
    python scripts/compare_runs.py experiments/trajectory_compare.yaml \
        --metrics val_macro_f1,val_accuracy,position_error_px,params --group-by '^(.*)-seed\\d+$'

A thin command line over orchestrator/views/report.py (also `python -m orchestrator report PLAN`).
"""

from __future__ import annotations

import argparse
import sys

from orchestrator.views.report import add_report_arguments, run_report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_report_arguments(parser)
    return run_report(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
