"""Reading workers' metric records incrementally, from whichever source the plan names.

All sources share one interface, ``MetricSource.read_new() -> list[dict]``: only records that
appeared since the last call, each with ``epoch`` or ``step`` and numeric values (None for
NaN/inf/null). The jsonl tailer reads only new bytes, keeps a partial last line for the next
read, notices truncation and replacement (inode change), and counts (never raises on) corrupt
lines. CSV and TensorBoard paths may be globs (a Lightning ``version_*`` folder per attempt):
the newest match created since the attempt began is read. ``MetricHistory`` merges records
of the same step (or epoch) within an attempt, and lets a new attempt replace the history
from its first record on.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

Record = dict[str, Any]


def clean_record(raw: Any, stats: SourceStats | None = None) -> Record | None:
    """Keep numeric fields of a decoded record; None if it has no epoch or step.

    NaN/inf and null become None; strings that parse as numbers are converted; other values
    (text, lists, objects) are dropped and, when ``stats`` is given, counted in
    ``stats.bad_values``. A record without a usable epoch/step is returned as None (the caller
    counts it as a bad line).
    """
    if not isinstance(raw, dict):
        return None
    out: Record = {}
    dropped = 0
    for key, value in raw.items():
        if not isinstance(key, str):
            dropped += 1
            continue
        if isinstance(value, bool):
            out[key] = int(value)
        elif isinstance(value, (int, float)):
            out[key] = value if (isinstance(value, int) or math.isfinite(value)) else None
        elif value is None:
            out[key] = None
        elif isinstance(value, str):
            try:
                f = float(value)
            except ValueError:
                dropped += 1
                continue
            out[key] = f if math.isfinite(f) else None
        else:
            dropped += 1
    if out.get("time_s", 0) is None:  # null/NaN write time: no time, not a bad time
        del out["time_s"]
        dropped += 1
    if stats is not None:
        stats.bad_values += dropped
    for key in ("epoch", "step"):
        if key in out:
            value = out[key]
            if value is None or (isinstance(value, float) and not value.is_integer()):
                del out[key]  # an epoch of 2.5 is not an epoch
            else:
                out[key] = int(value)
    if "epoch" not in out and "step" not in out:
        return None
    return out


@dataclass
class SourceStats:
    """Counters a source keeps about what it could not use."""

    bad_lines: int = 0  # lines (rows, events) without a usable record
    bad_values: int = 0  # non-numeric values dropped from otherwise usable records
    salvaged: int = 0  # records recovered from a line glued to an earlier partial line
    truncations: int = 0
    replacements: int = 0
    read_errors: int = 0  # reads that failed (unreadable file, corrupt event file, ...)

    def as_dict(self) -> dict[str, int]:
        """Only the counters that are not zero, e.g. ``{"bad_lines": 2}``."""
        return {k: v for k, v in self.__dict__.items() if v}


def newest_match(pattern: Path, since_s: float | None) -> Path | None:
    """The newest existing path matching ``pattern`` (a glob, or a plain path), by modification
    time, among those modified at or after ``since_s`` (Unix seconds; None: any).

    Worktrees and run directories are reused across races: files older than the attempt belong
    to an earlier race or attempt and are never read.
    """
    text = str(pattern)
    if not any(ch in text for ch in "*?["):
        candidates = [pattern] if pattern.exists() else []
    else:
        anchor = Path(pattern.anchor) if pattern.is_absolute() else Path(".")
        rel = str(pattern.relative_to(anchor)) if pattern.is_absolute() else text
        candidates = list(anchor.glob(rel))
    best: tuple[float, str] | None = None
    found = None
    for path in candidates:
        try:
            mtime = path.stat().st_mtime
        except OSError:
            continue
        if since_s is not None and mtime < since_s:
            continue
        if best is None or (mtime, str(path)) > best:
            best, found = (mtime, str(path)), path
    return found


class MetricSource:
    """Interface: ``read_new()`` returns records that appeared since the last call."""

    stats: SourceStats

    def begin_attempt(self, since_s: float) -> None:
        """The controller started a new attempt at ``since_s`` (Unix seconds)."""

    def read_new(self) -> list[Record]:  # pragma: no cover - interface
        raise NotImplementedError

    def watch_paths(self) -> list[Path]:
        """Folders whose file events should wake the controller early."""
        return []


class FileTailer:
    """Incremental reader of a growing text file: new complete lines only.

    Tracks (inode, offset) and the last bytes read; a partial last line stays buffered. A file
    that shrank (truncation), has a new inode (replacement), or no longer holds the bytes read
    last just before the offset (rewritten in place and grown past the offset between two
    reads, or a new file that reused the inode number) is read again from the start. A "line"
    that grows past ``MAX_LINE_BYTES`` without a newline is garbage: dropped, counted bad.
    """

    MAX_LINE_BYTES = 1 << 20
    TAIL_BYTES = 64

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.inode: int | None = None
        self.buffer = b""
        self.tail = b""  # the last TAIL_BYTES bytes before ``offset``
        self.stats = SourceStats()

    def _restart(self) -> None:
        self.offset, self.buffer, self.tail = 0, b"", b""

    def read_lines(self) -> list[str]:
        try:
            f = open(self.path, "rb")
        except FileNotFoundError:
            return []
        with f:
            st = os.fstat(f.fileno())  # the file actually opened, even if replaced meanwhile
            if self.inode is not None and st.st_ino != self.inode:
                self.stats.replacements += 1
                self._restart()
            elif st.st_size < self.offset:
                self.stats.truncations += 1
                self._restart()
            self.inode = st.st_ino
            if st.st_size == self.offset:
                return []
            if self.tail:
                f.seek(self.offset - len(self.tail))
                if f.read(len(self.tail)) != self.tail:
                    self.stats.truncations += 1  # rewritten under us
                    self._restart()
            f.seek(self.offset)
            chunk = f.read(st.st_size - self.offset)
        self.offset += len(chunk)
        self.tail = (self.tail + chunk)[-self.TAIL_BYTES :]
        data = self.buffer + chunk
        *lines, self.buffer = data.split(b"\n")
        if len(self.buffer) > self.MAX_LINE_BYTES:
            self.stats.bad_lines += 1
            self.buffer = b""
        return [line.decode("utf-8", errors="replace") for line in lines if line.strip()]


class JsonlSource(MetricSource):
    """metrics.jsonl written by orchestrator.reporting (or by hand): one JSON object a line."""

    def __init__(self, path: Path) -> None:
        self.tailer = FileTailer(path)
        self.stats = self.tailer.stats

    def read_new(self) -> list[Record]:
        out = []
        for line in self.tailer.read_lines():
            record = self._parse(line)
            if record is None:
                record = self._salvage(line)
                self.stats.bad_lines += 1
                if record is not None:
                    self.stats.salvaged += 1
            if record is not None:
                out.append(record)
        return out

    def _parse(self, text: str) -> Record | None:
        try:
            return clean_record(json.loads(text), self.stats)
        except (ValueError, RecursionError):  # JSONDecodeError is a ValueError
            return None

    def _salvage(self, line: str) -> Record | None:
        """A writer that died mid-line leaves a partial line; the next attempt's first record is
        then glued to it (``{"epoch": 5, "ac{"epoch": 5, "acc": 0.8}``). Recover the complete
        record at the end of such a line instead of losing that epoch."""
        start = line.find("{", 1)
        while start != -1:
            record = self._parse(line[start:])
            if record is not None:
                return record
            start = line.find("{", start + 1)
        return None

    def watch_paths(self) -> list[Path]:
        return [self.tailer.path.parent]


class RegexSource(MetricSource):
    """Named groups of a regular expression matched against each new line of a log file.

    Example pattern: ``step (?P<step>\\d+) train loss: (?P<train_loss>\\S+)``. Lines that do not
    match are ignored (logs hold other text); matches without a number are counted bad.
    """

    def __init__(self, path: Path, pattern: str) -> None:
        self.tailer = FileTailer(path)
        self.stats = self.tailer.stats
        self.regex = re.compile(pattern)

    def read_new(self) -> list[Record]:
        out = []
        for line in self.tailer.read_lines():
            m = self.regex.search(line)
            if m is None:
                continue
            groups = {k: v for k, v in m.groupdict().items() if v is not None}
            record = clean_record(groups, self.stats)
            if record is None:
                self.stats.bad_lines += 1
            else:
                out.append(record)
        return out

    def watch_paths(self) -> list[Path]:
        return [self.tailer.path.parent]


def _glob_root(path: Path) -> Path:
    """The deepest folder of ``path`` without glob characters (what file events can watch)."""
    parts = []
    for part in path.parts:
        if any(ch in part for ch in "*?["):
            break
        parts.append(part)
    return Path(*parts) if parts else Path(".")


class CsvSource(MetricSource):
    """A CSV log with a header row, as Lightning's CSVLogger writes (metrics.csv).

    CSVLogger writes one row per logging call with empty cells for metrics not logged in that
    call, and rewrites the whole file (with a wider header) when a new metric appears: a
    replaced or shrunk file is re-read from the start and only rows past those already seen
    are returned.
    """

    def __init__(self, path: Path) -> None:
        self.pattern = path
        self.path: Path | None = None  # the file being read (the newest glob match)
        self.rows_seen = 0
        self.stats = SourceStats()
        self._signature: tuple[int, int] | None = None
        self._short: tuple[int, int] | None = None
        self._since_s: float | None = None

    def begin_attempt(self, since_s: float) -> None:
        """A new attempt started at ``since_s``: only files written from then on are read."""
        self._since_s = since_s

    def read_new(self) -> list[Record]:
        current = newest_match(self.pattern, self._since_s)
        if current is None:
            return []
        if current != self.path:  # a new version_N folder (or the first file): read it whole
            self.path, self.rows_seen, self._signature = current, 0, None
        try:
            st = os.stat(current)
            text = current.read_text(errors="replace")
        except FileNotFoundError:
            return []
        signature = (st.st_ino, st.st_size)
        if signature == self._signature:
            return []
        self._signature = signature
        if not text.endswith("\n"):
            text = text[: text.rfind("\n") + 1]  # a partial last row waits
        rows = _csv_rows(text.replace("\0", ""))
        if len(rows) < self.rows_seen:
            # CSVLogger rewrites the whole file in place (a wider header): a shorter read is a
            # rewrite in progress, to be read again; the same short file twice is a truncation.
            if self._short != signature:
                self._short, self._signature = signature, None
                return []
            self.stats.truncations += 1
            self.rows_seen = 0
        self._short = None
        new = rows[self.rows_seen :]
        self.rows_seen = len(rows)
        out = []
        for row in new:
            if row is None:  # a row the csv module cannot parse
                self.stats.bad_lines += 1
                continue
            cells = {
                k: v
                for k, v in row.items()
                if isinstance(k, str) and k and isinstance(v, str) and v
            }
            record = clean_record(cells, self.stats)
            if record is None:
                self.stats.bad_lines += 1
            else:
                out.append(record)
        return out

    def watch_paths(self) -> list[Path]:
        return [self.path.parent if self.path is not None else _glob_root(self.pattern.parent)]


def _csv_rows(text: str) -> list[dict[str, Any] | None]:
    """Rows of a CSV text with a header; None for a row the csv module rejects (e.g. a field
    over ``csv.field_size_limit()``), so one bad row never hides the rows after it."""
    reader = csv.DictReader(io.StringIO(text))
    rows: list[dict[str, Any] | None] = []
    while True:
        try:
            rows.append(next(reader))
        except StopIteration:
            return rows
        except csv.Error:
            rows.append(None)


class TensorBoardSource(MetricSource):
    """Scalar summaries from TensorBoard event files under a folder, read incrementally.

    Needs the ``tensorboard`` package (``pip install tensorboard``). Records are keyed by the
    summary's global step (``step``); the tag becomes the metric name with '/' kept; the
    event's wall time becomes ``time_s``.
    """

    def __init__(self, folder: Path) -> None:
        self.pattern = folder
        self.folder: Path | None = None
        self.stats = SourceStats()
        self._loaders: dict[Path, Any] = {}
        self._since_s: float | None = None

    def begin_attempt(self, since_s: float) -> None:
        """A new attempt started at ``since_s``: a glob then follows the folder it creates."""
        self._since_s = since_s

    def read_new(self) -> list[Record]:
        try:
            from tensorboard.backend.event_processing.event_file_loader import (
                EventFileLoader,
            )
            from tensorboard.util import tensor_util
        except ImportError as e:  # reported once per read by the controller
            raise RuntimeError(
                "metrics source 'tensorboard' needs the tensorboard package: "
                "pip install tensorboard"
            ) from e
        by_step: dict[int, Record] = {}
        folder = newest_match(self.pattern, self._since_s)
        if folder is None:
            return []
        if folder != self.folder:
            self.folder, self._loaders = folder, {}
        for path in sorted(folder.rglob("events.out.tfevents.*")):
            loader = self._loaders.get(path)
            if loader is None:
                loader = self._loaders[path] = EventFileLoader(str(path))
            try:
                for event in loader.Load():
                    for value in event.summary.value:
                        if value.HasField("simple_value"):
                            number = float(value.simple_value)
                        elif value.HasField("tensor"):
                            try:
                                number = float(tensor_util.make_ndarray(value.tensor))
                            except (TypeError, ValueError):
                                self.stats.bad_values += 1
                                continue
                        else:
                            continue
                        rec = by_step.setdefault(int(event.step), {"step": int(event.step)})
                        if event.wall_time:  # when the value was logged (Unix seconds)
                            rec["time_s"] = max(rec.get("time_s", 0.0), float(event.wall_time))
                        rec[value.tag] = number if math.isfinite(number) else None
            except Exception:  # a corrupt record (DataLossError, a bad protobuf): skip the rest
                self.stats.read_errors += 1
        return [by_step[s] for s in sorted(by_step)]

    def watch_paths(self) -> list[Path]:
        return [self.folder if self.folder is not None else _glob_root(self.pattern)]


class RenamedSource(MetricSource):
    """Another source with metric names mapped (``rename: {Loss/test: test_loss}``)."""

    def __init__(self, inner: MetricSource, rename: dict[str, str]) -> None:
        self.inner = inner
        self.rename = rename
        self.stats = inner.stats

    def begin_attempt(self, since_s: float) -> None:
        self.inner.begin_attempt(since_s)

    def read_new(self) -> list[Record]:
        return [{self.rename.get(k, k): v for k, v in r.items()} for r in self.inner.read_new()]

    def watch_paths(self) -> list[Path]:
        return self.inner.watch_paths()


def write_order_keys(records: list[dict[str, Any]]) -> list[tuple[float, dict[str, Any]]]:
    """(sort key, record) for one run's new records, in file order (the controller merges
    the records of all runs by these keys).

    Records of different runs are decided in the order they were written (their ``time_s``);
    records of one run must keep their file order whatever their ``time_s`` says (missing, not
    a number, or going back after the file was replaced), so the key is the running maximum.
    """
    out = []
    key = 0.0
    for record in records:
        value = record.get("time_s")
        if isinstance(value, (int, float)) and value > key:
            key = float(value)
        out.append((key, record))
    return out


def x_key(record: Record) -> str:
    """The ordering key of a record: ``step`` when present (finer), else ``epoch``."""
    return "step" if "step" in record else "epoch"


@dataclass
class MetricHistory:
    """A worker's records in order of their step (or epoch), merged.

    Within one attempt, records with the same step (or epoch) merge, later values winning per
    key (Lightning writes a train row and a validation row at one step; TensorBoard tags of one
    step arrive at different times); a step that goes back within an attempt is merged into its
    place, never a rewind. ``begin_attempt`` marks a new attempt: its first record replaces the
    history from that record's step on, so a resumed attempt that re-reports an epoch replaces
    the old one instead of mixing two attempts' versions. Records that carry an ``attempt`` field
    (``orchestrator.reporting``) mark new attempts themselves.
    """

    records: list[Record] = field(default_factory=list)
    _new_attempt: bool = field(default=False, repr=False)
    _attempt: Any = field(default=None, repr=False)

    def begin_attempt(self) -> None:
        """The next record starts a new attempt (the controller calls it at each launch)."""
        self._new_attempt = True

    def add(self, new: Iterable[Record]) -> list[Record]:
        """Merge records in arrival order.

        Returns:
            The merged record of each point touched, in arrival order (what the criteria see).
        """
        merged_out = []
        for rec in new:
            key = x_key(rec)
            x = rec[key]
            attempt = rec.get("attempt")
            if attempt is not None and self._attempt is not None and attempt != self._attempt:
                self._new_attempt = True
            if attempt is not None:
                self._attempt = attempt
            if self._new_attempt:
                self._new_attempt = False
                self.records = [r for r in self.records if (_x(r, key) or -1) < x]
            merged = None
            for i, old in enumerate(self.records):
                if _x(old, key) == x:
                    merged = self.records[i] = {**old, **rec}
                    break
            if merged is None:
                merged = dict(rec)
                at = len(self.records)
                while at > 0 and (_x(self.records[at - 1], key) or -1) > x:
                    at -= 1
                self.records.insert(at, merged)
            merged_out.append(merged)
        return merged_out

    @property
    def last(self) -> Record | None:
        return self.records[-1] if self.records else None

    def last_value(self, metric: str) -> tuple[float, Record] | None:
        """The newest number reported for ``metric`` and the record it came from, or None."""
        for r in reversed(self.records):
            v = r.get(metric)
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                return float(v), r
        return None

    def series(self, metric: str, unit: str | None = None) -> tuple[list[int], list[float]]:
        """(x values, metric values), skipping records without a number.

        Args:
            metric: the metric's name as written.
            unit: ``epoch`` or ``step`` for the x values (default: epoch when the record has
                one, else step).
        """
        xs, ys = [], []
        for r in self.records:
            v = r.get(metric)
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                if unit is not None:
                    x = r.get(unit, r.get("step" if unit == "epoch" else "epoch", 0))
                else:
                    x = r.get("epoch", r.get("step", 0))
                xs.append(int(x or 0))
                ys.append(float(v))
        return xs, ys

    def reported_names(self) -> set[str]:
        """Every metric name that holds a number in some record."""
        return {k for r in self.records for k, v in r.items()
                if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _x(record: Record, key: str) -> int | None:
    value = record.get(key)
    return value if isinstance(value, int) else None


def make_source(
    kind: str,
    *,
    run_dir: Path,
    path: str | None,
    pattern: str | None,
    rename: dict[str, str] | None = None,
) -> MetricSource:
    """Build the MetricSource a worker's ``metrics:`` section names.

    Args:
        kind: jsonl | regex | csv | tensorboard.
        run_dir: the run directory; relative ``path`` values are resolved against it.
        path: file or folder of the source (regex defaults to the run's stdout.log); a glob
            for csv and tensorboard.
        pattern: regex with named groups (regex only).
        rename: metric names to map (as written -> as the criteria name them).
    """
    if rename:
        return RenamedSource(make_source(kind, run_dir=run_dir, path=path, pattern=pattern),
                             rename)
    resolved = Path(path) if path else None
    if resolved is not None and not resolved.is_absolute():
        resolved = run_dir / resolved
    if kind == "jsonl":
        return JsonlSource(resolved or run_dir / "metrics.jsonl")
    if kind == "regex":
        assert pattern is not None
        return RegexSource(resolved or run_dir / "stdout.log", pattern)
    if kind == "csv":
        assert resolved is not None
        return CsvSource(resolved)
    if kind == "tensorboard":
        assert resolved is not None
        return TensorBoardSource(resolved)
    raise ValueError(f"unknown metrics source {kind!r}")
