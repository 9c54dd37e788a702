"""The launcher interface and its local implementation.

A launcher starts a run from a ``LaunchSpec`` and returns a ``RunHandle`` (poll, refresh,
identity); ``stop`` ends several handles at once. The controller only talks to this interface,
so executors differ in one module (local processes here; Ray in orchestrator.ray_executor).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from orchestrator.paths import RunPaths
from orchestrator.running.gpus import Slot
from orchestrator.running.processes import ProcessTree, StopReport, attach, launch, stop_trees

REFRESH_INTERVAL_S = 1.0  # seconds between two descendant scans of a running attempt


@dataclass(frozen=True)
class LaunchSpec:
    """Everything needed to start one attempt of a worker."""

    key: str  # "experiment/worker"
    argv: list[str]
    cwd: Path
    env: dict[str, str]
    paths: RunPaths
    run_id: str
    attempt: int
    slot: Slot
    header: str = ""
    num_cpus: float = 1.0


class RunHandle:
    """A started (or re-attached) attempt. Subclasses: LocalRunHandle, RayRunHandle."""

    pid: int | None
    create_time: float | None

    def poll(self) -> int | None:
        """The attempt's return code once it has ended, else None."""
        raise NotImplementedError

    def refresh(self) -> None:
        """Called every tick while running (track descendants, fetch remote files, ...)."""

    def cpu_seconds(self) -> float:
        """CPU seconds used so far by the attempt's processes (best effort)."""
        return 0.0

    def pids(self) -> set[int]:
        """Every pid this attempt is known to have had (leader and descendants seen), for
        matching against NVML's list of processes holding GPU memory. Empty if unknown."""
        return set()

    def where(self) -> str:
        """Where the attempt runs, for events and logs ("pid 1234")."""
        return f"pid {self.pid}"


class Launcher:
    """Interface of an executor."""

    def start(self, spec: LaunchSpec) -> RunHandle:
        raise NotImplementedError

    def attach(self, key: str, pid: int, create_time: float, run_id: str, paths: RunPaths,
               attempt: int) -> RunHandle | None:
        """Re-attach to an attempt an earlier controller started; None if it is gone."""
        raise NotImplementedError

    def stop(self, handles: list[RunHandle], grace_s: float) -> list[StopReport]:
        raise NotImplementedError

    def cleanup(self, handle: RunHandle, grace_s: float) -> StopReport | None:
        """After an attempt's leader exited on its own (or was killed): stop whatever is left
        of its processes (children that outlived it, setsid helpers, the trainer itself when
        only the launch wrapper was killed). None when nothing was left."""
        return None

    def close(self) -> None:
        """Release executor resources (nothing for local processes)."""


@dataclass
class LocalRunHandle(RunHandle):
    tree: ProcessTree
    exit_status: Path
    _cpu: dict[int, float] = field(default_factory=dict)
    _next_refresh: float = 0.0

    @property
    def pid(self) -> int:  # type: ignore[override]
        return self.tree.leader.pid

    @property
    def create_time(self) -> float:  # type: ignore[override]
        return self.tree.leader.create_time

    def poll(self) -> int | None:
        if self.tree.alive():
            return None
        if self.tree.returncode is not None and not self.exit_status.exists():
            return self.tree.returncode  # the wrapper itself was killed
        return read_exit_status(self.exit_status)

    def refresh(self) -> None:
        """Record descendants and their CPU time, at most once a second: with many runs, a
        process-table walk per run on every tick would delay decisions."""
        now = time.monotonic()
        if now < self._next_refresh:
            return
        self._next_refresh = now + REFRESH_INTERVAL_S
        leader = self.tree.leader_process()
        if leader is None:
            return
        try:
            children = leader.children(recursive=True)
        except psutil.NoSuchProcess:
            return
        for p in (leader, *children):
            try:
                if p is not leader:
                    self.tree.seen.setdefault(p.pid, p.create_time())
                t = p.cpu_times()
                self._cpu[p.pid] = t.user + t.system
            except psutil.Error:
                continue

    def cpu_seconds(self) -> float:
        return sum(self._cpu.values())

    def pids(self) -> set[int]:
        return {self.tree.leader.pid, *self.tree.seen}


def read_exit_status(path: Path) -> int:
    """Return code from the wrapper's exit file; -9 (killed) when the file is missing."""
    try:
        data = json.loads(path.read_text())
        return int(data["returncode"])
    except (OSError, ValueError, KeyError, TypeError):
        return -9


class LocalLauncher(Launcher):
    """Runs each attempt as a local process session (see processes.py)."""

    def start(self, spec: LaunchSpec) -> LocalRunHandle:
        spec.paths.ensure()
        exit_file = spec.paths.exit_status(spec.attempt)
        tree = launch(
            spec.argv,
            cwd=spec.cwd,
            # Slots name GPUs by NVML index (PCI bus order): CUDA must number them the same way.
            env={**spec.env, "CUDA_DEVICE_ORDER": "PCI_BUS_ID"},
            stdout=spec.paths.stdout,
            stderr=spec.paths.stderr,
            exit_status=exit_file,
            run_id=spec.run_id,
            header=spec.header,
        )
        return LocalRunHandle(tree, exit_file)

    def attach(self, key: str, pid: int, create_time: float, run_id: str, paths: RunPaths,
               attempt: int) -> LocalRunHandle | None:
        tree = attach(pid, create_time, run_id)
        if tree is None:
            return None
        return LocalRunHandle(tree, paths.exit_status(attempt))

    def stop(self, handles: list[RunHandle], grace_s: float) -> list[StopReport]:
        trees = [h.tree for h in handles if isinstance(h, LocalRunHandle)]
        return stop_trees(trees, grace_s=grace_s)

    def cleanup(self, handle: RunHandle, grace_s: float) -> StopReport | None:
        if not isinstance(handle, LocalRunHandle) or not handle.tree.members(scan_env=True):
            return None
        # The leader is gone, so stop_trees goes straight to phase 2: SIGTERM what is left
        # (group, descendants, tagged), up to ``grace_s`` (at most 1 s), then SIGKILL.
        return stop_trees([handle.tree], grace_s=grace_s, term_wait_s=min(grace_s, 1.0))[0]
