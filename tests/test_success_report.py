# ruff: noqa: E501  (the golden report below keeps its long markdown lines)
"""The four-panel success/failure figure and report (workers/persistence_report/report.py).

The figure is built from run directories made by REAL tiny training runs of
workers/early_persistence.py (two workers, run once per module as subprocesses); the race's
state.json is written here with fixed times so the compute numbers are known. The golden report
uses a seeded synthetic race (numbers made by the worker's own metric code), so its text does not
depend on floating-point details of CPU training.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from orchestrator.core.criteria import Criterion
from orchestrator.core.state import (
    ExperimentRecord,
    ExperimentStatus,
    PlanState,
    RunRecord,
    RunState,
)
from orchestrator.reporting import Reporter
from orchestrator.sources.metrics import JsonlSource, MetricHistory
from synthvid.persistence import PersistenceConfig, generate_dataset
from workers.persistence_report.report import (
    GRID_SAMPLES,
    PANEL_FILES,
    build_figures,
    compute_savings,
    load_outcome,
    metric_cis,
    render_report,
    separation,
    write_outputs,
)

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "generate_success_visualizations.py"
STRICT = [
    "attention_ratio >= 1.5",
    "val_accuracy >= 0.75",
    "consistency >= 0.70",
    "separation_p < 0.01",
]
LENIENT = ["attention_ratio > 0.5", "val_accuracy >= 0", "consistency >= 0", "separation_p <= 1"]
T0 = 1_790_000_000.0  # race start (Unix s) in the written state files
TITLES = (
    "1. Attention ratio vs epoch",
    "2. Before/after",
    "3. Distribution separation",
    "4. Sample-level grid",
)


# -- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """Run dirs of two real tiny trainings: attention (4 epochs) and multitask (3 epochs).

    The worker's main() runs in this process (one torch import instead of two subprocesses;
    the worker's own tests cover it as a subprocess); its signal handlers and thread count
    are restored afterwards.
    """
    import signal

    import torch

    from workers import early_persistence

    root = tmp_path_factory.mktemp("trained")
    data = root / "data"
    generate_dataset(
        data, PersistenceConfig(num_samples=150, seed=2), progress=False
    )  # 23 val clips
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    threads = torch.get_num_threads()
    env = {k: os.environ.pop(k) for k in list(os.environ) if k.startswith("ORCH_")}
    try:
        for approach, name, epochs in (
            ("attention_supervised", "attention", 4),
            ("multitask", "multitask", 3),
        ):
            rc = early_persistence.main(
                [
                    "--approach",
                    approach,
                    "--data-dir",
                    str(data),
                    "--run-dir",
                    str(root / "runs" / name),
                    "--train-samples",
                    "24",
                    "--batch-size",
                    "8",
                    "--threads",
                    "1",
                    "--no-progress",
                    "--epochs",
                    str(epochs),
                    "--eval-every",
                    "1",
                ]
            )
            assert rc == 0
    finally:
        os.environ.update(env)
        torch.set_num_threads(threads)
        for sig, handler in saved.items():
            signal.signal(sig, handler)
    return root / "runs"


def write_race(root: Path, runs: Path, *, criteria: list[str], succeeded: bool) -> Path:
    """A plan + results dir + state.json over copies of ``runs``; returns the plan path.

    Success: 'attention' wins at epoch 4 (criteria checked every 4 epochs, as the controller
    would decide), 'multitask' was stopped at epoch 3 of 10. Failure: both ran to max_epochs.
    """
    results = root / "results"
    for name in ("attention", "multitask"):
        shutil.copytree(runs / name, results / "race" / name)
    plan = {
        "repo": ".",
        "results_dir": "results",
        "gpus": "none",
        "experiments": [
            {
                "name": "race",
                "criteria": criteria,
                "check_every": 4,
                "max_epochs": 10 if succeeded else 4,
                "on_success": "python scripts/generate_success_visualizations.py --plan {plan} "
                "--experiment {experiment} --run-dir {run_dir}",
                "workers": [
                    {"name": "attention", "branch": "race/attention", "command": "python -m x"},
                    {
                        "name": "multitask",
                        "branch": "race/multitask",
                        "command": "python -m y",
                        **({} if succeeded else {"max_epochs": 3}),
                    },
                ],
            }
        ],
    }
    path = root / "plan.yaml"
    path.write_text(yaml.safe_dump(plan, sort_keys=False))
    hist = MetricHistory()
    hist.add(JsonlSource(results / "race" / "attention" / "metrics.jsonl").read_new())
    win = next(
        (
            r
            for r in hist.records
            if r["epoch"] % 4 == 0 and all(Criterion.parse(c).evaluate(r) for c in criteria)
        ),
        None,
    )
    assert (win is not None) == succeeded, "fixture: the criteria do not give the intended outcome"
    state = PlanState(plan=str(path), started_at=T0)
    erec = ExperimentRecord("race", started_at=T0, decided_at=T0 + 125.0)
    a = RunRecord(
        "race",
        "attention",
        "race/attention",
        attempt=1,
        epoch=4,
        busy_s=100.0,
        cpu_s=80.0,
        max_epochs=10 if succeeded else 4,
    )
    m = RunRecord(
        "race",
        "multitask",
        "race/multitask",
        attempt=1,
        epoch=3,
        busy_s=90.0,
        cpu_s=60.0,
        max_epochs=10 if succeeded else 3,
    )
    if succeeded:
        erec.status, erec.winner, erec.winner_epoch = ExperimentStatus.succeeded, "attention", 4
        erec.winner_metrics = {k: v for k, v in win.items() if k != "time_s"}
        a.state, a.stop_reason = RunState.succeeded, "won"
        m.state, m.stop_reason = RunState.stopped, "lost to attention"
    else:
        erec.status = ExperimentStatus.failed
        a.state = m.state = RunState.exhausted
        a.stop_reason = m.stop_reason = "max_epochs"
    state.experiments["race"] = erec
    state.runs = {a.key: a, m.key: m}
    state.save(results / "state.json")
    return path


@pytest.fixture(scope="module")
def success_plan(trained, tmp_path_factory) -> Path:
    return write_race(
        tmp_path_factory.mktemp("win race"), trained, criteria=LENIENT, succeeded=True
    )


@pytest.fixture(scope="module")
def failure_plan(trained, tmp_path_factory) -> Path:
    return write_race(
        tmp_path_factory.mktemp("lost race"), trained, criteria=STRICT, succeeded=False
    )


def _texts(ax) -> str:
    return "\n".join(t.get_text() for t in ax.texts)


def _links(markdown: str) -> list[str]:
    return re.findall(r"\]\(([^)\s]+)\)", markdown)


# -- the figure, from real training runs -----------------------------------------------------


def test_success_figure_has_four_panels_built_from_the_records(success_plan):
    o = load_outcome(success_plan, "race")
    assert o.succeeded and o.focus.name == "attention" and o.epoch == 4
    assert (o.first.epoch, o.decisive.epoch) == (0, 4)  # the untrained model is the "before"
    n_clips = len(o.decisive.clips)
    assert n_clips == 23 > GRID_SAMPLES  # 20 shown, all counted
    figs = build_figures(o)
    title = figs.combined.get_suptitle()
    assert "SUCCESS: attention met all 4 criteria at epoch 4 (of max 10); race stopped early" in title
    m = o.focus_metrics  # tiny runs usually do not beat the majority class: the banner says so
    below = m["val_accuracy"] <= m["majority_accuracy"]
    assert ("does not beat the majority-class baseline" in title) == below
    axes = figs.combined.axes
    assert [ax.get_title()[: len(t)] for ax, t in zip(axes, TITLES, strict=True)] == list(TITLES)
    for key, ax in zip(PANEL_FILES, axes, strict=True):  # each panel alone draws the same thing
        assert figs.panels[key].axes[0].get_title() == ax.get_title()
    ratio, before_after, sep_ax, grid = axes
    # 1: one line per worker with its history, the threshold, the winning epoch starred
    lines = {ln.get_label(): ln for ln in ratio.get_lines()}
    for w in o.workers:
        xs, ys = w.history.series("attention_ratio")
        label = next(k for k in lines if k.startswith(w.name))
        assert list(lines[label].get_xdata()) == xs and list(lines[label].get_ydata()) == ys
    assert any(k.startswith("threshold: attention_ratio > 0.5") for k in lines)
    star = next(ln for k, ln in lines.items() if "won at epoch 4" in k)
    assert (
        list(star.get_xdata()) == [4] and star.get_ydata()[0] == o.focus_metrics["attention_ratio"]
    )
    # 2: four bars (persistent/transient x first/winning), heights = clip means of the records
    from matplotlib.container import BarContainer

    bars = [p for c in before_after.containers if isinstance(c, BarContainer) for p in c.patches]
    assert len(bars) == 4
    p1, t1 = o.first.normalised()
    p4, t4 = o.decisive.normalised()
    assert [b.get_height() for b in bars] == pytest.approx(
        [p1.mean(), t1.mean(), p4.mean(), t4.mean()]
    )
    # 3: one paired line per clip with transients; p and d_z written, equal to the logged ones
    pairs = next(c for c in sep_ax.collections if c.get_gid() == "paired-clips")
    sep = separation(o.decisive)
    assert len(pairs.get_segments()) == sep.n == len(o.decisive.paired)
    assert sep.p_value == pytest.approx(o.focus_metrics["separation_p"], rel=1e-9)
    assert sep.d_z == pytest.approx(o.focus_metrics["effect_size_dz"], rel=1e-9)
    text = _texts(sep_ax)
    assert "one-sided Wilcoxon signed-rank" in text and "d_z" in text and f"n = {sep.n} clips" in text
    # 4: 20 tiles; the pass rate counts every clip and equals the logged consistency
    tiles = [p for p in grid.patches if (p.get_gid() or "").startswith("sample:")]
    assert len(tiles) == GRID_SAMPLES
    ids = sorted(c.sample_id for c in o.decisive.clips)[:GRID_SAMPLES]
    assert [t.get_gid() for t in tiles] == [f"sample:{i}" for i in ids]
    n_pass = sum((c.ratio or 0) > 1.3 for c in o.decisive.paired)
    assert n_pass / sep.n == pytest.approx(o.focus_metrics["consistency"])
    assert f"all {n_clips} val clips: {n_pass}/{sep.n} pass" in _texts(grid)
    # recomputed accuracy from per-object records = the worker's val_accuracy; CI brackets it
    correct = sum(c.objects_correct for c in o.decisive.clips)
    total = sum(c.objects_total for c in o.decisive.clips)
    assert correct / total == pytest.approx(o.focus_metrics["val_accuracy"])
    lo, hi = metric_cis(o.decisive)["val_accuracy"]
    assert lo <= correct / total <= hi


def test_success_files_report_and_links_resolve(success_plan):
    o = load_outcome(success_plan, "race")
    files = write_outputs(o, now=T0 + 200)
    viz = o.viz_dir
    assert files["figure"] == viz / "SUCCESS_VISUALIZATION.png"
    from matplotlib.image import imread

    height, width = imread(files["figure"]).shape[:2]
    assert (width, height) == (14 * 150, 11 * 150)  # 2x2 figure at 150 dpi
    for key, name in PANEL_FILES.items():
        assert files[key] == viz / name and files[key].stat().st_size > 10_000
    report = files["report"].read_text()
    assert report.startswith("# SUCCESS: race: attention met every criterion at epoch 4")
    links = _links(report)
    assert (
        "SUCCESS_VISUALIZATION.png" in links and "../attention/checkpoints/epoch_000004.pt" in links
    )
    for link in links:
        assert (viz / link).is_file(), link
    assert "weights of the evaluated model (epoch 4" in report
    assert "0 min 00 s" not in report and "2 min 05 s" in report  # decided_at - started_at
    # compute: multitask stopped at 3 of 10 epochs after 90 s: 30 s/epoch -> 210 s saved (est.)
    rows = {r.worker: r for r in compute_savings(o)}
    assert rows["multitask"].full_busy_s == pytest.approx(300.0)
    assert rows["multitask"].saved_busy_s == pytest.approx(210.0)
    assert rows["attention"].saved_busy_s == pytest.approx(150.0)  # winner, 4 of 10 epochs
    assert "estimated compute saved by stopping early: 360 slot-seconds (65%)" in report
    assert "| multitask | stopped | 3/10 |" in report and "lost to attention" in report


def test_failure_path_names_missed_criteria(failure_plan):
    o = load_outcome(failure_plan, "race")
    assert not o.succeeded and o.missed
    figs = build_figures(o)
    title = figs.combined.get_suptitle()
    assert title.startswith("race: FAILURE: no worker met the criteria")
    for miss in o.missed:
        assert miss in title
    assert any("need >= 1.5" in m for m in o.missed)  # tiny runs never reach ratio 1.5
    report = render_report(o, _files(o), now=T0 + 200)  # files: see the hook test below
    assert report.startswith("# FAILURE: race: no worker met the criteria")
    assert f"## Best worker: `{o.focus.name}` at epoch {o.epoch} of {o.focus.max_epochs}" in report
    assert "| `attention_ratio >= 1.5` |" in report and "| NO |" in report
    assert all(r.saved_busy_s == 0 for r in compute_savings(o))  # both ran their course


def _script_main():
    import importlib.util

    spec = importlib.util.spec_from_file_location("generate_success_visualizations", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_script_as_the_hook_of_a_failed_race(failure_plan, tmp_path):
    """The controller hands a failed race's hook the best worker's run dir: still FAILURE."""
    run_dir = failure_plan.parent / "results" / "race" / "multitask"
    out = failure_plan.parent / "results" / "race" / "success_viz"  # the default --out
    out.mkdir(parents=True)
    (out / "SUCCESS_REPORT.md").write_text("stale verdict of an earlier run")
    proc = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--plan",
            str(failure_plan),
            "--experiment",
            "race",
            "--run-dir",
            str(run_dir),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("FAILURE: race, multitask at epoch")
    assert (out / "FAILURE_VISUALIZATION.png").is_file() and (out / "FAILURE_REPORT.md").is_file()
    assert not (out / "SUCCESS_REPORT.md").exists()  # the dashboard never links both verdicts
    report = (out / "FAILURE_REPORT.md").read_text()
    assert "## Best worker: `multitask`" in report
    for name in PANEL_FILES.values():
        assert f"]({name})" in report and (out / name).is_file()
    for link in _links(report):
        assert (out / link).is_file(), link
    # the dashboard (orchestrator/views/dashboard.py) links these exact file names as soon as they exist
    from orchestrator.core.config import load_plan
    from orchestrator.paths import ResultsPaths
    from orchestrator.remote.sync import NullSyncer
    from orchestrator.views.dashboard import Dashboard

    plan = load_plan(failure_plan)
    dashboard = Dashboard(plan, ResultsPaths(plan.results_dir), NullSyncer())
    try:
        linked = [item for item in dashboard._links()["race"] if item[0] != "Race report"]
    finally:
        dashboard.close()
    assert [label for label, _ in linked] == ["Failure figure", "Failure report"]
    for _, rel in linked:
        assert (plan.dashboard.parent / rel).resolve() in {
            (out / "FAILURE_VISUALIZATION.png").resolve(), (out / "FAILURE_REPORT.md").resolve()}
    proc = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--plan",
            str(tmp_path / "nope.yaml"),
            "--experiment",
            "race",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: plan file") and "not found" in proc.stderr.splitlines()[0]


def test_script_bad_input_is_one_error_line(success_plan, tmp_path, capsys):
    main = _script_main()
    winner_dir = success_plan.parent / "results" / "race" / "attention"
    cases = [
        (("--plan", str(success_plan), "--experiment", "nope"), "has no experiment 'nope'"),
        (
            ("--plan", str(success_plan), "--experiment", "race", "--worker", "multitask"),
            "won by 'attention', not 'multitask'",
        ),
        (
            ("--plan", str(success_plan), "--experiment", "race", "--worker", "ghost"),
            "no worker 'ghost'",
        ),
        (
            ("--plan", str(success_plan), "--experiment", "race", "--run-dir", str(tmp_path)),
            "is not a run directory of experiment 'race'",
        ),
        (
            (
                "--plan",
                str(success_plan),
                "--experiment",
                "race",
                "--run-dir",
                str(winner_dir),
                "--worker",
                "multitask",
            ),
            "disagrees with --run-dir",
        ),
    ]
    for args, message in cases:
        assert main(list(args)) == 2, args
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err.splitlines()[0], err
    with pytest.raises(SystemExit) as exc:
        main(["--plan", str(success_plan), "--experiment", "race", "--wait-s", "-1"])
    assert exc.value.code == 2 and "--wait-s must be >= 0" in capsys.readouterr().err


def test_undecided_race_and_missing_evals_are_clear_errors(success_plan, tmp_path):
    from workers.persistence_report.report import SuccessReportError

    root = tmp_path / "copy"
    shutil.copytree(success_plan.parent, root)
    state_path = root / "results" / "state.json"
    state = PlanState.load(state_path)
    state.experiments["race"].status = ExperimentStatus.running
    state.save(state_path)
    waited = []
    with pytest.raises(SuccessReportError, match="not decided yet"):
        load_outcome(root / "plan.yaml", "race", wait_s=0.01, sleep=waited.append)
    state.experiments["race"].status = ExperimentStatus.succeeded
    state.save(state_path)
    shutil.rmtree(root / "results" / "race" / "attention" / "evals")
    with pytest.raises(SuccessReportError, match="no per-clip eval records"):
        load_outcome(root / "plan.yaml", "race")


# -- golden report (seeded synthetic race, the worker's own metric code) ------------------------


def _synthetic_run(run_dir: Path, seed: int, epochs: list[int], lift: list[float]) -> None:
    """Metrics + per-clip records with the worker's schema; the persistent tokens receive
    ``lift`` times the transient share (lognormal noise per clip)."""
    from workers.persistence_metrics import summarize_attention

    rep = Reporter(run_dir, handle_signals=False)
    rng = np.random.default_rng(seed)
    for epoch, k in zip(epochs, lift, strict=True):
        samples, pers, trans = [], [], []
        for i in range(24):
            n_p, n_t = int(rng.integers(1, 3)), 0 if i % 11 == 0 else int(rng.integers(1, 4))
            r = k * float(np.exp(rng.normal(0, 0.3)))
            tok_p, tok_t = 16 * n_p, 2 * n_t
            t_share = 1.0 / (r * tok_p + tok_t)
            p_mean, t_mean = r * t_share, (t_share if n_t else None)
            objects = [
                {
                    "track": j,
                    "kind": "persistent",
                    "num_tokens": 16,
                    "attention": p_mean,
                    "prob_persistent": 0.8,
                    "correct": bool(rng.random() < 0.5 + 0.1 * k),
                }
                for j in range(n_p)
            ] + [
                {
                    "track": 10 + j,
                    "kind": "transient",
                    "num_tokens": 2,
                    "attention": t_share,
                    "prob_persistent": 0.3,
                    "correct": bool(rng.random() < 0.6),
                }
                for j in range(n_t)
            ]
            if t_mean is not None:
                pers.append(p_mean)
                trans.append(t_mean)
            samples.append(
                {
                    "sample_id": f"{8000 + i:05d}",
                    "objects": objects,
                    "persistent_attention": p_mean,
                    "transient_attention": t_mean,
                    "ratio": p_mean / t_mean if t_mean else None,
                    "object_accuracy": float(np.mean([o["correct"] for o in objects])),
                }
            )
        correct = sum(o["correct"] for s in samples for o in s["objects"])
        total = sum(len(s["objects"]) for s in samples)
        metrics = {
            "val_accuracy": correct / total,
            "train_loss": 1.0 / epoch,
            **summarize_attention(np.array(pers), np.array(trans), seed=epoch),
        }
        rep.write_eval(
            f"epoch_{epoch:06d}", {"epoch": epoch, "samples": samples, "summary": metrics}
        )
        rep.log(epoch=epoch, step=epoch * 10, **metrics)
    rep.save_checkpoint(lambda p: p.write_bytes(b"weights"), epoch=epochs[-1], step=epochs[-1] * 10)


def synthetic_race(tmp_path: Path, epochs: list[int], lift: list[float]) -> Path:
    """A seeded synthetic race: 3 workers; 'attention' wins at its last evaluation. Plan path."""
    results = tmp_path / "results"
    _synthetic_run(results / "race" / "attention", 1, epochs, lift)
    _synthetic_run(results / "race" / "multitask", 2, [5], [1.05])
    criteria = ["attention_ratio >= 1.5", "consistency >= 0.5", "separation_p < 0.01"]
    (tmp_path / "plan.yaml").write_text(
        yaml.safe_dump(
            {
                "repo": ".",
                "results_dir": "results",
                "gpus": "none",
                "experiments": [
                    {
                        "name": "race",
                        "criteria": criteria,
                        "check_every": 5,
                        "max_epochs": 20,
                        "workers": [
                            {"name": "attention", "branch": "race/attention", "command": "x"},
                            {"name": "multitask", "branch": "race/multitask", "command": "y"},
                            {"name": "contrastive", "branch": "race/contrastive", "command": "z"},
                        ],
                    }
                ],
            }
        )
    )
    hist = MetricHistory()
    hist.add(JsonlSource(results / "race" / "attention" / "metrics.jsonl").read_new())
    state = PlanState(plan="plan.yaml", started_at=T0)
    state.experiments["race"] = ExperimentRecord(
        "race", ExperimentStatus.succeeded, "attention", epochs[-1], hist.records[-1], T0, T0 + 3725.0
    )
    for rec in (
        RunRecord(
            "race",
            "attention",
            "race/attention",
            RunState.succeeded,
            1,
            busy_s=3600.0,
            cpu_s=3000.0,
            epoch=10,
            max_epochs=20,
            stop_reason="won",
        ),
        RunRecord(
            "race",
            "multitask",
            "race/multitask",
            RunState.stopped,
            1,
            busy_s=3000.0,
            cpu_s=2500.0,
            epoch=6,
            max_epochs=20,
            stop_reason="lost to attention",
        ),
        RunRecord("race", "contrastive", "race/contrastive", RunState.cancelled, 0, max_epochs=20),
    ):
        state.runs[rec.key] = rec
    state.save(results / "state.json")
    return tmp_path / "plan.yaml"


def _files(o) -> dict[str, Path]:
    return {
        "figure": o.viz_dir / "SUCCESS_VISUALIZATION.png",
        **{k: o.viz_dir / v for k, v in PANEL_FILES.items()},
    }


def render_golden(tmp_path: Path) -> str:
    """The report of the synthetic race won at epoch 10, with a fixed clock."""
    o = load_outcome(synthetic_race(tmp_path, [5, 10], [1.1, 2.2]), "race")
    files = {
        "figure": o.viz_dir / "SUCCESS_VISUALIZATION.png",
        **{k: o.viz_dir / v for k, v in PANEL_FILES.items()},
    }
    return render_report(o, files, now=T0 + 3800.0)


def test_golden_report(tmp_path):
    assert render_golden(tmp_path) == GOLDEN


def test_race_decided_by_the_first_evaluation_has_no_before(tmp_path):
    from matplotlib.container import BarContainer

    o = load_outcome(synthetic_race(tmp_path, [5], [2.2]), "race")
    assert o.first.epoch == o.decisive.epoch == 5
    ratio, before_after = build_figures(o).combined.axes[:2]
    bars = [c for c in before_after.containers if isinstance(c, BarContainer)]
    assert len(bars) == 2  # persistent + transient of the one evaluation, no fake "before"
    assert "no evaluation before epoch 5" in _texts(before_after)
    assert "contrastive (no evaluation)" in [ln.get_label() for ln in ratio.get_lines()]


def test_waits_for_the_losers_to_be_stopped(tmp_path):
    """The hook starts while the losers are still stopping: --wait-s waits for the state."""
    plan = synthetic_race(tmp_path, [5, 10], [1.1, 2.2])
    path = tmp_path / "results" / "state.json"
    settled = PlanState.load(path)
    unsettled = PlanState.load(path)
    unsettled.experiments["race"].status = ExperimentStatus.running
    unsettled.runs["race/multitask"].state = RunState.running
    unsettled.save(path)
    naps: list[float] = []

    def sleep(seconds: float) -> None:  # the controller settles the race while we wait
        naps.append(seconds)
        settled.save(path)

    o = load_outcome(plan, "race", wait_s=60, sleep=sleep)
    assert len(naps) == 1 and o.succeeded and not o.unsettled
    unsettled.experiments["race"].status = ExperimentStatus.succeeded
    unsettled.save(path)  # decided, one loser still stopping after the wait: noted, not fatal
    o = load_outcome(plan, "race", wait_s=0)
    assert o.unsettled == ["multitask"]
    assert "multitask had not finished stopping" in render_report(o, _files(o), now=T0)


GOLDEN = """\
# SUCCESS: race: attention met every criterion at epoch 10

