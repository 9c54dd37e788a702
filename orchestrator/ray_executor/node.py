"""The node side of ``executor: ray``: the actor that runs one attempt's worker on its node.

``RunActor`` starts the worker through ``processes.launch`` (with a sentinel, see
sentinel.py, that stops the worker's tree if the actor dies) and answers the launcher's
long polls (``pull``) with new bytes of the append-only run files and whole changed files.
``NodeSpec`` (what the launcher sends) and ``Pull`` (what a pull returns) are the picklable
messages between the launcher (executor.py) and the actor. Nothing here imports Ray at
import time; Ray workers import this module by its path to build the actor.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import psutil

from orchestrator.paths import RunPaths
from orchestrator.ray_executor.packaging import unpack_worktree
from orchestrator.reporting import CHECKPOINT_DIR, LATEST, METRICS_FILE, atomic_write_bytes
from orchestrator.running.launchers import read_exit_status
from orchestrator.running.processes import RUN_ID_ENV, ProcessTree, StopReport, launch, stop_trees

APPEND_SUFFIXES = (".jsonl", ".log", ".csv")
DEAD_ACTOR_CODE = -9  # what poll() returns for a run whose actor or node died
MAX_CHUNK_BYTES = 8 << 20  # per file and pull, so one pull never carries a whole huge log
RESCAN_S = 0.25  # how often a pull looks for new append-only files in the node run directory
SCRATCH_ENV = "ORCH_RAY_SCRATCH"  # a node's scratch root (default: its temp directory)


def scratch_root() -> Path:
    """Where this node keeps shipped attempts: ``$ORCH_RAY_SCRATCH``, else the temp directory
    (each attempt gets ``<root>/orch-ray/<run id>/{worktree,run}``, deleted when it ends)."""
    return Path(os.environ.get(SCRATCH_ENV) or tempfile.gettempdir())


def is_append_only(rel: str) -> bool:
    """Whether a run-directory file grows by appends (streamed as new bytes, not whole)."""
    name = rel.rsplit("/", 1)[-1]
    return name.endswith(APPEND_SUFFIXES) or name.startswith("events.out.tfevents")


def _is_temp(rel: str) -> bool:
    name = rel.rsplit("/", 1)[-1]
    return name.startswith(".") or name.endswith(".tmp")


def _is_latest_checkpoint(rel: str) -> bool:
    return rel.startswith(f"{CHECKPOINT_DIR}/{LATEST}.")


@dataclass
class NodeSpec:
    """What an actor needs to start one attempt on its node (picklable, no Ray types).

    ``files`` (shipped mode) seeds the node run directory: relative path -> bytes.
    """

    argv: list[str]
    env: dict[str, str]
    cwd: str  # the controller's worktree
    run_dir: str  # the controller's run directory
    run_id: str
    attempt: int
    header: str
    shipped: bool
    controller_python: str
    checkpoint_sync_s: float
    files: dict[str, bytes] = field(default_factory=dict)


@dataclass
class Pull:
    """One pull's answer: new bytes of append-only files, whole changed files, and the exit."""

    appends: dict[str, bytes]
    snapshots: dict[str, bytes]
    returncode: int | None
    cpu_s: float


