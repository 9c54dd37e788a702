"""orchestrator/views/report.py and scripts/compare_runs.py: grouping over seeds, mean +- sd, best by
direction, the plot, error lines, and a table over a small real run of the trajectory worker."""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

from orchestrator.paths import ResultsPaths
from orchestrator.reporting import Reporter
from orchestrator.views.report import (
    DEFAULT_GROUP_BY,
    add_report_arguments,
    format_mean_sd,
    group_of,
    run_report,
)
from synthvid.persistence import PersistenceConfig, generate_dataset

REPO = Path(__file__).resolve().parents[1]


def _plan(tmp_path: Path, workers: list[str], criteria: list[str], name: str = "exp") -> Path:
    lines = (
        [
            "repo: .",
            "results_dir: results",
            "gpus: none",
            "experiments:",
            f"  - name: {name}",
            "    criteria:",
        ]
        + [f"      - {c}" for c in criteria]
        + ["    max_epochs: 10", "    workers:"]
    )
    for w in workers:
        lines += [f"      - name: {w}", f"        branch: b/{w}", "        command: python -c pass"]
    path = tmp_path / "plan.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def _log(tmp_path: Path, worker: str, records: list[dict], exp: str = "exp") -> None:
    run_dir = ResultsPaths(tmp_path / "results").run(exp, worker).run_dir
    rep = Reporter(run_dir, handle_signals=False)
    for r in records:
        rep.log(**r)