Generated 2026-09-21 15:16:40 UTC by scripts/generate_success_visualizations.py from the plan `plan.yaml`, the state file and the workers' metrics and per-clip records.

![success figure](SUCCESS_VISUALIZATION.png)

> SUCCESS: attention met all 3 criteria at epoch 10 (of max 20); race stopped early
>
> attention ratio 2.33x [95% CI 2.11-2.6], val accuracy 0.667, consistency 1, separation p 4.77e-07

## Plan

- plan file: `plan.yaml`; experiment `race`, 3 workers, max 20 epochs, criteria checked at epochs that are multiples of 5
- workers: `attention` (race/attention), `multitask` (race/multitask), `contrastive` (race/contrastive)

## Criteria (all met)

| criterion | attention at epoch 10 | pass |
|---|---|---|
| `attention_ratio >= 1.5` | attention_ratio = 2.33 | yes |
| `consistency >= 0.5` | consistency = 1 | yes |
| `separation_p < 0.01` | separation_p = 4.77e-07 | yes |

## Winner: `attention` at epoch 10 of 20

- branch `race/attention`; run directory `../attention`
- checkpoint: [../attention/checkpoints/epoch_000010.pt](../attention/checkpoints/epoch_000010.pt) (weights of the evaluated model (epoch 10, step 100))
- per-clip records: [../attention/evals/epoch_000010.json](../attention/evals/epoch_000010.json) (epoch 10); metrics: [../attention/metrics.jsonl](../attention/metrics.jsonl)

