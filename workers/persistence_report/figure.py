"""The four matplotlib panels of the success (or failure) figure, and its banner text.

Panels: 1. attention ratio vs epoch, 2. before/after per object type, 3. distribution separation,
4. sample-level grid; drawn together (2x2 under the banner) and each alone. Agg only: figures are
``matplotlib.figure.Figure`` objects, never pyplot.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from orchestrator.formatting import fmt
from workers.persistence_report.outcome import RaceOutcome
from workers.persistence_report.stats import RATIO_PASS, mean_t_ci, separation

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

GRID_SAMPLES = 20  # clips drawn in panel 4 (all clips are counted)
DPI = 150
PANEL_FILES = {
    "ratio": "attention_ratio_progression.png",
    "before_after": "before_after_comparison.png",
    "separation": "distribution_separation.png",
    "samples": "sample_level_grid.png",
}
PERSISTENT_COLOUR, TRANSIENT_COLOUR = "#1f77b4", "#ff7f0e"
PASS_COLOUR, FAIL_COLOUR, EXCLUDED_COLOUR = "#b7e4c7", "#f4b6b6", "#dddddd"


@dataclass
class FigureSet:
    """The combined 2x2 figure and each panel alone, keyed like PANEL_FILES."""

    combined: Figure
    panels: dict[str, Figure]


def caution(metrics: dict[str, Any]) -> str | None:
    """A warning when val_accuracy does not beat the majority-class baseline (ML_NOTES)."""
    acc, majority = metrics.get("val_accuracy"), metrics.get("majority_accuracy")
    if isinstance(acc, (int, float)) and isinstance(majority, (int, float)) and acc <= majority:
        return (f"caution: val accuracy {fmt(acc)} does not beat the majority-class baseline "
                f"{fmt(majority)}")
    return None


def banner_text(outcome: RaceOutcome) -> str:
    """Two or three lines: what was achieved (or which criteria the best worker missed)."""
    m = outcome.focus_metrics
    warn = caution(m)
    tail = f"\n{warn}" if warn and outcome.succeeded else ""
    if outcome.succeeded:
        crit = len(outcome.focus.criteria)
        ci = ""
        lo, hi = m.get("attention_ratio_ci_low"), m.get("attention_ratio_ci_high")
        if lo is not None and hi is not None:
            ci = f" [95% CI {fmt(lo)}-{fmt(hi)}]"
        return (f"SUCCESS: {outcome.focus.name} met all {crit} criteria at epoch {outcome.epoch} "
                f"(of max {outcome.focus.max_epochs})"
                + ("; race stopped early\n" if outcome.epoch < outcome.focus.max_epochs else "\n")
                + f"attention ratio {fmt(m.get('attention_ratio'))}x{ci}, val accuracy "
                f"{fmt(m.get('val_accuracy'))}, consistency {fmt(m.get('consistency'))}, "
                f"separation p {fmt(m.get('separation_p'))}{tail}")
    return (f"FAILURE: no worker met the criteria (max {outcome.experiment.max_epochs} epochs). "
            f"Best: {outcome.focus.name} at epoch {outcome.epoch}\n"
            f"missed: {'; '.join(outcome.missed) or 'none (see report)'}")


def _draw_ratio(ax: Axes, o: RaceOutcome) -> None:
    """Panel 1: attention ratio (geometric mean over val clips, 95% CI band) vs epoch."""
    crit = o.ratio_criterion()
    ys_all: list[float] = [1.0]
    for i, w in enumerate(o.workers):
        xs, ys = w.history.series("attention_ratio")
        if not xs:  # stopped before its first evaluation: named, not drawn
            ax.plot([], [], color=f"C{i % 10}", label=f"{w.name} (no evaluation)")
            continue
        focus = w is o.focus
        colour = f"C{i % 10}"
        ax.plot(xs, ys, marker="o", ms=4 if focus else 3, lw=2.4 if focus else 1.3, color=colour,
                label=w.name + ((" (winner)" if o.succeeded else " (best)") if focus else ""),
                zorder=3 if focus else 2)
        lo = dict(zip(*w.history.series("attention_ratio_ci_low"), strict=True))
        hi = dict(zip(*w.history.series("attention_ratio_ci_high"), strict=True))
        band = [x for x in xs if x in lo and x in hi]
        if band:
            ax.fill_between(band, [lo[x] for x in band], [hi[x] for x in band], color=colour,
                            alpha=0.15, lw=0)
            ys_all += [hi[x] for x in band] + [lo[x] for x in band]
        ys_all += ys
    ax.axhline(1.0, color="grey", ls=":", lw=1, label="uniform attention (r = 1)")
    if crit is not None and crit.threshold is not None and crit.threshold.value > 0:
        thr = crit.threshold
        ys_all.append(thr.value)
        ax.axhline(thr.value, color="black", ls="--", lw=1.2, label=f"threshold: {crit.source}")
    # log scale: ratios are multiplicative (a supervised ratio can reach 100s while others sit
    # at 1.0); limits from the positive values only
    from matplotlib.ticker import FuncFormatter

    positive = [v for v in ys_all if v > 0]
    y_lo, y_hi = min(positive) / 1.15, max(positive) * 1.15
    ax.set_yscale("log")
    ax.set_ylim(y_lo, y_hi)
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    ax.yaxis.set_major_formatter(plain)
    if y_hi / y_lo < 30:  # less than ~1.5 decades: label the minor ticks too
        ax.yaxis.set_minor_formatter(plain)
        ax.tick_params(axis="y", which="minor", labelsize=7)
    if crit is not None and crit.threshold is not None and crit.threshold.value > 0:
        thr = crit.threshold
        zone = (thr.value, y_hi) if thr.higher_is_better else (y_lo, thr.value)
        ax.axhspan(*zone, color="green", alpha=0.08, lw=0)
        up = thr.higher_is_better
        ax.text(0.01, 0.97 if up else 0.03, "success zone", transform=ax.transAxes,
                color="darkgreen", fontsize=8, va="top" if up else "bottom")
    y = o.focus_metrics.get("attention_ratio")
    if isinstance(y, (int, float)):
        marker = "*" if o.succeeded else "X"
        what = "won" if o.succeeded else "best"
        ax.axvline(o.epoch, color="darkgreen" if o.succeeded else "darkred", ls="-.", lw=1,
                   alpha=0.6)
        ax.plot([o.epoch], [y], marker=marker, ms=16 if o.succeeded else 11, color="gold" if
                o.succeeded else "darkred", mec="black", zorder=5, ls="none",
                label=f"{o.focus.name} {what} at epoch {o.epoch} (r = {fmt(y)})")
    last_x = max((x for w in o.workers for x in w.history.series("attention_ratio")[0]), default=0)
    ax.set_xlim(0, max(last_x, *(w.max_epochs for w in o.workers)) + 1)
    ax.set_xlabel("epoch")
    ax.set_ylabel("attention ratio r (geo. mean over clips, log scale)")
    ax.set_title("1. Attention ratio vs epoch, every worker (band: 95% CI)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6.5, loc="best")


def _draw_before_after(ax: Axes, o: RaceOutcome) -> None:
    """Panel 2: mean persistent vs transient attention (x uniform) at first and decisive eval.

    When the decisive evaluation is the first one there is no "before": one group is drawn and
    the panel says so (the dotted line, uniform attention, is the untrained-like reference).
    """
    which = "winning" if o.succeeded else "best"
    evals = [(f"{which} evaluation", o.decisive)]
    if o.first.epoch != o.decisive.epoch:
        evals.insert(0, ("first evaluation", o.first))
    rng = np.random.default_rng(0)
    width = 0.36
    top = 1.0
    for g, (_, ev) in enumerate(evals):
        p, t = ev.normalised()
        for k, (vals, colour, kind) in enumerate(((p, PERSISTENT_COLOUR, "persistent"),
                                                  (t, TRANSIENT_COLOUR, "transient"))):
            m, lo, hi = mean_t_ci(vals)
            x = g + (k - 0.5) * width
            ax.bar([x], [m], width * 0.9, color=colour, alpha=0.85, label=kind if g == 0 else None,
                   yerr=[[m - lo], [hi - m]], capsize=4, error_kw={"lw": 1.2})
            ax.scatter(x + rng.uniform(-0.1, 0.1, len(vals)), vals, s=6, color="black",
                       alpha=0.35, zorder=3, lw=0)
            top = max(top, hi, float(vals.max()) if len(vals) else 0.0)
    for g, (_, ev) in enumerate(evals):
        sep = separation(ev)
        ax.text(g, top * 1.02, f"geo-mean of clip ratios r = {fmt(sep.geo_mean_ratio)}x\n"
                f"n = {sep.n} clips", ha="center", va="bottom", fontsize=8)
    right = len(evals) - 0.4
    ax.axhline(1.0, color="grey", ls=":", lw=1)
    ax.text(right - 0.3, 1.0, " uniform", va="bottom", fontsize=7, color="grey")
    ax.set_xticks(range(len(evals)), [f"{label}\n(epoch {ev.epoch})" for label, ev in evals])
    if len(evals) == 1:
        ax.text(0.5, 0.75, f"no evaluation before epoch {o.decisive.epoch}:\nnothing to compare "
                "with (the worker's first\nevaluation decided the race)", transform=ax.transAxes,
                ha="center", va="center", fontsize=8, color="0.3")
    ax.set_xlim(-0.6, right)
    ax.set_ylim(0, top * 1.25)
    ax.set_ylabel("attention per token / uniform share\n(bar: mean over clips, 95% CI; dot: clip)")
    ax.set_title("2. Before/after: attention per object type", fontsize=10)
    ax.legend(fontsize=7, loc="upper left")
    ax.grid(alpha=0.3, axis="y")


def _draw_separation(ax: Axes, o: RaceOutcome) -> None:
    """Panel 3: per-clip persistent vs transient attention, paired lines, Wilcoxon p and d_z."""
    from matplotlib.collections import LineCollection

    ev = o.decisive
    p, t = ev.normalised()
    sep = separation(ev)
    if len(p) >= 2:
        parts = ax.violinplot([t, p], positions=[0, 1], widths=0.7, showmeans=False,
                              showmedians=True, showextrema=False)
        bodies: list[Any] = list(cast(Any, parts["bodies"]))
        for body, colour in zip(bodies, (TRANSIENT_COLOUR, PERSISTENT_COLOUR), strict=True):
            body.set_facecolor(colour)
            body.set_alpha(0.35)
        parts["cmedians"].set_color("black")
    segs = [((0.0, ti), (1.0, pi)) for pi, ti in zip(p, t, strict=True)]
    colours = ["#2a9d8f" if pi > ti else "#c0392b" for pi, ti in zip(p, t, strict=True)]
    lines = LineCollection(segs, colors=colours, lw=0.8, alpha=0.6, gid="paired-clips")
    ax.add_collection(lines)
    ax.scatter(np.zeros(len(t)), t, s=10, color=TRANSIENT_COLOUR, zorder=3)
    ax.scatter(np.ones(len(p)), p, s=10, color=PERSISTENT_COLOUR, zorder=3)
    ax.axhline(1.0, color="grey", ls=":", lw=1)
    ax.set_xticks([0, 1], ["transient objects", "persistent objects"])
    ax.set_xlim(-0.6, 1.6)
    lo = float(min(p.min(initial=1.0), t.min(initial=1.0)))
    hi = float(max(p.max(initial=1.0), t.max(initial=1.0)))
    span = max(hi - lo, 0.1)
    ax.set_ylim(max(0.0, lo - 0.1 * span), hi + 0.45 * span)  # room for the text box
    ax.set_ylabel("attention per token / uniform share (1 = uniform)")
    dz = "n/a" if sep.d_z is None else fmt(sep.d_z)
    if sep.d_z_ci is not None:
        dz += f" [95% CI {fmt(sep.d_z_ci[0])}, {fmt(sep.d_z_ci[1])}]"
    text = (f"one-sided Wilcoxon signed-rank of log r > 0, n = {sep.n} clips"
            + (f" ({sep.n_excluded} without transients excluded)" if sep.n_excluded else "")
            + f"\np = {fmt(sep.p_value)}   effect size d_z = {dz}"
            + f"\nclips with persistent > transient: {sep.frac_above_1:.0%} (green lines)"
            + "\nviolins: distribution over clips, black bar: median"
            if sep.n else
            "no clip has transient objects: no paired test")
    ax.text(0.5, 0.98, text, transform=ax.transAxes, ha="center", va="top", fontsize=7.5,
            bbox={"boxstyle": "round", "fc": "white", "ec": "0.6"})
    ax.set_title(f"3. Distribution separation at epoch {ev.epoch} (one line per clip)", fontsize=10)
    ax.grid(alpha=0.3, axis="y")


def _draw_samples(ax: Axes, o: RaceOutcome) -> None:
    """Panel 4: the first 20 val clips (by sample id) as tiles; the footer counts all clips."""
    from matplotlib.patches import Rectangle

    ev = o.decisive
    clips = sorted(ev.clips, key=lambda c: c.sample_id)
    shown = clips[:GRID_SAMPLES]
    cols = 5
    rows = max(1, math.ceil(len(shown) / cols))
    for i, c in enumerate(shown):
        x, y = i % cols, rows - 1 - i // cols
        r = c.ratio
        if r is None:
            colour, status = EXCLUDED_COLOUR, "no transient"
        else:
            colour, status = (PASS_COLOUR, "PASS") if r > RATIO_PASS else (FAIL_COLOUR, "FAIL")
        ax.add_patch(Rectangle((x + 0.04, y + 0.04), 0.92, 0.92, fc=colour, ec="0.5", lw=0.6,
                               gid=f"sample:{c.sample_id}"))
        ax.text(x + 0.5, y + 0.76, c.sample_id, ha="center", va="center", fontsize=6.5,
                weight="bold")
        ax.text(x + 0.5, y + 0.52, f"acc {c.accuracy:.0%}  r {'-' if r is None else fmt(r)}x",
                ha="center", va="center", fontsize=6.5)
        ax.text(x + 0.5, y + 0.26, status, ha="center", va="center", fontsize=7,
                color="darkgreen" if status == "PASS" else "darkred" if status == "FAIL" else "0.3")
    n_pair = len(ev.paired)
    n_pass = sum(1 for c in ev.paired if (c.ratio or 0) > RATIO_PASS)
    acc = sum(c.objects_correct for c in ev.clips) / max(1, sum(c.objects_total for c in ev.clips))
    sep = separation(ev)
    footer = f"all {len(ev.clips)} val clips: " + (
        f"{n_pass}/{n_pair} pass r > {RATIO_PASS} ({n_pass / n_pair:.0%})" if n_pair
        else "none has transients")
    footer += (f"; {len(ev.clips) - n_pair} excluded (no transient)\nobject accuracy {acc:.1%}, "
               f"geo-mean r {fmt(sep.geo_mean_ratio)}x; tiles: first {len(shown)} clips by id\n"
               f"acc: share of the clip's objects classified correctly; PASS: r > {RATIO_PASS}")
    ax.text(cols / 2, -0.12, footer, ha="center", va="top", fontsize=7.5)
    ax.set_xlim(0, cols)
    ax.set_ylim(-1.2, rows)
    ax.set_aspect("auto")
    ax.axis("off")
    ax.set_title(f"4. Sample-level grid at epoch {ev.epoch}: {len(shown)} of {len(ev.clips)} "
                 f"val clips shown", fontsize=10)


_DRAW = {"ratio": _draw_ratio, "before_after": _draw_before_after, "separation": _draw_separation,
         "samples": _draw_samples}


def build_figures(outcome: RaceOutcome) -> FigureSet:
    """The 2x2 figure under its banner, and each panel alone (matplotlib Figure objects, Agg)."""
    from matplotlib.figure import Figure

    colour = "#d8f3dc" if outcome.succeeded else "#ffd6d6"
    edge = "darkgreen" if outcome.succeeded else "darkred"
    head = f"{outcome.experiment.name}: " + banner_text(outcome)
    combined = Figure(figsize=(14, 11), layout="constrained")
    combined.suptitle(head, fontsize=11.5, weight="bold", color=edge,
                      bbox={"boxstyle": "round", "fc": colour, "ec": edge})
    axes = combined.subplots(2, 2).ravel()
    for ax, draw in zip(axes, _DRAW.values(), strict=True):
        draw(ax, outcome)
    panels = {}
    for key, draw in _DRAW.items():
        fig = Figure(figsize=(7, 5.5), layout="constrained")
        fig.suptitle(f"{outcome.experiment.name} / {outcome.focus.name}: {outcome.kind}",
                     fontsize=9, color=edge)
        draw(fig.subplots(), outcome)
        panels[key] = fig
    return FigureSet(combined, panels)
