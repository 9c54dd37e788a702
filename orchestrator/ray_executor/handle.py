"""The controller side of one Ray attempt: ``RayRunHandle``, fed by the launcher's pump thread.

It appends the bytes an actor streams back to the controller's run directory, and, for a resumed
attempt, drops the records of epochs (or steps) the controller already holds (each epoch is
recorded once). executor.py creates and feeds handles.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

from orchestrator.ray_executor.node import Pull
from orchestrator.reporting import METRICS_FILE, atomic_write_bytes
from orchestrator.running.launchers import LaunchSpec, RunHandle


class RayRunHandle(RunHandle):
    """One attempt running in a Ray actor; the launcher's pump thread feeds it.

    ``pid`` is the launch wrapper's pid on its node once the actor started it, -1 before.
    """

    def __init__(self, spec: LaunchSpec, actor: Any, start_ref: Any, *,
                 recorded_upto: float | None = None, previous_loss: str | None = None) -> None:
        self.spec = spec
        self.actor = actor
        self.start_ref = start_ref  # ObjectRef of RunActor.start()
        self.pid: int | None = -1
        self.create_time: float | None = time.time()
        self.node: str | None = None  # the node's IP, once started
        self.node_id: str | None = None  # the node's Ray id (hex), once started
        self.node_label: str | None = None  # "ip id8 [custom resources]", for events
        self.node_lost: str | None = None  # the label of this attempt's node, if it was lost
        self.node_package: str | None = None  # where the node imported orchestrator from
        self.previous_loss = previous_loss  # the node an earlier attempt of this run lost
        self.node_cwd: str | None = None  # where the worker runs on the node
        self.node_run_dir: str | None = None  # where it writes there
        self.error: str | None = None
        self.done = threading.Event()  # set once the final pull (or the death) is applied
        self._returncode: int | None = None
        self._cpu_s = 0.0
        self._killed = False
        # A resumed attempt re-runs the epochs between its checkpoint and the last record the
        # controller holds; those records are dropped (the controller already judged them).
        self._recorded_upto = recorded_upto
        self._unavailable_since: float | None = None
        self._stopping = False  # the launcher's stop() is running on the actor
        self._metrics_partial = b""
        self._dropped: list[float] = []

    def poll(self) -> int | None:
        return self._returncode if self.done.is_set() else None

    def where(self) -> str:
        lost = (f"; node {self.previous_loss} was lost under the last attempt"
                if self.previous_loss else "")
        if self.pid is None or self.pid < 0:
            return f"a Ray actor, starting{lost}"
        return f"pid {self.pid} on node {self.node_label or self.node or '?'}{lost}"

    def refresh(self) -> None:
        """Nothing to do per tick: the launcher's pump thread appends new bytes as they arrive
        (which wakes the controller through its file watcher)."""

    def cpu_seconds(self) -> float:
        return self._cpu_s

    def apply(self, pull: Pull) -> None:
        """Append streamed bytes and write whole files into the controller's run directory."""
        run_dir = self.spec.paths.run_dir
        for rel, data in pull.appends.items():
            if rel == METRICS_FILE and self._recorded_upto is not None:
                data = self._drop_recorded(data, final=pull.returncode is not None)
            path = run_dir / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "ab") as f:
                f.write(data)
        for rel, data in pull.snapshots.items():
            atomic_write_bytes(run_dir / rel, data)
        self._cpu_s = max(self._cpu_s, pull.cpu_s)
        if pull.returncode is not None:
            self._finish(pull.returncode)

    def _drop_recorded(self, data: bytes, *, final: bool) -> bytes:
        """Drop metric records at or before ``_recorded_upto`` (epoch, else step) from streamed
        bytes, until the first newer record; after that, bytes pass unchanged. A partial last
        line waits for the next pull (the final pull passes it as it is)."""
        buf = self._metrics_partial + data
        cut = len(buf) if final else buf.rfind(b"\n") + 1
        complete, partial = buf[:cut], buf[cut:]
        out = bytearray()
        for line in complete.splitlines(keepends=True):
            upto = self._recorded_upto
            if upto is not None:
                position = _position(line)
                if position is not None and position <= upto:
                    self._dropped.append(position)
                    continue
                if position is not None:
                    self._recorded_upto = None  # past the seam
            out += line
        if self._recorded_upto is None:
            out += partial
            partial = b""
        self._metrics_partial = partial
        if self._recorded_upto is None or final:
            self._note_dropped()
        return bytes(out)

    def _note_dropped(self) -> None:
        if not self._dropped:
            return
        first, last = min(self._dropped), max(self._dropped)
        with open(self.spec.paths.stderr, "ab") as f:
            f.write(f"orchestrator: attempt {self.spec.attempt} re-ran epochs (or steps) "
                    f"{_fmt(first)}..{_fmt(last)} "
                    "from its checkpoint; those records were kept from the attempt before it "
                    "(each epoch is recorded once)\n".encode())
        self._dropped = []

    def _finish(self, returncode: int, error: str | None = None) -> None:
        if self.done.is_set():
            return
        self._returncode = returncode
        self.error = error
        if error:
            with open(self.spec.paths.stderr, "ab") as f:
                f.write(f"orchestrator: {error}\n".encode())
        self.done.set()


def _position(line: bytes) -> float | None:
    """The epoch (else step) of one metrics.jsonl line; None for a blank or unreadable one."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    if not isinstance(record, dict):
        return None
    for key in ("epoch", "step"):
        value = record.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    return None


def _fmt(position: float) -> str:
    return f"{position:g}"


def last_recorded(metrics: Path) -> float | None:
    """The highest epoch (else step) among the complete records of a metrics.jsonl file
    (None when it has none, or does not exist)."""
    try:
        data = metrics.read_bytes()
    except OSError:
        return None
    positions = [_position(line) for line in data[: data.rfind(b"\n") + 1].splitlines()]
    known = [p for p in positions if p is not None]
    return max(known) if known else None