## Every metric of that evaluation (held-out val split)

| metric | value | 95% CI | CI method |
|---|---|---|---|
| attention_ratio | 2.33 | [2.11, 2.6] | worker's percentile bootstrap over clips (log r) |
| consistency | 1 | [0.845, 1] | Wilson, 21 clips |
| effect_size_dz | 3.26 | [2.6, 4.95] | bootstrap over clips |
| frac_ratio_above_1 | 1 | — | — |
| n_ratio_samples | 21 | — | — |
| separation_p | 4.77e-07 | — | p-value (one-sided Wilcoxon signed-rank of log r, n = 21 clips); no CI |
| train_loss | 0.1 | — | — |
| val_accuracy | 0.667 | [0.524, 0.798] | clip-cluster bootstrap of correct/objects |

Recomputed from the per-clip records: one-sided Wilcoxon p (log r > 0) = 4.77e-07 (statistic 231.0), d_z = 3.26, geometric-mean ratio 2.33, 3 clips excluded (no transients).

## Other workers (their final evaluation)

| worker | state | epochs | attention_ratio | consistency | separation_p | stop reason |
|---|---|---|---|---|---|---|
| multitask | stopped | 6/20 | 1.03 | 0.333 | 0.367 | lost to attention |
| contrastive | cancelled | 0/20 | — | — | — | — |

