"""Four-panel success (or failure) figure and report of a decided early-persistence race.

    python scripts/generate_success_visualizations.py --plan experiments.yaml \
        --experiment early-persistence

As the experiment's on_success hook (the controller fills the placeholders; for a FAILED race it
passes the best worker's run directory, and this script says FAILURE on its own):

    on_success: python scripts/generate_success_visualizations.py --plan {plan}
        --experiment {experiment} --run-dir {run_dir} --wait-s 120

Writes <results_dir>/<experiment>/success_viz/{SUCCESS,FAILURE}_VISUALIZATION.png (2x2, 150 dpi),
each panel alone, and {SUCCESS,FAILURE}_REPORT.md. After a success it first scores the winner's
checkpoint (the controller's pin in <results_dir>/<experiment>/_winner/, else the run's own) ONCE on
the untouched test split (cached in success_viz/test_split.json) and the report shows test beside
val. See docs/success_figure.md and workers/persistence_report/.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--plan", required=True, help="the plan file (experiments.yaml)")
    p.add_argument("--experiment", required=True, help="the experiment (race) to draw")
    p.add_argument(
        "--run-dir",
        default=None,
        help="the winner's run directory (for a failed race: the worker to draw); "
        "default: the winner, or the best worker",
    )
    p.add_argument("--worker", default=None, help="the same worker by name (instead of --run-dir)")
    p.add_argument(
        "--out", default=None, help="output folder (default <results_dir>/<experiment>/success_viz)"
    )
    p.add_argument(
        "--data-dir",
        default=None,
        help="dataset for the winner's test-split score (default: the one in its checkpoint)",
    )
    p.add_argument(
        "--no-test", action="store_true", help="do not score the winner on the test split"
    )
    p.add_argument(
        "--wait-s",
        type=float,
        default=0.0,
        help="wait up to this many seconds for the race to be decided and the losers "
        "stopped (the hook starts while they are still stopping); default 0",
    )
    args = p.parse_args(argv)
    if args.wait_s < 0:
        p.error("--wait-s must be >= 0")

    from orchestrator.errors import ConfigError, OrchestratorError
    from workers.persistence_report.heldout import score_winner_on_test
    from workers.persistence_report.report import load_outcome, write_outputs

    try:
        outcome = load_outcome(
            args.plan, args.experiment, run_dir=args.run_dir, worker=args.worker, wait_s=args.wait_s
        )
        heldout, note = None, None
        if args.no_test:
            note = "--no-test was given"
        elif not outcome.succeeded:
            note = "no worker met the criteria, so nothing was selected to score on test"
        else:
            try:  # once: cached by the checkpoint's sha256 (workers/persistence_report/heldout.py)
                heldout = score_winner_on_test(outcome, args.data_dir)
            except ValueError as e:
                note = str(e)
        files = write_outputs(
            outcome, Path(args.out) if args.out else None, heldout=heldout, heldout_note=note
        )
    except OrchestratorError as e:
        print(f"error: {e}", file=sys.stderr)
        if isinstance(e, ConfigError):
            for problem in e.problems[1:]:
                print(f"  {problem}", file=sys.stderr)
        if e.hint:
            print(f"hint: {e.hint}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: cannot write the figures: {e}", file=sys.stderr)
        return 2
    print(
        f"{outcome.kind}: {outcome.experiment.name}, {outcome.focus.name} at epoch {outcome.epoch}"
    )
    for key in ("figure", "report"):
        print(f"{key}: {files[key]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