def _args(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_report_arguments(p)
    return p.parse_args(list(argv))


def test_group_names_strip_seed_suffix():
    pat = re.compile(DEFAULT_GROUP_BY)
    assert group_of("i3d-seed0", pat) == "i3d"
    assert group_of("conv-temporal_seed12", pat) == "conv-temporal"
    assert group_of("vivit", pat) == "vivit"
    assert group_of("x-run3", re.compile(r"^(.*)-run\d+$")) == "x"
    assert group_of("other", re.compile(r"^(.*)-run\d+$")) == "other"  # no match: own group
    assert format_mean_sd([0.5, 0.9]) == "0.700 +- 0.283"
    assert format_mean_sd([3.0]) == "3.000" and format_mean_sd([]) == "-"
    assert format_mean_sd([248362, 248362]) == "248,362 +- 0"
    assert format_mean_sd([1e-5, 3e-5]) == "2e-05 +- 1.41e-05"


def test_table_final_best_and_plot(tmp_path, capsys):
    plan = _plan(
        tmp_path,
        ["a-seed0", "a-seed1", "b-seed0", "b-seed1", "c-seed0"],
        ["acc >= 0.9", "err_px < 2"],
    )
    _log(
        tmp_path,
        "a-seed0",
        [{"epoch": 1, "acc": 0.5, "err_px": 4.0}, {"epoch": 2, "acc": 0.6, "err_px": 3.0}],
    )
    _log(
        tmp_path,
        "a-seed1",
        [{"epoch": 1, "acc": 0.8, "err_px": 2.0}, {"epoch": 2, "acc": 0.7, "err_px": 5.0}],
    )
    _log(tmp_path, "b-seed0", [{"epoch": 1, "acc": 0.9, "err_px": 1.0}])
    _log(tmp_path, "b-seed1", [{"epoch": 1, "acc": 1.0, "err_px": 1.5}])
    # c-seed0 never wrote metrics: left out of the table
    out_dir = tmp_path / "report"
    assert run_report(_args(str(plan), "--out-dir", str(out_dir))) == 0
    text = capsys.readouterr().out
    rows = {
        line.split(" | ")[0].strip("| "): line
        for line in text.splitlines()
        if line.startswith("| ")
    }
    assert "group" in rows and set(rows) == {"group", "a", "b"}
    # a: final acc mean(0.6, 0.7) sd 0.0707; final err mean(3, 5) sd 1.414;
    # best acc max -> (0.6, 0.8);
    # best err is a minimum (criterion 'err_px < 2') -> (3, 2)
    assert rows["a"] == (
        "| a | 2 | 2 | 0.650 +- 0.071 | 4.000 +- 1.414 | 0.700 +- 0.141 | 2.500 +- 0.707 |"
    )
    assert rows["b"].startswith("| b | 2 | 1 | 0.950 +- 0.071 | 1.250 +- 0.354 |")
    assert "(best, max)" in rows["group"] and "err_px (best, min)" in rows["group"]
    assert (out_dir / "report_exp.md").read_text().count("| a |") == 1
    assert (out_dir / "report_exp.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_report_subcommand_of_the_cli(tmp_path: Path) -> None:
    plan = _plan(tmp_path, ["a-seed0", "a-seed1"], ["acc >= 0.9"])
    _log(tmp_path, "a-seed0", [{"epoch": 1, "acc": 0.5}, {"epoch": 2, "acc": 0.6}])
    _log(tmp_path, "a-seed1", [{"epoch": 1, "acc": 0.8}])
    argv = [sys.executable, "-m", "orchestrator", "report", str(plan), "--out-dir", "out"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "src")])}
    done = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env=env)
    assert done.returncode == 0, done.stderr
    (row,) = [line for line in done.stdout.splitlines() if line.startswith("| a |")]
    assert row.startswith("| a | 2 |") and "| 0.700 +- 0.141 |" in row  # acc mean(0.6, 0.8)
    assert (tmp_path / "out" / "report_exp.md").read_text().count("| a |") == 1
    bad = subprocess.run([*argv[:4], "missing.yaml"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=120, env=env)
    assert bad.returncode == 2 and bad.stderr.startswith("error: plan file")
    assert "Traceback" not in bad.stderr


def test_errors_are_one_line(tmp_path, capsys):
    plan = _plan(tmp_path, ["a-seed0"], ["acc >= 0.9"])
    assert run_report(_args(str(plan), "--group-by", "(")) == 2
    assert capsys.readouterr().err.startswith("error: --group-by")
    assert run_report(_args(str(plan), "--experiment", "nope")) == 2
    assert "unknown experiment" in capsys.readouterr().err
    assert run_report(_args(str(plan))) == 2  # no metrics yet
    assert "error: no worker" in capsys.readouterr().err
    assert run_report(_args(str(tmp_path / "missing.yaml"))) == 2
    assert capsys.readouterr().err.startswith("error: plan file")


def test_table_over_a_small_real_run(tmp_path):
    data = tmp_path / "data"
    generate_dataset(
        data,
        PersistenceConfig(
            num_samples=60, seed=1, num_frames=12, max_persistent=1, max_transient=1, shard_size=60
        ),
        progress=False,
    )
    workers = ["i3d-seed0", "i3d-seed1", "slowfast-seed0", "slowfast-seed1"]
    plan = _plan(
        tmp_path,
        workers,
        ["val_macro_f1 >= 0.9", "position_error_px < baseline_position_error_px"],
        name="trajectory",
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORCH_")}
    env.update(PYTHONPATH=f"{REPO / 'src'}:{REPO}", OMP_NUM_THREADS="1")
    procs = []
    for w in workers:
        model, seed = w.split("-seed")
        run_dir = ResultsPaths(tmp_path / "results").run("trajectory", w).run_dir
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "workers.trajectory",
                    "--model",
                    model,
                    "--seed",
                    seed,
                    "--data-dir",
                    str(data),
                    "--epochs",
                    "2",
                    "--input-frames",
                    "8",
                    "--horizon",
                    "3",
                    "--image-size",
                    "16",
                    "--train-samples",
                    "16",
                    "--batch-size",
                    "8",
                    "--threads",
                    "1",
                    "--no-progress",
                    "--run-dir",
                    str(run_dir),
                ],
                cwd=REPO,
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
        if len(procs) == 2:  # two at a time on a small machine
            for p in procs:
                _, err = p.communicate(timeout=120)
                assert p.returncode == 0, err[-2000:]
            procs = []
    proc = subprocess.run(
        [
            sys.executable,
            "scripts/compare_runs.py",
            str(plan),
            "--metrics",
            "val_macro_f1,position_error_px,params",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ")]
    assert rows[0].startswith(
        "| group | runs | epochs | val_macro_f1 (final) | position_error_px (final)"
    )
    assert rows[1].startswith("| i3d | 2 | 2 |") and rows[2].startswith("| slowfast | 2 | 2 |")
    # parameters do not depend on the seed: an integer count with sd exactly 0
    assert re.fullmatch(r"\d{2,3},\d{3} \+- 0", rows[1].split(" | ")[5])
    assert (tmp_path / "results" / "trajectory" / "report_trajectory.png").exists()