## Race duration and compute

- started 2026-09-21 14:13:20 UTC, decided 2026-09-21 15:15:25 UTC: 1 h 02 min 05 s
- slot-seconds used (wall time holding a slot; GPU-seconds on GPU slots): 6,600 s; estimated to run every worker to max_epochs: 25,800 s
- **estimated compute saved by stopping early: 19,200 slot-seconds (74%), 16,000 CPU-seconds**

| worker | state | epochs | slot-s used | slot-s to max_epochs (est.) | saved (est.) | CPU-s used | CPU-s saved (est.) | basis |
|---|---|---|---|---|---|---|---|---|
| attention | succeeded | 10/20 | 3,600 | 7,200 | 3,600 | 3,000 | 3,000 | winner, stopped at its win; 10 of 20 epochs; 360.0 s/epoch measured |
| multitask | stopped | 6/20 | 3,000 | 10,000 | 7,000 | 2,500 | 5,833 | 6 of 20 epochs; 500.0 s/epoch measured |
| contrastive | cancelled | 0/20 | 0 | 8,600 | 8,600 | 0 | 7,167 | never trained: median s/epoch of the others |

These savings are an ESTIMATE: each stopped run's measured seconds per epoch so far (start-up and evaluations included) times the epochs it did not run; runs that ended on their own save nothing.

