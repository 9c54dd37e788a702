"""Criteria-aware projections: when will a worker meet the criteria, if ever?

Pure functions of a worker's metric history (no clock but the ``now`` passed in, no state).

For each criterion of the simple form ``metric OP number`` (``Criterion.threshold``; OP one of
``< <= > >=``), the records that *hold* the metric (an "evaluation"; a record without it is
never filled in with an earlier value) are fitted with two models of progress, in a space
where larger is better (the metric negated for ``<``/``<=``; p-values, i.e. ``< v`` with
0 < v <= 0.05, as ``-log10 p``):

- **linear trend** over the last ``window`` evaluations: the Theil-Sen estimator (median of
  pairwise slopes; Theil 1950, Sen 1968), robust to single outliers, with Sen's rank-based
  confidence interval of the slope (normal approximation of Kendall's S; Hollander & Wolfe,
  *Nonparametric Statistical Methods*, 1999, sec. 9.4) and the level's standard error from the
  residuals' MAD. The band at x is the line through the window's median point with the lower
  and upper slope, widened by the level's error.
- **saturating exponential** ``y = a - b exp(-c x)`` (b, c > 0) over all evaluations (the
  ``exp``/``pow`` families of learning-curve extrapolation: Domhan, Springenberg & Hutter,
  IJCAI 2015; Swersky et al., Freeze-Thaw BO, 2014), fitted by variable projection: a grid of
  rates c and Huber-weighted least squares for (a, b) at each; its band is the linearized
  prediction band at the best c.

The centre projection is the saturating fit when it explains the last ``window`` evaluations
about as well as the line (the curve is bending over), else the line. The optimistic edge is
the largest upper band of the saturating fits at every rate the data allow (a profile-
likelihood interval of the rate) and, unless the curve bends over beyond reasonable doubt
(BIC evidence above 10), of the recent line: for a concave (diminishing returns) curve the
secant through its recent points lies above all its future. A worker whose optimistic edge
misses the threshold is hopeless unless its curve is about to steepen (a late bloomer, or a
learning-rate drop; see ``orchestrator.core.pruning`` for the margin and patience that guard
against it).

Check points are the multiples of ``check_every`` after the last record, up to the budget; a
projection names the first check point at which it passes (``threshold.passes``), or none.
Criteria of another form (``or``, arithmetic of metrics, ``==``) are "not projectable".
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from orchestrator.core.criteria import Criterion, Threshold
from orchestrator.formatting import duration

WINDOW = 10  # evaluations in the linear trend
MIN_EVALUATIONS = 2  # fewer: no projection (two give a line without a band: display only)
MAX_EVALUATIONS = 256  # the saturating fit sees at most the latest this many
Z_BAND = 1.645  # two-sided 90% band (normal quantile 0.95)
_RATES = np.geomspace(0.05, 40.0, 48)  # saturating rates per span of the evaluated x range
CHI2_99_1DF = 6.63  # profile-likelihood interval (99%) of the saturating rate
BIC_STRONG = 6.0  # evidence the saturating fit needs over a line (Kass & Raftery 1995)
BIC_VERY_STRONG = 10.0  # ... to drop the recent line from the optimistic edge
_MAX_SCAN = 512  # check points evaluated directly before bisecting
_P_MIN = 1e-300

MET = "met"
ON_COURSE = "on course"
NOT_ON_COURSE = "not on course"
NOT_PROJECTABLE = "not projectable"
TOO_FEW = "too few evaluations"


@dataclass(frozen=True)
class Band:
    """A fitted model in the larger-is-better space: centre, lower and upper edge at ``x``."""

    model: str  # "linear" or "saturating"
    x_ref: float
    level: float
    slope: float
    slope_lo: float
    slope_hi: float
    level_se: float
    # saturating only: y = a - b exp(-c (x - x0) / span), and the (a, b) covariance scaled
    a: float = 0.0
    b: float = 0.0
    c: float = 0.0
    x0: float = 0.0
    span: float = 1.0
    cov: tuple[float, float, float] = (0.0, 0.0, 0.0)  # var a, cov ab, var b

    def at(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(centre, lower, upper) at the points ``x`` (same unit as the records)."""
        x = np.asarray(x, dtype=float)
        if self.model == "linear":
            d = x - self.x_ref
            centre = self.level + self.slope * d
            lo = self.level + np.where(d >= 0, self.slope_lo, self.slope_hi) * d
            hi = self.level + np.where(d >= 0, self.slope_hi, self.slope_lo) * d
            return centre, lo - Z_BAND * self.level_se, hi + Z_BAND * self.level_se
        phi = np.exp(-self.c * (x - self.x0) / self.span)
        centre = self.a - self.b * phi
        var_a, cov_ab, var_b = self.cov
        var = np.maximum(var_a - 2 * phi * cov_ab + phi * phi * var_b, 0.0)
        half = Z_BAND * np.sqrt(var)
        return centre, centre - half, centre + half


