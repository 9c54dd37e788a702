"""The worker side of the orchestrator's file contract (shared/DESIGN.md), stdlib only.

A training script makes the contract one line per evaluation::

    from orchestrator.reporting import Reporter

    rep = Reporter.from_env(default_run_dir="runs/my-run")   # ORCH_RUN_DIR wins when set
    start_epoch = 0
    if rep.resume and (ckpt := rep.latest_checkpoint()) is not None:
        start_epoch = load(ckpt) + 1
    for epoch in range(start_epoch, max_epochs):
        train_one_epoch()
        rep.log(epoch=epoch, val_accuracy=0.81, train_loss=0.4)
        rep.save_checkpoint(lambda path: torch.save(state, path), epoch=epoch)
        if rep.should_stop:          # SIGTERM arrived: checkpoint written, exit 0
            break

Files written (all under ``run_dir``):

- ``metrics.jsonl``: one JSON object per ``log`` call, appended with a single ``write`` and
  fsynced, so a reader sees either the whole line or nothing of it. NaN/inf become ``null``.
- ``checkpoints/epoch_000005.pt`` (or ``step_...``) plus ``checkpoints/latest.pt``, replaced
  atomically, each with a JSON sidecar (``.json``) holding epoch, step, metrics and time.
- ``evals/``: per-sample evaluation records (``write_eval``), one JSON file per evaluation.

This module must import nothing outside the standard library: research workers on other
branches, other machines and other Python environments import it.
"""

from __future__ import annotations

import atexit
import json
import math
import os
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from types import FrameType
from typing import Any

METRICS_FILE = "metrics.jsonl"
CHECKPOINT_DIR = "checkpoints"
EVALS_DIR = "evals"
LATEST = "latest"


def _clean_number(value: Any, key: str) -> float | int | bool | str | None:
    """Return a JSON-safe metric value; NaN and inf become None.

    Raises:
        TypeError: if the value is not a number, bool, str or None (and not a 0-d tensor/array
            exposing ``item()``).
    """
    if value is None or isinstance(value, (bool, str)):
        return value
    if hasattr(value, "item") and callable(value.item):
        value = value.item()  # 0-d torch tensors and numpy scalars
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    raise TypeError(f"metric {key!r} has type {type(value).__name__}; log numbers only")


def atomic_write_bytes(path: Path, data: bytes, *, durable: bool = True) -> None:
    """Write ``data`` to ``path`` so a reader sees the old file or the new one, never half.

    Temp file in the same folder, fsync, os.replace (POSIX rename is atomic on one file system).
    ``durable=False`` skips the fsync: still atomic for readers and against the writer being
    killed, but a power loss may leave the older file (for views redrawn every few seconds).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    """``atomic_write_bytes`` of ``obj`` as indented JSON (NaN not allowed)."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, allow_nan=False) + "\n").encode())


