"""What reaches the researcher's terminal and desktop: a table that fits, and a ping at a decision.

Shared by the live table of ``run`` (``orchestrator.views.live``) and the laptop's ``watch``
(``orchestrator.remote.watch``), which cannot import each other.

Fitting a table to the terminal: columns are dropped in ``DROP_ORDER`` (branch first, then
trend, slot, ETAs) until the table's natural width fits; what still does not fit is made to
wrap: worker names at their ``-``/``_``/``/`` boundaries, metric headers at ``_``, never cut.
Statuses are shortened (``stopped (lost)``). ``wide=True`` keeps every column and full text.

Desktop notifications: ``Notifier`` runs a command (``osascript`` on macOS, ``notify-send`` on
Linux where present) or rings the terminal bell, and remembers what it announced, so each
decision pings once.
"""

from __future__ import annotations

import io
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, TextIO

if TYPE_CHECKING:
    from rich.console import RenderableType
    from rich.table import Table

# Columns dropped, in this order, while a table is wider than the terminal (by header, lower case).
DROP_ORDER = ("branch", "trend", "slot", "eta", "eta to criteria")
_BREAK = re.compile(r"(?<=[-_/.])")  # break opportunities: after - _ / .


def natural_width(table: Table) -> int:
    """The width ``table`` takes when nothing limits it, in terminal cells."""
    from rich.console import Console
    from rich.measure import Measurement

    probe = Console(width=10_000, file=io.StringIO(), color_system=None)
    return Measurement.get(probe, probe.options, table).maximum


def wrap_name(name: str, width: int) -> str:
    """``name`` on lines of at most ``width`` cells, broken after ``-``, ``_``, ``/`` or ``.``.

    A part longer than ``width`` with no break opportunity is split by characters (never cut).
    """
    if width < 1 or len(name) <= width:
        return name
    lines: list[str] = []
    line = ""
    for part in _BREAK.split(name):
        while len(part) > width:  # a part longer than a line: fold it
            if line:
                lines.append(line)
                line = ""
            lines.append(part[:width])
            part = part[width:]
        if len(line) + len(part) > width:
            lines.append(line)
            line = part
        else:
            line += part
    if line:
        lines.append(line)
    return "\n".join(lines)


_ICON = re.compile(r"^[^\w(]+")
_STOP_REASON = re.compile(r":\s*(lost)\b.*$|:\s*(\w+)\s*$")


def short_status(text: str) -> str:
    """A dashboard status cell made short for a terminal.

    ``⏹ stopped: lost to worker-b`` -> ``stopped (lost)``;
    ``🏃 running ⚠ stalled (attempt 2)`` -> ``running, stalled (try 2)``;
    ``💥 failed (attempt 3)`` -> ``failed (try 3)``.
    """
    s = _ICON.sub("", text.strip())
    attempt = re.search(r"\(attempt (\d+)\)", s)
    s = re.sub(r"\s*\(attempt \d+\)", "", s)
    s = re.sub(r"\s*\(.*$", "", s)  # an error message in parentheses: --wide shows it
    s = s.replace("⚠ stalled", ", stalled").replace(" , ", ", ")
    m = _STOP_REASON.search(s)
    if m:
        s = s[: m.start()] + f" ({m.group(1) or m.group(2)})"
    s = re.sub(r"[^\w\s(),.:/-]", "", s)  # leftover icons
    s = re.sub(r"\s+", " ", s).strip(" ,")
    if attempt:
        s += f" (try {attempt.group(1)})"
    return s


def _header_text(header: str, split: bool) -> str:
    return re.sub(r"(?<=[_/.])", "\n", header) if split else header