@dataclass(frozen=True)
class CriterionProjection:
    """Where one criterion is headed.

    Attributes:
        criterion: the criterion's source text.
        metric: its metric, or None when not projectable.
        status: ``met`` (holds at the last evaluation), ``on course``, ``not on course``,
            ``not projectable`` or ``too few evaluations``.
        check_point: first check point (epoch or step) at which the centre projection passes.
        optimistic_check_point: first check point up to the horizon at which the optimistic
            edge passes (None: not even then).
        evaluations: records holding the metric.
        model: ``linear`` or ``saturating`` (the centre), None without a fit.
        at_budget: (centre, lower, upper) projected metric values at the budget, in metric
            units (lower/upper ordered as values, not as better/worse).
        curve: (x, centre, lower, upper) in metric units from the last evaluation to the
            crossing (or the budget), for plots.
    """

    criterion: str
    metric: str | None
    status: str
    check_point: int | None = None
    optimistic_check_point: int | None = None
    evaluations: int = 0
    model: str | None = None
    at_budget: tuple[float, float, float] | None = None
    curve: tuple[tuple[float, float, float, float], ...] = field(default=(), repr=False)
    threshold: Threshold | None = None

    def describe(self, unit: str = "epoch") -> str:
        """One line for events and reports, e.g. ``val_accuracy: saturating fit, 0.62
        [0.58, 0.66] at epoch 50 (need >= 0.75)``."""
        if self.threshold is None or self.at_budget is None:
            return f"{self.metric or self.criterion}: {self.status}"
        c, lo, hi = self.at_budget
        t = self.threshold
        where = (
            f"passes at {unit} {self.check_point}" if self.check_point is not None
            else "does not pass by the budget"
        )
        return (f"{t.metric}: {self.model} fit over {self.evaluations} evaluations {where}; "
                f"{_num(c)} [{_num(lo)}, {_num(hi)}] at the budget (need {t.op} {_num(t.value)})")


@dataclass(frozen=True)
class WorkerProjection:
    """When all of a worker's criteria hold, by projection.

    Attributes:
        status: ``on course``, ``not on course``, ``not projectable``, ``too few evaluations``
            or ``met``.
        check_point: latest of the projectable criteria's check points (on course only).
        eta_s: seconds from ``now`` to that check point at the measured pace (None: unknown).
        blocking: the metric (or criterion source) that is not on course / not projectable.
        criteria: one projection per criterion, in order.
        unit: ``epoch`` or ``step``.
    """

    status: str
    check_point: int | None
    eta_s: float | None
    blocking: str | None
    criteria: tuple[CriterionProjection, ...]
    unit: str = "epoch"
    due_at: float | None = None  # Unix seconds of the check point at the measured pace

    def at(self, now: float) -> WorkerProjection:
        """The same projection with ``eta_s`` measured from ``now`` (a cached projection)."""
        if self.due_at is None:
            return self
        return dataclasses.replace(self, eta_s=max(0.0, self.due_at - now))

    def text(self) -> str:
        """The dashboard cell: ``~14m (epoch 23)``, ``due (epoch 25)`` (the check point's time
        has passed without its record), ``all met (epoch 25)``, ``not on course: val_accuracy``,
        ``not projectable: `a or b```, ``too few evaluations``."""
        if self.status == MET and self.check_point is not None:
            return f"all met ({self.unit} {self.check_point:,})"
        if self.status in (ON_COURSE, MET):
            at = f"{self.unit} {self.check_point:,}" if self.check_point is not None else "now"
            eta = "" if self.eta_s is None else (
                f"~{duration(self.eta_s)} " if self.eta_s > 0 else "due "
            )
            extra = f"; {self.blocking} not projectable" if self.blocking else ""
            return f"{eta}({at}){extra}"
        if self.status in (NOT_ON_COURSE, NOT_PROJECTABLE):
            return f"{self.status}: {self.blocking}"
        return self.status