## Files

- [the 2x2 figure](SUCCESS_VISUALIZATION.png)
- [1. attention ratio vs epoch](attention_ratio_progression.png)
- [2. before/after per object type](before_after_comparison.png)
- [3. distribution separation](distribution_separation.png)
- [4. sample-level grid](sample_level_grid.png)
- [winner's checkpoint](../attention/checkpoints/epoch_000010.pt)
"""


def test_the_winner_is_scored_once_on_test_beside_val(success_plan, failure_plan, monkeypatch):
    import hashlib
    import json
    import shutil

    import workers.early_persistence as worker
    from orchestrator.paths import ResultsPaths
    from workers.persistence_report.heldout import HELDOUT_FILE, score_winner_on_test

    o = load_outcome(success_plan, "race")
    pin = ResultsPaths(o.plan.results_dir).winner_dir("race")
    shutil.rmtree(pin, ignore_errors=True)
    (o.viz_dir / HELDOUT_FILE).unlink(missing_ok=True)
    score = score_winner_on_test(o)  # no pin: the run's checkpoint of the winning epoch
    assert "NO PIN" in score.source and score.epoch == o.epoch == 4
    assert 0 <= score.metrics["balanced_accuracy"] <= 1 and score.n_clips >= 5
    cached = json.loads((o.viz_dir / HELDOUT_FILE).read_text())
    assert cached["sha256"] == score.sha256 and len(cached["samples"]) == score.n_clips

    def no_second_scoring(*args, **kwargs):
        raise AssertionError("test was scored twice for the same weights")

    monkeypatch.setattr(worker, "score_checkpoint", no_second_scoring)
    assert score_winner_on_test(o).metrics == score.metrics  # once: the cache answers
    # the controller's pin wins over the run's file; a pin that fails its sha256 is refused
    pin.mkdir(parents=True)
    shutil.copy(score.checkpoint, pin / "epoch_000004.pt")
    sha = hashlib.sha256((pin / "epoch_000004.pt").read_bytes()).hexdigest()
    info = {"checkpoint": "epoch_000004.pt", "sha256": sha, "matched_by": "sidecar"}
    (pin / "winner.json").write_text(json.dumps(info))
    monkeypatch.undo()
    (o.viz_dir / HELDOUT_FILE).unlink()
    pinned = score_winner_on_test(o)
    assert "pinned" in pinned.source and pinned.checkpoint == pin / "epoch_000004.pt"
    assert pinned.metrics == score.metrics  # the same weights give the same test score
    (pin / "winner.json").write_text(json.dumps({**info, "sha256": "0" * 64}))
    with pytest.raises(ValueError, match="sha256"):
        score_winner_on_test(o)
    shutil.rmtree(pin)
    text = render_report(o, _files(o), now=T0, heldout=score)
    assert "| metric | val (selected on) | test |" in text and "SELECTED on val" in text
    lost = load_outcome(failure_plan, "race")
    with pytest.raises(ValueError, match="no winner"):
        score_winner_on_test(lost)
    assert "was not scored: nothing won" in render_report(
        lost, _files(lost), now=T0, heldout_note="nothing won"
    )