def _ignore_sigterm_while_exiting() -> None:
    """At exit, ignore SIGTERM. The controller signals a stopped run more than once (the launch
    wrapper forwards its SIGTERM, then the process group gets one), and Python resets its own
    handlers to SIG_DFL while the interpreter shuts down (after atexit): a SIGTERM arriving
    during that teardown would kill a worker that already checkpointed and returned 0, and its
    exit would read as death by signal (-15). SIGKILL still ends a worker that hangs here."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class Reporter:
    """Writes a worker's metrics, checkpoints and eval records where the controller reads them.

    Args:
        run_dir: the run directory (created if missing).
        resume: True when the worker must resume from ``latest_checkpoint()``.
        attempt: attempt number of this run (1 for the first).
        handle_signals: install a SIGTERM/SIGINT handler that sets ``should_stop`` instead of
            killing the process, so the training loop can checkpoint and exit 0.
        keep_checkpoints: how many numbered checkpoints to keep besides ``latest``
            (older ones are deleted after a new one is published); 0 keeps all.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike[str],
        *,
        resume: bool = False,
        attempt: int = 1,
        handle_signals: bool = True,
        keep_checkpoints: int = 2,
    ) -> None:
        self.run_dir = Path(run_dir).resolve()
        self.resume = resume
        self.attempt = attempt
        self.keep_checkpoints = keep_checkpoints
        self.metrics_path = self.run_dir / METRICS_FILE
        self.checkpoint_dir = self.run_dir / CHECKPOINT_DIR
        self.evals_dir = self.run_dir / EVALS_DIR
        self.run_dir.mkdir(parents=True, exist_ok=True)
        # A plain flag, not a threading.Event: the signal handler runs between two bytecodes of
        # the main thread, possibly inside Event.set() of the previous signal (the controller
        # sends a stopped run SIGTERM twice), and Event.set() takes a non-reentrant lock.
        self._stop_requested = False
        self._lock = threading.Lock()
        if handle_signals and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._on_signal)
            signal.signal(signal.SIGINT, self._on_signal)
            atexit.unregister(_ignore_sigterm_while_exiting)  # once, however many reporters
            atexit.register(_ignore_sigterm_while_exiting)

    @classmethod
    def from_env(
        cls,
        default_run_dir: str | os.PathLike[str] | None = None,
        *,
        resume: bool | None = None,
        **kwargs: Any,
    ) -> Reporter:
        """Build a reporter from the orchestrator's environment (ORCH_RUN_DIR, ORCH_RESUME, ...).

        Outside the orchestrator (a run by hand) ``default_run_dir`` is used.

        Raises:
            ValueError: if neither ORCH_RUN_DIR nor ``default_run_dir`` is given.
        """
        run_dir = os.environ.get("ORCH_RUN_DIR") or default_run_dir
        if not run_dir:
            raise ValueError("no run directory: set ORCH_RUN_DIR or pass --run-dir")
        if resume is None:
            resume = os.environ.get("ORCH_RESUME", "0") == "1"
        attempt = int(os.environ.get("ORCH_ATTEMPT", "1") or 1)
        return cls(run_dir, resume=resume, attempt=attempt, **kwargs)

    # -- stopping ---------------------------------------------------------------------------

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self._stop_requested and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C means "now"
        self._stop_requested = True

    @property
    def should_stop(self) -> bool:
        """True once SIGTERM/SIGINT arrived: checkpoint at the next safe point and exit 0."""
        return self._stop_requested

    def request_stop(self) -> None:
        """Set ``should_stop`` from code (tests, time budgets such as --max-hours)."""
        self._stop_requested = True

    # -- metrics ----------------------------------------------------------------------------

    def log(self, *, epoch: int | None = None, step: int | None = None, **metrics: Any) -> dict:
        """Append one evaluation record to metrics.jsonl (one write, flushed and fsynced).

        Args:
            epoch: epoch index the record belongs to (epoch or step is required).
            step: optimizer step count.
            **metrics: numeric values (floats, ints, bools, 0-d tensors); NaN/inf -> null.

        Returns:
            The record as written (with ``time_s``, Unix seconds, and ``attempt`` added).

        Raises:
            ValueError: if neither epoch nor step is given.
            TypeError: if a metric is not a number.
        """
        if epoch is None and step is None:
            raise ValueError("log() needs epoch= or step=")
        record: dict[str, Any] = {}
        if epoch is not None:
            record["epoch"] = int(epoch)
        if step is not None:
            record["step"] = int(step)
        record["time_s"] = round(time.time(), 3)
        record["attempt"] = self.attempt
        for key, value in metrics.items():
            record[key] = _clean_number(value, key)
        line = (json.dumps(record, allow_nan=False) + "\n").encode()
        with self._lock:
            fd = os.open(self.metrics_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, line)
                os.fsync(fd)
            finally:
                os.close(fd)
        return record

    def history(self) -> list[dict]:
        """Records already in metrics.jsonl (a partial last line is ignored)."""
        if not self.metrics_path.exists():
            return []
        out = []
        for line in self.metrics_path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return out

    # -- checkpoints ------------------------------------------------------------------------

    def save_checkpoint(
        self,
        write: Callable[[Path], None],
        *,
        epoch: int | None = None,
        step: int | None = None,
        metrics: Mapping[str, Any] | None = None,
        suffix: str = ".pt",
        partial: bool = False,
    ) -> Path:
        """Publish a checkpoint: numbered file, sidecar JSON, and an atomically replaced latest.

        Args:
            write: called with a temporary path in checkpoints/; it must write the whole
                checkpoint there (e.g. ``lambda p: torch.save(state, p)``).
            epoch, step: what the checkpoint holds (one is required); names the file.
            metrics: small metrics to store in the sidecar.
            suffix: file extension.
            partial: a stop checkpoint written mid-epoch (after SIGTERM): it is named by epoch
                *and* step (``epoch_000005_step_000001234_partial.pt``), so it never replaces the
                checkpoint of an evaluated epoch: the weights that produced a record stay as
                they were saved (the controller pins the winner's from them). Its sidecar says
                ``"partial": true``.

        Returns:
            Path of the numbered checkpoint file.
        """
        if epoch is None and step is None:
            raise ValueError("save_checkpoint() needs epoch= or step=")
        if suffix == ".json":
            raise ValueError("suffix '.json' is reserved for checkpoint sidecars")
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        name = f"epoch_{epoch:06d}" if epoch is not None else f"step_{step:09d}"
        if partial:
            if epoch is None or step is None:
                raise ValueError("a partial (mid-epoch) checkpoint needs both epoch= and step=")
            name = f"epoch_{epoch:06d}_step_{step:09d}_partial"
        final = self.checkpoint_dir / f"{name}{suffix}"
        fd, tmp_name = tempfile.mkstemp(dir=self.checkpoint_dir, prefix=".tmp-", suffix=suffix)
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            write(tmp)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, final)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        sidecar = {
            "epoch": epoch,
            "step": step,
            "file": final.name,
            "time_s": round(time.time(), 3),
            "attempt": self.attempt,
            "partial": partial,
            "metrics": {k: _clean_number(v, k) for k, v in (metrics or {}).items()},
        }
        atomic_write_json(final.with_suffix(".json"), sidecar)
        # latest: a hard link to the numbered file, swapped in with one rename.
        link_tmp = self.checkpoint_dir / f".{LATEST}{suffix}.{os.getpid()}.tmp"
        link_tmp.unlink(missing_ok=True)
        try:
            os.link(final, link_tmp)
        except OSError:  # file systems without hard links
            link_tmp.write_bytes(final.read_bytes())
        os.replace(link_tmp, self.checkpoint_dir / f"{LATEST}{suffix}")
        atomic_write_json(self.checkpoint_dir / f"{LATEST}.json", sidecar)
        self._prune(suffix)
        return final

    def _prune(self, suffix: str) -> None:
        if self.keep_checkpoints <= 0:
            return
        numbered = sorted(
            p for p in self.checkpoint_dir.glob(f"*{suffix}") if not p.name.startswith(LATEST)
        )
        for old in numbered[: -self.keep_checkpoints]:
            old.unlink(missing_ok=True)
            old.with_suffix(".json").unlink(missing_ok=True)

    def latest_checkpoint(self, suffix: str = ".pt") -> Path | None:
        """Path of checkpoints/latest<suffix>, or None if no checkpoint was published yet."""
        path = self.checkpoint_dir / f"{LATEST}{suffix}"
        return path if path.exists() else None

    def latest_checkpoint_info(self) -> dict | None:
        """The sidecar of the latest checkpoint (epoch, step, metrics, time), or None."""
        path = self.checkpoint_dir / f"{LATEST}.json"
        if not path.exists():
            return None
        return json.loads(path.read_text())

    # -- per-sample evaluation records ------------------------------------------------------

    def write_eval(self, name: str, records: Any) -> Path:
        """Write per-sample evaluation records to evals/<name>.json atomically.

        Args:
            name: file stem, e.g. ``"epoch_000005"``; letters, digits, '-', '_' and '.'.
            records: JSON-serialisable object (typically {"samples": [...], "summary": {...}}).

        Raises:
            ValueError: if ``name`` would leave the evals folder.
        """
        if not name or "/" in name or name.startswith("."):
            raise ValueError(f"eval name {name!r} must be a plain file stem")
        path = self.evals_dir / f"{name}.json"
        atomic_write_bytes(path, (json.dumps(records, default=_json_default) + "\n").encode())
        return path


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if hasattr(obj, "item"):
        return obj.item()
    raise TypeError(f"cannot serialise {type(obj).__name__} in an eval record")