def _num(v: float) -> str:
    if not math.isfinite(v):
        return "—"
    return f"{v:.3g}" if v == 0 or 1e-3 <= abs(v) < 1e5 else f"{v:.2e}"


# -- the space the models live in ------------------------------------------------------------


def log_scale(threshold: Threshold, values: Sequence[float]) -> bool:
    """p-values and other small positive upper bounds (``< 0.01``) are fitted as -log10."""
    return (
        threshold.op in ("<", "<=") and 0 < threshold.value <= 0.05
        and all(v >= 0 for v in values)
    )


def _to_space(threshold: Threshold, y: np.ndarray, log: bool) -> np.ndarray:
    if log:
        return -np.log10(np.maximum(y, _P_MIN))
    return y if threshold.higher_is_better else -y


def _from_space(threshold: Threshold, s: np.ndarray, log: bool) -> np.ndarray:
    if log:
        return np.power(10.0, -np.minimum(s, 300.0))
    return s if threshold.higher_is_better else -s


# -- fits -------------------------------------------------------------------------------------


def fit_linear(x: np.ndarray, s: np.ndarray) -> Band:
    """Theil-Sen line with Sen's slope interval over the points (x, s); needs >= 2 points.

    Returns:
        A ``linear`` band through the median point. Source: Sen (1968), "Estimates of the
        regression coefficient based on Kendall's tau", JASA 63; interval: Hollander & Wolfe.
    """
    n = len(x)
    i, j = np.triu_indices(n, k=1)
    dx = x[j] - x[i]
    keep = dx != 0
    slopes = np.sort((s[j] - s[i])[keep] / dx[keep])
    if len(slopes) == 0:
        return Band("linear", float(np.median(x)), float(np.median(s)), 0.0, 0.0, 0.0, 0.0)
    slope = float(np.median(slopes))
    big_n = len(slopes)
    c_alpha = Z_BAND * math.sqrt(n * (n - 1) * (2 * n + 5) / 18.0)
    lo_i = max(0, math.floor((big_n - c_alpha) / 2))
    hi_i = min(big_n - 1, math.ceil((big_n + c_alpha) / 2))
    x_ref = float(np.median(x))
    level = float(np.median(s - slope * (x - x_ref)))
    resid = s - (level + slope * (x - x_ref))
    sigma = 1.4826 * float(np.median(np.abs(resid - np.median(resid))))
    return Band("linear", x_ref, level, slope, float(slopes[lo_i]), float(slopes[hi_i]),
                sigma / math.sqrt(n))


