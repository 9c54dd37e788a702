"""The four-panel success (or failure) figure and report of a decided early-persistence race.

    python scripts/generate_success_visualizations.py --plan experiments.yaml \
        --experiment early-persistence --run-dir results/early-persistence/contrastive

Run by the controller as the experiment's ``on_success`` hook when a race is decided; when the
race FAILED the controller passes the best worker's run directory instead, so success versus
failure is decided here from the state file (``ExperimentRecord.status``), never assumed.

Inputs (all files, see shared/DESIGN.md): the plan, ``<results_dir>/state.json``, every worker's
``metrics.jsonl`` and the winner's (or best worker's) per-clip records ``evals/epoch_NNNNNN.json``
written by workers/early_persistence.py. Outputs in ``<results_dir>/<experiment>/success_viz``:

- ``SUCCESS_VISUALIZATION.png`` (or ``FAILURE_VISUALIZATION.png``): 2x2 panels at 150 dpi under a
  banner; each panel also alone (``attention_ratio_progression.png``,
  ``before_after_comparison.png``, ``distribution_separation.png``, ``sample_level_grid.png``).
- ``SUCCESS_REPORT.md`` (or ``FAILURE_REPORT.md``): plan, criteria, winner and epoch, every metric
  with its 95% CI, the other workers' final metrics, race duration, compute saved (an estimate),
  relative links to the figures, the checkpoint and the eval records.

Statistics follow shared/ML_NOTES.md (Job A); the clip (video) is the unit everywhere:

- per-clip ratio r = mean attention received per persistent token / per transient token; clips
  without transients are excluded and counted; a clip passes when r > 1.3 (the consistency
  threshold), so the grid's pass rate is the ``consistency`` metric.
- attention shown as a_j x L (L = valid tokens of the clip): 1.0 is the uniform share 1/L, so
  clips with different token counts share one scale. Ratios and the paired test do not depend on
  it (the test uses per-clip log r, exactly as the worker logs ``separation_p``).
- separation: one-sided Wilcoxon signed-rank test of per-clip log r > 0
  (alternative="greater") and the paired effect size d_z = mean(log r) / sd(log r).
- CIs recomputed here are percentile bootstraps over clips (scipy.stats.bootstrap, 2000
  resamples, fixed seed): val_accuracy as a clip-cluster bootstrap of correct / objects,
  consistency as a Wilson interval (scipy.stats.binomtest), d_z over clips. The attention-ratio
  CI is the worker's own (same method). Bar CIs in panel 2 are Student-t intervals of clip means.

Layout: the inputs and ``load_outcome`` live in outcome.py, the statistics in stats.py and the
panels in figure.py (all in workers/persistence_report/); this module writes the report and
the files (``render_report``, ``write_outputs``) and re-exports the rest.
"""

from __future__ import annotations

import io
import math
import os
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from orchestrator.formatting import fmt
from orchestrator.reporting import atomic_write_bytes
from workers.persistence_report.figure import (
    DPI,
    EXCLUDED_COLOUR,
    FAIL_COLOUR,
    GRID_SAMPLES,
    PANEL_FILES,
    PASS_COLOUR,
    PERSISTENT_COLOUR,
    TRANSIENT_COLOUR,
    FigureSet,
    banner_text,
    build_figures,
    caution,
)
from workers.persistence_report.heldout import HeldOutScore, render_test_section
from workers.persistence_report.outcome import (
    ClipRecord,
    Evaluation,
    RaceOutcome,
    SuccessReportError,
    WorkerResult,
    eval_files,
    load_outcome,
    read_evaluation,
)
from workers.persistence_report.stats import (
    N_RESAMPLES,
    RATIO_PASS,
    ComputeRow,
    Separation,
    compute_savings,
    mean_t_ci,
    metric_cis,
    separation,
)

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "DPI",
    "EXCLUDED_COLOUR",
    "FAIL_COLOUR",
    "GRID_SAMPLES",
    "N_RESAMPLES",
    "PANEL_FILES",
    "PASS_COLOUR",
    "PERSISTENT_COLOUR",
    "RATIO_PASS",
    "TRANSIENT_COLOUR",
    "ClipRecord",
    "ComputeRow",
    "Evaluation",
    "FigureSet",
    "RaceOutcome",
    "Separation",
    "SuccessReportError",
    "WorkerResult",
    "banner_text",
    "build_figures",
    "caution",
    "checkpoint_for",
    "compute_savings",
    "eval_files",
    "load_outcome",
    "mean_t_ci",
    "metric_cis",
    "read_evaluation",
    "render_report",
    "separation",
    "write_outputs",
]