class RunActor:
    """The Ray actor of one attempt (created with ``max_concurrency`` > 1: pull and stop overlap).

    Not decorated here so that importing this module never imports Ray; ``RayLauncher`` wraps
    it with ``ray.remote``. Also usable without Ray (tests of the node side).
    """

    def __init__(self, spec: NodeSpec) -> None:
        self.spec = spec
        self._lock = threading.Lock()
        self._tree: ProcessTree | None = None
        self._sentinel: IO[bytes] | None = None
        self._stopped = False
        self._stopping = 0  # stop() calls in progress
        self._close_pending = False  # the last pull is out; close once the stop is done
        self._closed = False
        self._offsets: dict[str, int] = {}
        self._sent: dict[str, tuple[int, int]] = {}  # rel -> (size, mtime_ns) already sent
        self._last_ckpt_sync = time.monotonic()
        self._cpu: dict[int, float] = {}
        self._cpu_at = 0.0
        self._known_appends = {METRICS_FILE, "stdout.log", "stderr.log"}
        self._scanned_at = 0.0
        self.base: Path | None = None  # the attempt's node-local folder (shipped mode)
        if spec.shipped:
            self.base = scratch_root() / "orch-ray" / spec.run_id.replace("/", "__")
            self.run_dir = self.base / "run"
            self.cwd = self.base / "worktree"
        else:
            self.run_dir = Path(spec.run_dir)
            self.cwd = Path(spec.cwd)
        self.paths = RunPaths(self.run_dir)

    def start(self, worktree_zip: bytes | None = None) -> dict[str, Any]:
        """Start the worker (and its sentinel). Returns pid, create_time, node and mode.

        Args:
            worktree_zip: shipped mode: the worktree packed by ``packaging.pack_worktree``
                (Ray resolves the launcher's ObjectRef to these bytes on this node); it is
                unpacked into the attempt's node-local folder, the worker's cwd. None: run in
                the process's current directory (node-side tests).

        Raises:
            LaunchError: the working directory is missing or the interpreter cannot start.
        """
        spec = self.spec
        with self._lock:
            if self._stopped:
                return {"pid": -1, "create_time": 0.0, "node": _node_ip(), "started": False,
                        "node_id": _node_id()}
            self.paths.ensure()
            # The sentinel first: if this actor dies at any point from here on, it cleans up
            # (the worker's tree, and the attempt's node folder).
            self._sentinel = self._start_sentinel()
            try:
                if spec.shipped and worktree_zip is None:
                    self.cwd = Path.cwd()
                elif spec.shipped:
                    assert worktree_zip is not None
                    unpack_worktree(worktree_zip, self.cwd)
                for rel, data in spec.files.items():
                    path = self.run_dir / rel
                    atomic_write_bytes(path, data)
                    st = path.stat()
                    if is_append_only(rel):
                        self._offsets[rel] = st.st_size
                    else:
                        self._sent[rel] = (st.st_size, st.st_mtime_ns)
                argv, env = self._node_command()
                self._tree = launch(
                    argv,
                    cwd=self.cwd,
                    env=env,
                    stdout=self.paths.stdout,
                    stderr=self.paths.stderr,
                    exit_status=self.paths.exit_status(spec.attempt),
                    run_id=spec.run_id,
                    header=spec.header,
                )
            except BaseException:
                self._tell_sentinel("done")
                if self.base is not None:
                    shutil.rmtree(self.base, ignore_errors=True)
                raise
            leader = self._tree.leader
            self._tell_sentinel(f"leader {leader.pid} {leader.create_time!r}")
        import orchestrator

        return {"pid": leader.pid, "create_time": leader.create_time, "node": _node_ip(),
                "node_id": _node_id(), "started": True, "run_dir": str(self.run_dir),
                "cwd": str(self.cwd), "package": str(Path(orchestrator.__file__).parent)}

    def _node_command(self) -> tuple[list[str], dict[str, str]]:
        """The command and environment on this node (paths rewritten when shipped)."""
        spec = self.spec
        swaps: list[tuple[str, str]] = []
        if spec.shipped:
            swaps = sorted(
                [(spec.run_dir, str(self.run_dir)), (spec.cwd, str(self.cwd))],
                key=lambda s: -len(s[0]),
            )

        def rewrite(text: str) -> str:
            for old, new in swaps:
                text = text.replace(old, new)
            return text

        argv = [rewrite(a) for a in spec.argv]
        if spec.shipped and argv and argv[0] == spec.controller_python:
            argv[0] = sys.executable
        env = dict(os.environ) if spec.shipped else {}
        env.update({k: rewrite(v) for k, v in spec.env.items()})
        # Ray decides which GPUs this actor holds; the controller's slot means nothing here.
        env["CUDA_VISIBLE_DEVICES"] = _ray_gpu_ids()
        env.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")  # Ray's GPU ids are NVML (PCI) order
        env.pop(RUN_ID_ENV, None)
        return argv, env

    def _start_sentinel(self) -> IO[bytes]:
        """Start the sentinel that stops this run's processes if the actor dies.

        It detaches itself (double fork: Ray kills an exiting actor's direct children) and
        reads our messages from a pipe; end-of-file on that pipe means this actor is gone.
        Returns the pipe's write end (see ``ray_sentinel._sentinel_main`` for the messages).
        """
        argv = [sys.executable, "-m", "orchestrator.ray_executor.sentinel", "sentinel",
                "--watch-pid", str(os.getpid()), "--run-id", self.spec.run_id]
        argv += ["--exit-status", str(self.paths.exit_status(self.spec.attempt))]
        if self.base is not None:
            argv += ["--remove", str(self.base)]
        env = {k: v for k, v in os.environ.items() if k != RUN_ID_ENV}
        pkg_root = str(Path(__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (pkg_root, env.get("PYTHONPATH", "")) if p)
        with open(self.paths.stderr, "ab") as log:  # its errors land in the run's stderr.log
            proc = subprocess.Popen(
                argv, env=env, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                stderr=log, start_new_session=True, close_fds=True,
            )
        proc.wait()  # the first fork exits at once; the sentinel lives on, detached
        assert proc.stdin is not None
        return proc.stdin

    def _tell_sentinel(self, message: str) -> None:
        pipe = self._sentinel
        if pipe is None or pipe.closed:
            return
        try:
            pipe.write(message.encode() + b"\n")
            pipe.flush()
            if message == "done":
                pipe.close()
        except OSError:  # the sentinel is gone already
            pass

    def _returncode(self) -> int | None:
        with self._lock:
            tree = self._tree
            if tree is None:
                return 0 if self._stopped else None
        if tree.alive():
            return None
        exit_file = self.paths.exit_status(self.spec.attempt)
        if not exit_file.exists() and tree.members(scan_env=False):
            # The wrapper was killed before it could record the worker's end, and the worker
            # runs on: Ray kills a dying actor's direct children (the wrapper), not their
            # descendants. The run is not over until the sentinel has stopped what is left.
            return None
        if tree.returncode is not None and not exit_file.exists():
            return tree.returncode
        return read_exit_status(exit_file)

    def pull(self, wait_s: float = 1.0) -> Pull:
        """Wait up to ``wait_s`` for new bytes or the exit, then return what is new.

        After the worker has exited, the answer holds every changed file of the run directory
        and the node copy is removed (shipped mode): it is the last pull.
        """
        deadline = time.monotonic() + wait_s
        while True:
            rc = self._returncode()
            appends = self._read_appends()
            if appends or rc is not None or time.monotonic() >= deadline:
                break
            time.sleep(0.01)
        snapshots: dict[str, bytes] = {}
        if rc is not None:
            for rel, data in self._read_appends(rescan=True).items():  # written just before exit
                appends[rel] = appends.get(rel, b"") + data
            snapshots = self._read_snapshots(only_latest=False)
            with self._lock:
                self._close_pending = self._stopping > 0
            if not self._close_pending:
                self.close()  # else stop() does, once the whole tree is gone
        elif time.monotonic() - self._last_ckpt_sync >= self.spec.checkpoint_sync_s:
            snapshots = self._read_snapshots(only_latest=True)
            self._last_ckpt_sync = time.monotonic()
        return Pull(appends, snapshots, rc, self._cpu_seconds())

    def _files(self) -> list[str]:
        if not self.spec.shipped or not self.run_dir.is_dir():
            return []  # in place: the controller reads the files itself
        out = []
        for path in self.run_dir.rglob("*"):
            rel = path.relative_to(self.run_dir).as_posix()
            if path.is_file() and not _is_temp(rel):
                out.append(rel)
        return sorted(out)

    def _read_appends(self, *, rescan: bool = False) -> dict[str, bytes]:
        """New bytes of the append-only files. Known files are checked on every call (a stat
        each); the folder is walked for new ones every RESCAN_S, or when ``rescan``."""
        if not self.spec.shipped:
            return {}
        now = time.monotonic()
        if rescan or now - self._scanned_at >= RESCAN_S:
            self._scanned_at = now
            self._known_appends.update(r for r in self._files() if is_append_only(r))
        out: dict[str, bytes] = {}
        for rel in sorted(self._known_appends):
            offset = self._offsets.get(rel, 0)
            try:
                if os.stat(self.run_dir / rel).st_size == offset:
                    continue
                with open(self.run_dir / rel, "rb") as f:
                    f.seek(0, os.SEEK_END)
                    if f.tell() < offset:  # truncated on the node: start over
                        offset = 0
                    f.seek(offset)
                    data = f.read(MAX_CHUNK_BYTES)
            except OSError:
                continue
            if data:
                out[rel] = data
                self._offsets[rel] = offset + len(data)
        return out

    def _read_snapshots(self, *, only_latest: bool) -> dict[str, bytes]:
        out: dict[str, bytes] = {}
        for rel in self._files():
            if is_append_only(rel) or (only_latest and not _is_latest_checkpoint(rel)):
                continue
            path = self.run_dir / rel
            try:
                st = path.stat()
                key = (st.st_size, st.st_mtime_ns)
                if self._sent.get(rel) == key:
                    continue
                out[rel] = path.read_bytes()
                self._sent[rel] = key
            except OSError:
                continue
        return out

    def _cpu_seconds(self) -> float:
        tree = self._tree
        if tree is None or time.monotonic() - self._cpu_at < 1.0:
            return sum(self._cpu.values())
        self._cpu_at = time.monotonic()
        for p in tree.members(scan_env=False):
            try:
                t = p.cpu_times()
                self._cpu[p.pid] = t.user + t.system
            except psutil.Error:
                continue
        return sum(self._cpu.values())

    def stop(self, grace_s: float) -> StopReport:
        """Stop the worker's process tree on this node (processes.stop_trees, in phases).

        The sentinel is dismissed (and the node copy removed) only once the whole tree is
        gone, even if a pull saw the leader exit in the meantime."""
        with self._lock:
            self._stopped = True
            self._stopping += 1
            tree = self._tree
        try:
            if tree is None:
                return StopReport()
            return stop_trees([tree], grace_s=grace_s)[0]
        finally:
            with self._lock:
                self._stopping -= 1
                close = self._stopping == 0 and self._close_pending
            if close:
                self.close()

    def close(self) -> None:
        """Dismiss the sentinel; remove the node copy of the run directory (shipped mode)."""
        if self._closed:
            return
        self._closed = True
        tree = self._tree
        if tree is None or not tree.members(scan_env=False):
            self._tell_sentinel("done")
        # else part of the tree outlived the wrapper: the sentinel is not dismissed, it stops
        # what is left (it does so once it sees the wrapper gone, or this actor)
        if self.base is not None:
            shutil.rmtree(self.base, ignore_errors=True)

    def node_pids(self) -> list[int]:
        """Pids of the worker's live processes on this node (tests and debugging)."""
        tree = self._tree
        return [] if tree is None else sorted(p.pid for p in tree.members(scan_env=True))


def _node_ip() -> str:
    try:
        import ray

        return str(ray.util.get_node_ip_address())
    except Exception:  # not inside Ray (node-side unit tests)
        return "localhost"


def _node_id() -> str:
    """This node's Ray node id (hex), "" outside Ray."""
    try:
        import ray

        if not ray.is_initialized():
            return ""
        return str(ray.get_runtime_context().get_node_id())
    except Exception:  # not inside Ray (node-side unit tests)
        return ""


def _ray_gpu_ids() -> str:
    """The GPUs Ray gave this actor, as CUDA_VISIBLE_DEVICES ("" outside Ray: no GPUs)."""
    try:
        import ray
    except ImportError:
        return ""
    if not ray.is_initialized():  # get_gpu_ids() would start a whole Ray instance
        return ""
    return ",".join(str(g) for g in ray.get_gpu_ids())