def fit_saturating(
    x: np.ndarray, s: np.ndarray
) -> tuple[Band, float, tuple[Band, ...]] | None:
    """Fit ``s = a - b exp(-c (x - x0) / span)`` with b, c > 0 by variable projection.

    For each rate on a fixed grid, (a, b) come from Huber-weighted least squares (two
    reweighting passes, k = 1.345 MAD); the rate with the least weighted squared error wins.
    The rates whose fit is not significantly worse form a profile-likelihood interval of the
    rate (n log(SSE_c / SSE_min) <= 6.63, chi-squared with 1 degree of freedom at 99%;
    Venzon & Moolgavkar 1988): their bands together carry the rate's uncertainty, which the
    band of the best rate alone (conditional on it) ignores.

    Returns:
        (band at the best rate, sigma of its residuals, bands of every rate in the interval),
        or None with fewer than 4 points or when no rate gives a rising curve (b > 0).
    """
    n = len(x)
    if n < 4:
        return None
    x0, span = float(x[0]), float(max(x[-1] - x[0], 1.0))
    u = (x - x0) / span
    phi = np.exp(-np.outer(_RATES, u))  # (R, n)
    w = np.ones_like(phi)
    for step in range(3):
        sw, swp, swpp = w.sum(1), (w * phi).sum(1), (w * phi * phi).sum(1)
        sws, swps = (w * s).sum(1), (w * phi * s).sum(1)
        det = sw * swpp - swp * swp
        ok = np.abs(det) > 1e-12
        det = np.where(ok, det, 1.0)
        # normal equations of s = a + beta * phi (beta = -b)
        a = (swpp * sws - swp * swps) / det
        beta = (sw * swps - swp * sws) / det
        resid = s[None, :] - (a[:, None] + beta[:, None] * phi)
        if step == 2:
            break
        scale = 1.4826 * np.median(np.abs(resid), axis=1, keepdims=True) + 1e-12
        k = 1.345 * scale
        w = np.where(np.abs(resid) <= k, 1.0, k / np.maximum(np.abs(resid), 1e-300))
    sse = (w * resid * resid).sum(1)
    valid = ok & (beta < 0)
    if not valid.any():
        return None
    r = int(np.argmin(np.where(valid, sse, np.inf)))
    dof = max(n - 3, 1)

    def band(i: int) -> Band:
        sigma2 = float(sse[i]) / dof
        inv = np.linalg.pinv(np.array([[sw[i], swp[i]], [swp[i], swpp[i]]]))
        cov = (sigma2 * inv[0, 0], -sigma2 * inv[0, 1], sigma2 * inv[1, 1])  # (a, b = -beta)
        return Band("saturating", float(np.median(x)), 0.0, 0.0, 0.0, 0.0, 0.0,
                    a=float(a[i]), b=float(-beta[i]), c=float(_RATES[i]), x0=x0, span=span,
                    cov=cov)

    floor = n * (1e-9 * (float(np.ptp(s)) or 1.0)) ** 2
    ratio = n * np.log((np.where(valid, sse, np.inf) + floor) / (float(sse[r]) + floor))
    profile = tuple(band(int(i)) for i in np.flatnonzero(valid & (ratio <= CHI2_99_1DF)))
    return band(r), math.sqrt(float(sse[r]) / dof), profile


def _rms(band: Band, x: np.ndarray, s: np.ndarray) -> float:
    return float(np.sqrt(np.mean((band.at(x)[0] - s) ** 2)))


def _bends(x: np.ndarray, s: np.ndarray, sat: Band, lin: Band, window: int) -> float:
    """How strongly the saturating fit is the better description: the BIC of a least-squares
    line over all evaluations less the saturating fit's (Schwarz 1978; 3 parameters against
    2; above 6 is "strong" evidence and above 10 "very strong" in Kass & Raftery 1995), or
    -inf when the saturating fit explains the last ``window`` evaluations clearly worse than
    their own trend (a curve that has turned steep, which no saturating curve fits)."""
    n = len(x)
    scale = float(np.ptp(s)) or 1.0
    floor = (1e-9 * scale) ** 2
    coef = np.polyfit(x, s, 1)
    sse_line = float(np.sum((np.polyval(coef, x) - s) ** 2)) + n * floor
    sse_sat = float(np.sum((sat.at(x)[0] - s) ** 2)) + n * floor
    bic_line = n * math.log(sse_line / n) + 2 * math.log(n)
    bic_sat = n * math.log(sse_sat / n) + 3 * math.log(n)
    wx, ws = x[-window:], s[-window:]
    recent_ok = _rms(sat, wx, ws) <= 1.25 * _rms(lin, wx, ws) + 1e-6 * scale
    return bic_line - bic_sat if recent_ok else -math.inf


# -- check points ----------------------------------------------------------------------------