def fit_table(
    headers: Sequence[str],
    rows: Sequence[Sequence[str]],
    *,
    width: int,
    wide: bool = False,
    title: str | None = None,
    wrap_column: int = 0,
) -> RenderableType:
    """A rich table of ``rows`` that fits ``width`` terminal cells where it can.

    Args:
        headers: column headers; those named in ``DROP_ORDER`` may be dropped, in that order.
        rows: cell texts, one list per row (as many cells as headers); a ``status`` column
            holds the full status (shortened here with ``short_status``).
        width: the terminal's width in cells (e.g. 80).
        wide: the full detail (``--wide``): every column and the full status when the table
            fits ``width``; otherwise the fitted table and, under it, one line per row with
            what the table dropped or shortened.
        title: shown above the table, left-aligned.
        wrap_column: the column whose text wraps at name boundaries (the worker names).
    """
    from rich import box
    from rich.console import Group
    from rich.table import Table

    def build(
        keep: list[int], split_headers: bool, name_width: int | None, wrap_status: bool = False
    ) -> Table:
        table = Table(
            title=title,
            title_justify="left",
            box=box.SIMPLE_HEAD,
            pad_edge=False,
            show_edge=False,
            collapse_padding=True,
        )
        for i in keep:
            table.add_column(
                _header_text(headers[i], split_headers),
                overflow="fold",
                no_wrap=not (wide or (wrap_status and headers[i].strip().lower() == "status")),
            )
        for row in rows:
            cells = [row[i] if i != status_col else short_status(row[i]) for i in keep]
            if name_width is not None:
                pos = keep.index(wrap_column) if wrap_column in keep else -1
                if pos >= 0:
                    cells[pos] = wrap_name(cells[pos], name_width)
            table.add_row(*cells)
        return table

    natural = natural_width

    keep = list(range(len(headers)))
    lowered = [h.strip().lower() for h in headers]
    status_col = -1
    if wide:
        table = build(keep, False, None)
        if natural(table) <= width:
            return table
        status_col = lowered.index("status") if "status" in lowered else -1
        fitted = fit_table(headers, rows, width=width, title=title, wrap_column=wrap_column)
        assert isinstance(fitted, Table)  # not wide: always a table
        return Group(fitted, _details(headers, rows, fitted, wrap_column))
    status_col = lowered.index("status") if "status" in lowered else -1
    table = build(keep, False, None)
    for name in DROP_ORDER:
        if natural(table) <= width:
            return table
        drop = [i for i in keep if headers[i].strip().lower() == name and i != wrap_column]
        if drop:
            keep = [i for i in keep if i not in drop]
            table = build(keep, False, None)
    if natural(table) <= width:
        return table
    table = build(keep, True, None)
    if natural(table) <= width or wrap_column not in keep:
        return table
    names = [r[wrap_column] for r in rows] + [headers[wrap_column]]
    longest = max(len(n) for n in names)
    shortest = max(max(len(p) for p in _BREAK.split(n)) for n in names)  # longest unbreakable
    for name_width in range(longest - 1, shortest - 1, -1):
        table = build(keep, True, name_width)
        if natural(table) <= width:
            return table
    # still too wide: statuses wrap at their spaces (rich squeezes that column), names as above
    return build(keep, True, shortest, wrap_status=True)


def _details(
    headers: Sequence[str], rows: Sequence[Sequence[str]], shown: Table, wrap_column: int
) -> RenderableType:
    """One line per row with the columns ``shown`` left out, and the full status."""
    from rich.text import Text

    shown_headers = {str(c.header).replace("\n", "") for c in shown.columns}
    lines = []
    for row in rows:
        parts = [
            f"{h}: {cell}"
            for h, cell in zip(headers, row, strict=True)
            if cell and (h not in shown_headers or h.strip().lower() == "status")
        ]
        lines.append(f"{row[wrap_column]}: " + " · ".join(parts))
    return Text("\n".join(lines))


# --------------------------------------------------------------------------- notifications


def default_notify_command() -> list[str] | None:
    """The desktop notifier here: ``osascript`` on macOS, ``notify-send`` where installed on
    Linux; None (ring the terminal bell) otherwise."""
    if sys.platform == "darwin" and shutil.which("osascript"):
        return ["osascript"]
    found = shutil.which("notify-send")
    return [found] if found else None


def _applescript_quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def notify_argv(command: Sequence[str], title: str, message: str) -> list[str]:
    """The argv that shows ``title``/``message`` with ``command`` (an osascript or
    notify-send-like command list; anything else gets title and message appended)."""
    if command and command[0].rsplit("/", 1)[-1] == "osascript":
        script = (
            f"display notification {_applescript_quote(message)} "
            f"with title {_applescript_quote(title)}"
        )
        return [*command, "-e", script]
    return [*command, title, message]


class Notifier:
    """Raises a desktop notification once per decision.

    Args:
        command: the notifier command list (e.g. ``["notify-send"]``); None: the terminal bell.
        bell: where the bell (and a one-line message) goes when there is no command or it fails.
        timeout_s: how long a notifier command may take.
        run: runs an argv (tests may record it); defaults to ``subprocess.run``.
    """

    def __init__(
        self,
        command: Sequence[str] | None,
        *,
        bell: TextIO | None = None,
        timeout_s: float = 10.0,
        run: Callable[[list[str]], object] | None = None,
    ) -> None:
        self.command = list(command) if command else None
        self.bell = bell
        self.timeout_s = timeout_s
        self._run = run
        self._announced: set[str] = set()

    def announce(self, key: str, title: str, message: str) -> bool:
        """Notify about ``key`` (e.g. ``"race-1: x won at epoch 5"``) unless already done.

        Returns:
            True if a notification was raised now, False if ``key`` was announced before.
        """
        if key in self._announced:
            return False
        self._announced.add(key)
        if self.command is not None:
            argv = notify_argv(self.command, title, message)
            try:
                if self._run is not None:
                    self._run(argv)
                else:
                    subprocess.run(
                        argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL, timeout=self.timeout_s, check=True,
                    )
                return True
            except (OSError, subprocess.SubprocessError):
                pass  # fall back to the bell
        stream = self.bell if self.bell is not None else sys.stderr
        stream.write(f"\a{title}: {message}\n")
        stream.flush()
        return True

    def seen(self, key: str) -> None:
        """Mark ``key`` as announced without notifying (decisions made before watching began)."""
        self._announced.add(key)