def _rel(path: Path, base: Path) -> str:
    return os.path.relpath(path, base).replace(os.sep, "/")


def _duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "unknown"
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h} h {m:02d} min {s:02d} s" if h else f"{m} min {s:02d} s" if m else f"{s} s"


def _utc(t: float | None) -> str:
    if t is None:
        return "unknown"
    return datetime.fromtimestamp(t, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _secs(x: float | None) -> str:
    return "—" if x is None else f"{x:,.0f}"


def _ci(ci: tuple[float, float] | None) -> str:
    return f"[{fmt(ci[0])}, {fmt(ci[1])}]" if ci is not None else "—"


def checkpoint_for(outcome: RaceOutcome) -> tuple[Path | None, str]:
    """The checkpoint of the winning (or best) epoch if kept, else the latest; and a note."""
    import json

    ckpts = outcome.run.checkpoints
    step = outcome.focus_metrics.get("step")
    for path in sorted(ckpts.glob("epoch_*.pt")) + [outcome.run.latest_checkpoint]:
        side = path.with_suffix(".json")
        if not path.exists() or not side.exists():
            continue
        try:
            info = json.loads(side.read_text())
        except (OSError, ValueError):
            continue
        if info.get("epoch") == outcome.epoch and (step is None or info.get("step") == step):
            return path, (f"weights of the evaluated model (epoch {outcome.epoch}, "
                          f"step {info.get('step')})")
    latest = outcome.run.latest_checkpoint
    if latest.exists():
        try:
            info = json.loads(outcome.run.latest_checkpoint_info.read_text())
        except (OSError, ValueError):
            info = {}
        return latest, (f"latest checkpoint (epoch {info.get('epoch')}, step {info.get('step')}); "
                        f"the one of the evaluated step {step} was not kept, so these weights are "
                        "not exactly the evaluated model")
    return None, "no checkpoint was written"


def _backbone(ev: Evaluation) -> str | None:
    """The worker's own description of its tokenizer/backbone (evals records), if it wrote one."""
    import json

    try:
        data = json.loads(ev.path.read_text())
    except (OSError, ValueError):
        return None
    return data.get("backbone") if isinstance(data, dict) else None


def render_report(outcome: RaceOutcome, files: dict[str, Path], *, now: float,
                  heldout: HeldOutScore | None = None, heldout_note: str | None = None) -> str:
    """SUCCESS_REPORT.md / FAILURE_REPORT.md text; a pure function of its inputs and ``now``.

    Args:
        files: "figure" and the PANEL_FILES keys -> paths of the written PNGs.
        now: Unix time printed as the generation time (injected so the text is reproducible).
        heldout: the winner scored once on test (heldout.py); None with ``heldout_note`` saying
            why not (no section at all when both are None).
    """
    o, exp, m = outcome, outcome.experiment, outcome.focus_metrics
    base = files["figure"].parent
    plan_name = _rel(o.plan.source, o.plan.repo) if o.plan.source else "?"
    lines: list[str] = []
    if o.succeeded:
        lines.append(
            f"# SUCCESS: {exp.name}: {o.focus.name} met every criterion at epoch {o.epoch}")
    else:
        lines.append(f"# FAILURE: {exp.name}: no worker met the criteria")
    lines += ["", f"Generated {_utc(now)} by scripts/generate_success_visualizations.py from the "
              f"plan `{plan_name}`, the state file and the workers' metrics and per-clip records.",
              "", f"![{o.kind.lower()} figure]({_rel(files['figure'], base)})", "",
              "> " + banner_text(o).replace("\n", "\n>\n> "), ""]
    if o.unsettled:
        lines += [f"Note: {', '.join(o.unsettled)} had not finished stopping when this was written;"
                  " "
                  "their compute numbers include the time up to then.", ""]
    lines += ["## Plan", "", f"- plan file: `{plan_name}`; experiment `{exp.name}`, "
              f"{len(exp.workers)} workers, max {exp.max_epochs} epochs, criteria checked at "
              f"epochs that are multiples of {exp.check_every}",
              f"- workers: {', '.join(f'`{w.name}` ({w.config.branch})' for w in o.workers)}", ""]
    who = "Winner" if o.succeeded else "Best worker"
    lines += [f"## Criteria ({'all met' if o.succeeded else 'missed: ' + '; '.join(o.missed)})", "",
              f"| criterion | {o.focus.name} at epoch {o.epoch} | pass |", "|---|---|---|"]
    for c in o.focus.criteria:
        vals = ", ".join(f"{n} = {fmt(m.get(n))}" for n in sorted(c.names))
        lines.append(f"| `{c.source}` | {vals} | {'yes' if c.evaluate(m) else 'NO'} |")
    ckpt, ckpt_note = checkpoint_for(o)
    lines += ["", f"## {who}: `{o.focus.name}` at epoch {o.epoch} of {o.focus.max_epochs}", "",
              f"- branch `{o.focus.config.branch}`; run directory `{_rel(o.run.run_dir, base)}`",
              "- checkpoint: " + (f"[{_rel(ckpt, base)}]({_rel(ckpt, base)}) ({ckpt_note})"
                                  if ckpt else ckpt_note),
              f"- per-clip records: [{_rel(o.decisive.path, base)}]({_rel(o.decisive.path, base)})"
              f" (epoch {o.decisive.epoch}); metrics: [{_rel(o.run.metrics, base)}]"
              f"({_rel(o.run.metrics, base)})"]
    if (backbone := _backbone(o.decisive)) is not None:
        lines.append(f"- tokenizer / backbone (from the worker's records): {backbone}")
    lines.append("")
    sep = separation(o.decisive)
    cis = metric_cis(o.decisive)
    lines += ["## Every metric of that evaluation (held-out val split)", "",
              "| metric | value | 95% CI | CI method |", "|---|---|---|---|"]
    skip = {"epoch", "step", "time_s", "attempt", "attention_ratio_ci_low",
            "attention_ratio_ci_high"}
    for key in sorted(k for k in m if k not in skip and not k.endswith(("_ci_low", "_ci_high"))):
        ci, how = None, ""
        if key in ("balanced_accuracy", "association") and m.get(f"{key}_ci_low") is not None:
            ci, how = (m[f"{key}_ci_low"], m[f"{key}_ci_high"]), \
                "worker's percentile bootstrap over clips"
        elif key == "attention_ratio" and m.get("attention_ratio_ci_low") is not None:
            ci, how = (m["attention_ratio_ci_low"], m["attention_ratio_ci_high"]), \
                "worker's percentile bootstrap over clips (log r)"
        elif key == "val_accuracy":
            ci, how = cis["val_accuracy"], "clip-cluster bootstrap of correct/objects"
        elif key == "consistency":
            ci, how = cis["consistency"], f"Wilson, {sep.n} clips"
        elif key == "effect_size_dz":
            ci, how = cis["effect_size_dz"], "bootstrap over clips"
        elif key == "separation_p":
            how = f"p-value (one-sided Wilcoxon signed-rank of log r, n = {sep.n} clips); no CI"
        lines.append(f"| {key} | {fmt(m[key])} | {_ci(ci)} | {how or '—'} |")
    lines += ["", f"Recomputed from the per-clip records: one-sided Wilcoxon p (log r > 0) = "
              f"{fmt(sep.p_value)} "
              f"(statistic {fmt(sep.statistic)}), d_z = {fmt(sep.d_z)}, geometric-mean ratio "
              f"{fmt(sep.geo_mean_ratio)}, {sep.n_excluded} clips excluded (no transients).", ""]
    if heldout is not None or heldout_note is not None:
        lines += render_test_section(m, heldout, heldout_note)
    metrics = list(dict.fromkeys(n for c in exp.criteria for n in sorted(c.names)))
    lines += ["## Other workers (their final evaluation)", "",
              "| worker | state | epochs | " + " | ".join(metrics) + " | stop reason |",
              "|---|---|---|" + "---|" * len(metrics) + "---|"]
    for w in o.workers:
        if w is o.focus:
            continue
        last = next((r for r in (w.last_with(n) for n in metrics) if r is not None), None) or {}
        state = w.record.state.value if w.record else "never started"
        reason = (w.record.stop_reason if w.record else None) or "—"
        lines.append(f"| {w.name} | {state} | {w.epochs_done}/{w.max_epochs} | "
                     + " | ".join(fmt(last.get(n)) for n in metrics) + f" | {reason} |")
    rows = compute_savings(o)
    started, decided = o.status.started_at, o.status.decided_at
    used = sum(r.busy_s for r in rows)
    full = sum(r.full_busy_s if r.full_busy_s is not None else r.busy_s for r in rows)
    saved, saved_cpu = sum(r.saved_busy_s for r in rows), sum(r.saved_cpu_s for r in rows)
    lines += ["", "## Race duration and compute", "",
              f"- started {_utc(started)}, decided {_utc(decided)}: "
              f"{_duration(decided - started if started and decided else None)}",
              f"- slot-seconds used (wall time holding a slot; GPU-seconds on GPU slots): "
              f"{_secs(used)} s; estimated to run every worker to max_epochs: {_secs(full)} s",
              f"- **estimated compute saved by stopping early: {_secs(saved)} slot-seconds"
              + (f" ({saved / full:.0%})" if full > 0 else "")
              + f", {_secs(saved_cpu)} CPU-seconds**",
              "", "| worker | state | epochs | slot-s used | slot-s to max_epochs (est.) "
              "| saved (est.) | CPU-s used | CPU-s saved (est.) | basis |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.worker} | {r.state} | {r.epochs_done}/{r.max_epochs} | "
                     f"{_secs(r.busy_s)} | "
                     f"{_secs(r.full_busy_s)} | {_secs(r.saved_busy_s)} | {_secs(r.cpu_s)} | "
                     f"{_secs(r.saved_cpu_s)} | {r.note} |")
    lines += ["", "These savings are an ESTIMATE: each stopped run's measured seconds per epoch so "
              "far (start-up and evaluations included) times the epochs it did not run; runs that "
              "ended on their own save nothing.", "", "## Files", ""]
    lines.append(f"- [the 2x2 figure]({_rel(files['figure'], base)})")
    for key, title in (("ratio", "1. attention ratio vs epoch"),
                       ("before_after", "2. before/after per object type"),
                       ("separation", "3. distribution separation"),
                       ("samples", "4. sample-level grid")):
        lines.append(f"- [{title}]({_rel(files[key], base)})")
    if ckpt is not None:
        lines.append(f"- [{who.lower()}'s checkpoint]({_rel(ckpt, base)})")
    return "\n".join(lines) + "\n"



def _save(fig: Figure, path: Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    atomic_write_bytes(path, buf.getvalue())
    return path


def write_outputs(outcome: RaceOutcome, out_dir: Path | None = None, *,
                  now: float | None = None, heldout: HeldOutScore | None = None,
                  heldout_note: str | None = None) -> dict[str, Path]:
    """Render the figures and the report into ``out_dir`` (default: the experiment's success_viz).

    Files of the other kind (FAILURE_* after a success, and vice versa) are removed so the
    dashboard never links a stale verdict.

    Returns:
        {"figure", "report", and the PANEL_FILES keys: path}.
    """
    out = Path(out_dir) if out_dir is not None else outcome.viz_dir
    out.mkdir(parents=True, exist_ok=True)
    figs = build_figures(outcome)
    files = {"figure": _save(figs.combined, out / f"{outcome.kind}_VISUALIZATION.png")}
    for key, fig in figs.panels.items():
        files[key] = _save(fig, out / PANEL_FILES[key])
    report = render_report(outcome, files, now=time.time() if now is None else now,
                           heldout=heldout, heldout_note=heldout_note)
    files["report"] = out / f"{outcome.kind}_REPORT.md"
    atomic_write_bytes(files["report"], report.encode())
    other = "FAILURE" if outcome.succeeded else "SUCCESS"
    for name in (f"{other}_VISUALIZATION.png", f"{other}_REPORT.md"):
        (out / name).unlink(missing_ok=True)
    return files