def _first_passing(
    passes: Any, after: int, horizon: int, every: int
) -> int | None:
    """First multiple of ``every`` in (after, horizon] where ``passes(xs)`` holds (vectorized;
    a scan of at most _MAX_SCAN points, then bisection, assuming passing persists)."""
    first = (after // every + 1) * every
    if first > horizon:
        return None
    count = (horizon - first) // every + 1
    if count <= _MAX_SCAN:
        xs = first + every * np.arange(count)
        ok = np.asarray(passes(xs.astype(float)))
        hit = np.flatnonzero(ok)
        return int(xs[hit[0]]) if len(hit) else None
    idx = np.unique(np.linspace(0, count - 1, _MAX_SCAN).astype(np.int64))
    ok = np.asarray(passes((first + every * idx).astype(float)))
    hit = np.flatnonzero(ok)
    if not len(hit):
        return None
    hi = int(idx[hit[0]])
    lo = int(idx[hit[0] - 1]) if hit[0] > 0 else -1
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if bool(np.asarray(passes(np.array([first + every * mid], dtype=float)))[0]):
            hi = mid
        else:
            lo = mid
    return first + every * hi


def evaluations(records: Sequence[Mapping[str, Any]], metric: str,
                unit: str) -> tuple[np.ndarray, np.ndarray]:
    """(x, values) of the records that hold ``metric`` as a finite number and carry ``unit``."""
    xs, ys = [], []
    for r in records:
        v, x = r.get(metric), r.get(unit)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            continue
        if isinstance(x, bool) or not isinstance(x, int):
            continue
        xs.append(float(x))
        ys.append(float(v))
    return np.array(xs), np.array(ys)


def project_criterion(
    criterion: Criterion,
    records: Sequence[Mapping[str, Any]],
    *,
    unit: str = "epoch",
    check_every: int = 1,
    budget: int,
    horizon: int | None = None,
    x_now: int | None = None,
    window: int = WINDOW,
) -> CriterionProjection:
    """Project one criterion to the check points up to ``horizon``.

    Args:
        criterion: the criterion; only ``metric OP number`` with OP in < <= > >= projects.
        records: the worker's merged records, oldest first.
        unit: ``epoch`` or ``step``: the x of the records and of the budget.
        check_every: criteria are checked at multiples of this.
        budget: max_epochs (or max_steps) of the worker.
        horizon: the last check point the optimistic edge may pass at (default: the budget).
        x_now: progress reached (default: the last record's x).
        window: evaluations in the linear trend.

    Returns:
        The projection; never raises on odd data (too few or constant values project
        sensibly or say so).
    """
    t = criterion.threshold
    if t is None or t.op not in ("<", "<=", ">", ">="):
        return CriterionProjection(criterion.source, None, NOT_PROJECTABLE)
    x, y = evaluations(records, t.metric, unit)
    x, y = x[-MAX_EVALUATIONS:], y[-MAX_EVALUATIONS:]
    n = len(x)
    if n < MIN_EVALUATIONS:
        return CriterionProjection(criterion.source, t.metric, TOO_FEW, evaluations=n,
                                   threshold=t)
    horizon = max(budget, horizon or budget)
    last_x = int(x[-1]) if x_now is None else max(int(x_now), int(x[-1]))
    log = log_scale(t, y.tolist())
    s = _to_space(t, y, log)
    target = float(_to_space(t, np.array([t.value]), log)[0])
    strict = t.op in ("<", ">")
    lin = fit_linear(x[-window:], s[-window:])
    sat = fit_saturating(x, s)
    centre = lin
    evidence = _bends(x, s, sat[0], lin, window) if sat is not None else -math.inf
    if sat is not None and evidence > BIC_STRONG:
        centre = sat[0]
    # The optimistic edge: the upper bands of every rate in the saturating fit's interval, and
    # of the recent line too unless the curve is bending over beyond reasonable doubt.
    bands = list(sat[2]) if sat is not None else []
    if evidence <= BIC_VERY_STRONG or not bands:
        bands.append(lin)

    def passes_centre(xs: np.ndarray) -> np.ndarray:
        c = centre.at(xs)[0]
        return c > target if strict else c >= target

    def passes_optimistic(xs: np.ndarray) -> np.ndarray:
        hi = np.max([b.at(xs)[2] for b in bands], axis=0)
        return hi > target if strict else hi >= target

    met = bool(t.passes(float(y[-1])))
    every = max(1, check_every)
    if met:
        cp: int | None = (last_x // every) * every
        cp = cp if cp == last_x else (last_x // every + 1) * every
        opt: int | None = cp
    else:
        cp = _first_passing(passes_centre, last_x, budget, every)
        opt = _first_passing(passes_optimistic, last_x, horizon, every)
    xb = np.array([float(budget)])
    cb, lb, hb = (float(v[0]) for v in centre.at(xb))
    hb = max(hb, *(float(b.at(xb)[2][0]) for b in bands))
    vals = sorted(float(_from_space(t, np.array([v]), log)[0]) for v in (lb, hb))
    at_budget = (float(_from_space(t, np.array([cb]), log)[0]), vals[0], vals[1])
    end = cp if cp is not None else budget
    grid = np.linspace(float(x[-1]), float(max(end, x[-1])), 24)
    gc, glo, _ = centre.at(grid)
    ghi = np.max([b.at(grid)[2] for b in bands], axis=0)
    curve = tuple(
        (float(gx), *sorted_triplet(t, log, float(c), float(lo), float(hi)))
        for gx, c, lo, hi in zip(grid, gc, glo, ghi, strict=True)
    )
    status = MET if met else (ON_COURSE if cp is not None else NOT_ON_COURSE)
    return CriterionProjection(
        criterion.source, t.metric, status, check_point=cp, optimistic_check_point=opt,
        evaluations=n, model=centre.model, at_budget=at_budget, curve=curve, threshold=t,
    )


def sorted_triplet(t: Threshold, log: bool, c: float, lo: float,
                   hi: float) -> tuple[float, float, float]:
    """(centre, lower, upper) of the larger-is-better space back in metric units, lower <=
    upper as numbers."""
    cc, a, b = (float(_from_space(t, np.array([v]), log)[0]) for v in (c, lo, hi))
    return cc, min(a, b), max(a, b)


def seconds_per_unit(records: Sequence[Mapping[str, Any]], unit: str,
                     window: int = 2 * WINDOW) -> float | None:
    """Median wall seconds per epoch (or step) between consecutive records with ``time_s``
    over the last ``window`` records; None when fewer than two such records."""
    pts = [(r[unit], r["time_s"]) for r in records
           if isinstance(r.get(unit), int) and isinstance(r.get("time_s"), (int, float))]
    pts = pts[-(window + 1):]
    rates = [(t1 - t0) / (x1 - x0)
             for (x0, t0), (x1, t1) in zip(pts, pts[1:], strict=False) if x1 > x0]
    return float(np.median(rates)) if rates else None


def project_worker(
    criteria: Sequence[Criterion],
    records: Sequence[Mapping[str, Any]],
    *,
    unit: str = "epoch",
    check_every: int = 1,
    budget: int,
    now: float | None = None,
    horizon: int | None = None,
    window: int = WINDOW,
) -> WorkerProjection:
    """Project every criterion; the worker is on course when all projectable ones are, at the
    latest of their check points.

    Args:
        criteria: the worker's criteria.
        records: its merged metric records, oldest first (``time_s`` used for the ETA).
        unit, check_every, budget, horizon, window: see ``project_criterion``.
        now: Unix seconds for the ETA (None: no ETA).

    Returns:
        The worker's projection. ``eta_s`` = (check point - last x) x median seconds per unit,
        less the time since the last record (never negative).
    """
    xs = [r[unit] for r in records if isinstance(r.get(unit), int)]
    x_now = max(xs) if xs else None
    parts = tuple(
        project_criterion(c, records, unit=unit, check_every=check_every, budget=budget,
                          horizon=horizon, x_now=x_now, window=window)
        for c in criteria
    )
    off = next((p for p in parts if p.status == NOT_ON_COURSE), None)
    if off is not None:
        return WorkerProjection(NOT_ON_COURSE, None, None, off.metric, parts, unit)
    few = next((p for p in parts if p.status == TOO_FEW), None)
    if few is not None:
        return WorkerProjection(TOO_FEW, None, None, few.metric, parts, unit)
    projectable = [p for p in parts if p.status != NOT_PROJECTABLE]
    loose = next((p.criterion for p in parts if p.status == NOT_PROJECTABLE), None)
    if not projectable:
        return WorkerProjection(NOT_PROJECTABLE, None, None, f"`{loose}`", parts, unit)
    cps = [p.check_point for p in projectable if p.check_point is not None]
    cp = max(cps) if cps else None
    eta = due_at = None
    rate = seconds_per_unit(records, unit)
    if cp is not None and rate is not None and x_now is not None:
        last_t = max(r["time_s"] for r in records if isinstance(r.get("time_s"), (int, float)))
        due_at = last_t + (cp - x_now) * rate
        eta = None if now is None else max(0.0, due_at - now)
    status = MET if all(p.status == MET for p in projectable) else ON_COURSE
    return WorkerProjection(status, cp, eta, f"`{loose}`" if loose else None, parts, unit,
                            due_at=due_at)
