"""Number and duration formatting shared by every view (dashboard, live table, race report)."""

from __future__ import annotations

import math
from typing import Any, Protocol


class _Bound(Protocol):
    def passes(self, x: float) -> bool: ...


def fmt(value: Any) -> str:
    """Compact number formatting for tables: 3 significant digits, scientific when tiny.

    ``None``, NaN and infinities print as ``—``; integers print whole.
    """
    if value is None:
        return "—"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return "—"
        if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5):
            return f"{value:.2e}"
        return f"{value:.3g}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)


def duration(seconds: float | None) -> str:
    """``42s`` / ``14m`` / ``2.5h`` for a number of seconds (negative counts as 0; None: ``—``)."""
    if seconds is None or not math.isfinite(seconds):
        return "—"
    seconds = max(0.0, seconds)
    if seconds < 90:
        return f"{seconds:.0f}s"
    if seconds < 5400:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def fmt_against(value: Any, threshold: _Bound | None) -> str:
    """``fmt(value)`` with enough digits that the number shown passes the threshold exactly
    when the value does (0.7496 against ``>= 0.75`` shows as ``0.7496``, not ``0.75``).

    Args:
        value: the metric's value.
        threshold: a ``Threshold`` (anything with ``passes(x) -> bool``), or None.
    """
    text = fmt(value)
    if threshold is None or not isinstance(value, (int, float)) or isinstance(value, bool):
        return text
    truth = threshold.passes(float(value))
    for digits in range(4, 13):
        try:
            if threshold.passes(float(text)) == truth:
                return text
        except ValueError:
            return text
        text = f"{value:.{digits}g}"
    return text


def code(text: str) -> str:
    """A markdown code span for ``text``, also when it holds backquotes (`` `a/b` < 1 ``)."""
    return f"`` {text} ``" if "`" in text else f"`{text}`"
