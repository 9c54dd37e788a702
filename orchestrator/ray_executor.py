"""``executor: ray``: each run becomes a Ray actor that runs the worker command on a cluster node.

The controller, criteria, dashboard, state and sync are unchanged: this module is one more
``Launcher`` (see launchers.py). Per attempt:

1. ``RayLauncher.start`` creates a ``RunActor`` that reserves ``ray.num_cpus_per_worker`` CPUs
   and ``ray.num_gpus_per_worker`` GPUs (Ray sets the actor's CUDA_VISIBLE_DEVICES; the worker
   gets exactly those). The call returns at once; the actor may wait for resources.
2. On the node the actor starts the worker through ``processes.launch`` (its own session, the
   ORCH_RUN_ID tag, the launch wrapper that writes the exit status), with the same environment
   contract as a local run, plus a tiny *sentinel* process that stops the worker's process tree
   if the actor dies (``ray.kill``, OOM, a crash), so a dead actor leaves no orphans.
3. The launcher's pump thread long-polls every actor (``RunActor.pull``): new bytes of the
   append-only files (metrics.jsonl, stdout.log, stderr.log, any ``*.jsonl``/``*.log``/``*.csv``
   and TensorBoard event files) are appended to the controller's run directory as they arrive, so
   the controller's metric tailer and its file-event wake-up work unchanged. The latest
   checkpoint (``checkpoints/latest.*``) is copied back at most every ``checkpoint_sync_s``.
4. When the worker exits (on its own or stopped), the last pull returns every published file
   of the node's run directory (numbered checkpoints, evals/, reports, the exit status) and the
   launcher kills the actor, which frees its CPUs/GPUs.

Two ways to give the worker its files, chosen once per launcher:

- **shipped** (a multi-node cluster, or ``ORCH_RAY_SHIP=1``): the worktree travels as the actor's
  ``runtime_env.working_dir`` (excluding .git, results/, runs/, data/, .worktrees/, caches;
  Ray also honours the worktree's .gitignore), the orchestrator package as ``py_modules``; the
  worker writes to a node-local run directory that is streamed back as above. Paths in the
  command and env that point into the controller's worktree or run directory are rewritten to
  the node's copies, and a leading controller interpreter becomes the node's. Data under
  ``{repo}`` is NOT shipped: put datasets on shared storage (or let the worker build them).
- **in place** (every node of the cluster is this machine, e.g. ``ray.address: local``, or
  ``ORCH_RAY_SHIP=0`` for a cluster on a shared file system): the worker runs in the controller's
  worktree and writes the controller's run directory directly; nothing is copied.

Resume after a crash: a dead actor or node makes ``poll`` return -9, a crash like any other, so
the controller retries with ORCH_RESUME=1 (max_retries). In shipped mode the new attempt's node
run directory is seeded with the controller's copy of metrics.jsonl and checkpoints/latest.*
(at most ``checkpoint_sync_s`` old); in place, the worker reads its own run directory.
Ray actors die with their driver, so runs do not survive a controller restart: ``attach``
returns None and the restarted controller resumes them from the checkpoints it holds.

References: Ray actors and runtime environments (docs.ray.io, "Actors", "Runtime environments");
Ray Tune's function trainables do the same job in-process (see benchmarks/bench_ray_vs_tune.py).
"""

from __future__ import annotations

import argparse
import inspect
import logging
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import psutil

from .errors import LaunchError
from .launchers import Launcher, LaunchSpec, RunHandle, read_exit_status
from .paths import RunPaths
from .processes import RUN_ID_ENV, ProcessKey, ProcessTree, StopReport, launch, stop_trees
from .reporting import (
    CHECKPOINT_DIR,
    LATEST,
    METRICS_FILE,
    atomic_write_bytes,
    atomic_write_json,
)

if TYPE_CHECKING:
    from .config import Plan

NAMESPACE = "orchestrator"
SHIP_ENV = "ORCH_RAY_SHIP"  # "1": ship worktrees, "0": use them in place; unset: auto
WORKING_DIR_EXCLUDES = [
    ".git", ".worktrees/", "results/", "runs/", "data/", "__pycache__/", "*.pyc", ".venv/",
    ".mypy_cache/", ".pytest_cache/", ".ruff_cache/",
]
APPEND_SUFFIXES = (".jsonl", ".log", ".csv")
DEAD_ACTOR_CODE = -9  # what poll() returns for a run whose actor or node died
MAX_CHUNK_BYTES = 8 << 20  # per file and pull, so one pull never carries a whole huge log
RESCAN_S = 0.25  # how often a pull looks for new append-only files in the node run directory


def is_append_only(rel: str) -> bool:
    """Whether a run-directory file grows by appends (streamed as new bytes, not whole)."""
    name = rel.rsplit("/", 1)[-1]
    return name.endswith(APPEND_SUFFIXES) or name.startswith("events.out.tfevents")


def _is_temp(rel: str) -> bool:
    name = rel.rsplit("/", 1)[-1]
    return name.startswith(".") or name.endswith(".tmp")


def _is_latest_checkpoint(rel: str) -> bool:
    return rel.startswith(f"{CHECKPOINT_DIR}/{LATEST}.")


# -- the node side --------------------------------------------------------------------------


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
        self._closed = False
        self._offsets: dict[str, int] = {}
        self._sent: dict[str, tuple[int, int]] = {}  # rel -> (size, mtime_ns) already sent
        self._last_ckpt_sync = time.monotonic()
        self._cpu: dict[int, float] = {}
        self._cpu_at = 0.0
        self._known_appends = {METRICS_FILE, "stdout.log", "stderr.log"}
        self._scanned_at = 0.0
        if spec.shipped:
            safe = spec.run_id.replace("/", "__")
            self.run_dir = Path(tempfile.gettempdir()) / "orch-ray" / safe
            self.cwd = Path.cwd()  # Ray made the shipped worktree our working directory
        else:
            self.run_dir = Path(spec.run_dir)
            self.cwd = Path(spec.cwd)
        self.paths = RunPaths(self.run_dir)

    def start(self) -> dict[str, Any]:
        """Start the worker (and its sentinel). Returns pid, create_time, node and mode.

        Raises:
            LaunchError: the working directory is missing or the interpreter cannot start.
        """
        spec = self.spec
        with self._lock:
            if self._stopped:
                return {"pid": -1, "create_time": 0.0, "node": _node_ip(), "started": False}
            self.paths.ensure()
            for rel, data in spec.files.items():
                path = self.run_dir / rel
                atomic_write_bytes(path, data)
                st = path.stat()
                if is_append_only(rel):
                    self._offsets[rel] = st.st_size
                else:
                    self._sent[rel] = (st.st_size, st.st_mtime_ns)
            argv, env = self._node_command()
            # The sentinel first: if this actor dies at any point from here on, it cleans up.
            self._sentinel = self._start_sentinel()
            try:
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
                raise
            leader = self._tree.leader
            self._tell_sentinel(f"leader {leader.pid} {leader.create_time!r}")
        return {"pid": leader.pid, "create_time": leader.create_time, "node": _node_ip(),
                "started": True, "run_dir": str(self.run_dir), "cwd": str(self.cwd)}

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
        env.pop(RUN_ID_ENV, None)
        return argv, env

    def _start_sentinel(self) -> IO[bytes]:
        """Start the sentinel that stops this run's processes if the actor dies.

        It detaches itself (double fork: Ray kills an exiting actor's direct children) and
        reads our messages from a pipe; end-of-file on that pipe means this actor is gone.
        Returns the pipe's write end (see ``_sentinel_main`` for the messages).
        """
        argv = [sys.executable, "-m", "orchestrator.ray_executor", "sentinel",
                "--watch-pid", str(os.getpid()), "--run-id", self.spec.run_id]
        argv += ["--exit-status", str(self.paths.exit_status(self.spec.attempt))]
        if self.spec.shipped:
            argv += ["--remove", str(self.run_dir)]
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
            self.close()
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
        """Stop the worker's process tree on this node (processes.stop_trees, in phases)."""
        with self._lock:
            self._stopped = True
            tree = self._tree
        if tree is None:
            return StopReport()
        return stop_trees([tree], grace_s=grace_s)[0]

    def close(self) -> None:
        """Dismiss the sentinel; remove the node copy of the run directory (shipped mode)."""
        if self._closed:
            return
        self._closed = True
        self._tell_sentinel("done")
        if self.spec.shipped:
            shutil.rmtree(self.run_dir, ignore_errors=True)

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


def _ray_gpu_ids() -> str:
    """The GPUs Ray gave this actor, as CUDA_VISIBLE_DEVICES ("" outside Ray: no GPUs)."""
    try:
        import ray
    except ImportError:
        return ""
    if not ray.is_initialized():  # get_gpu_ids() would start a whole Ray instance
        return ""
    return ",".join(str(g) for g in ray.get_gpu_ids())


# -- the controller side --------------------------------------------------------------------


class RayRunHandle(RunHandle):
    """One attempt running in a Ray actor; the launcher's pump thread feeds it.

    ``pid`` is the launch wrapper's pid on its node once the actor started it, -1 before.
    """

    def __init__(self, spec: LaunchSpec, actor: Any, start_ref: Any) -> None:
        self.spec = spec
        self.actor = actor
        self.start_ref = start_ref  # ObjectRef of RunActor.start()
        self.pid: int | None = -1
        self.create_time: float | None = time.time()
        self.node: str | None = None  # the node's IP, once started
        self.node_cwd: str | None = None  # where the worker runs on the node
        self.node_run_dir: str | None = None  # where it writes there
        self.error: str | None = None
        self.done = threading.Event()  # set once the final pull (or the death) is applied
        self._returncode: int | None = None
        self._cpu_s = 0.0
        self._killed = False

    def poll(self) -> int | None:
        return self._returncode if self.done.is_set() else None

    def refresh(self) -> None:
        """Nothing to do per tick: the launcher's pump thread appends new bytes as they arrive
        (which wakes the controller through its file watcher)."""

    def cpu_seconds(self) -> float:
        return self._cpu_s

    def apply(self, pull: Pull) -> None:
        """Append streamed bytes and write whole files into the controller's run directory."""
        run_dir = self.spec.paths.run_dir
        for rel, data in pull.appends.items():
            path = run_dir / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "ab") as f:
                f.write(data)
        for rel, data in pull.snapshots.items():
            atomic_write_bytes(run_dir / rel, data)
        self._cpu_s = max(self._cpu_s, pull.cpu_s)
        if pull.returncode is not None:
            self._finish(pull.returncode)

    def _finish(self, returncode: int, error: str | None = None) -> None:
        if self.done.is_set():
            return
        self._returncode = returncode
        self.error = error
        if error:
            with open(self.spec.paths.stderr, "ab") as f:
                f.write(f"orchestrator: {error}\n".encode())
        self.done.set()


class RayLauncher(Launcher):
    """Runs each attempt in a Ray actor (see the module docstring).

    Args:
        plan: the plan; ``plan.ray`` gives address, runtime_env and per-run resources.
        ship: ship worktrees (True) or use them in place (False); None: ORCH_RAY_SHIP, else
            ship unless every node of the cluster is this machine.
        checkpoint_sync_s: how often (at most) the latest checkpoint is copied back while a
            run is alive (shipped mode); the final files always come back at the end.
        pull_wait_s: how long one long-poll waits on the node for new bytes.

    Raises:
        LaunchError: Ray is not installed, the cluster cannot be reached, or runtime_env sets
            working_dir (the executor sets it per run).
    """

    def __init__(
        self,
        plan: Plan,
        *,
        ship: bool | None = None,
        checkpoint_sync_s: float = 10.0,
        pull_wait_s: float = 1.0,
    ) -> None:
        try:
            import ray
        except ImportError:
            raise LaunchError(
                "executor: ray needs Ray, which is not installed",
                hint='pip install -e ".[ray]"',
            ) from None
        from .config import RayConfig

        self.ray = ray
        self.config = plan.ray or RayConfig()
        self.plan = plan
        self.checkpoint_sync_s = checkpoint_sync_s
        self.pull_wait_s = pull_wait_s
        if "working_dir" in self.config.runtime_env:
            raise LaunchError(
                "ray.runtime_env.working_dir is set per run from the worker's worktree",
                hint="remove working_dir from ray.runtime_env in the plan",
            )
        self._owns_ray = False
        if not ray.is_initialized():
            address = self.config.address
            kwargs: dict[str, Any] = {"log_to_driver": False, "include_dashboard": False}
            try:
                if address == "local":
                    ray.init(**kwargs)
                else:
                    ray.init(address=address, **kwargs)
            except (ConnectionError, RuntimeError, ValueError) as e:
                raise LaunchError(
                    f"cannot connect to the Ray cluster at {address!r}: {e}",
                    hint="start one (`ray start --head`, `ray up cluster.yaml`, KubeRay) or set "
                    "ray.address: local to start a one-machine instance",
                ) from None
            self._owns_ray = True
        if ship is None and os.environ.get(SHIP_ENV) in ("0", "1"):
            ship = os.environ[SHIP_ENV] == "1"
        self.ship = self._all_nodes_here() is False if ship is None else ship
        self._scratch = tempfile.mkdtemp(prefix="orch-ray-upload-")
        self._handles: list[RayRunHandle] = []
        self._pending: dict[Any, tuple[RayRunHandle, str]] = {}  # ObjectRef -> (handle, kind)
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._pump = threading.Thread(target=self._pump_loop, name="ray-pump", daemon=True)
        self._pump.start()

    def _all_nodes_here(self) -> bool:
        here = self.ray.util.get_node_ip_address()
        nodes = [n for n in self.ray.nodes() if n.get("Alive")]
        return bool(nodes) and all(n.get("NodeManagerAddress") == here for n in nodes)

    # -- starting ---------------------------------------------------------------------------

    def _runtime_env(self, spec: LaunchSpec) -> dict[str, Any]:
        """The actor's runtime_env: the plan's, plus (shipped) the worktree and this package.

        Ray uploads local directories only for a job-level runtime_env (ray.init), so each
        worktree is zipped and stored in the cluster's GCS here, with the same functions
        ray.init uses (content-addressed: an unchanged worktree is uploaded once), and the
        actor gets the resulting ``gcs://`` URIs.
        """
        env = dict(self.config.runtime_env)
        if not self.ship:
            return env
        from ray._private.runtime_env.py_modules import upload_py_modules_if_needed
        from ray._private.runtime_env.working_dir import upload_working_dir_if_needed

        env["working_dir"] = str(spec.cwd)
        env["excludes"] = [*WORKING_DIR_EXCLUDES, *env.get("excludes", [])]
        package = str(Path(__file__).resolve().parent)  # this orchestrator package
        env["py_modules"] = [*env.get("py_modules", []), package]
        kwargs: dict[str, Any] = {"scratch_dir": self._scratch, "logger": _quiet_logger()}
        if "include_gitignore" in inspect.signature(upload_working_dir_if_needed).parameters:
            kwargs["include_gitignore"] = (
                os.environ.get("RAY_RUNTIME_ENV_IGNORE_GITIGNORE", "0") != "1"
            )  # as ray.init decides it (older Rays always honour .gitignore)
        env = upload_py_modules_if_needed(env, **kwargs)
        env = upload_working_dir_if_needed(env, **kwargs)
        env.pop("excludes", None)
        return env

    def _seed_files(self, paths: RunPaths) -> dict[str, bytes]:
        """What a shipped attempt needs from the controller's run directory to resume."""
        files: dict[str, bytes] = {}
        wanted = [paths.metrics, *sorted(paths.checkpoints.glob(f"{LATEST}.*"))]
        for path in wanted:
            if path.is_file():
                files[path.relative_to(paths.run_dir).as_posix()] = path.read_bytes()
        return files

    def start(self, spec: LaunchSpec) -> RayRunHandle:
        """Create the attempt's actor and ask it to start the worker; returns at once.

        Raises:
            LaunchError: the worktree is missing or Ray refuses the actor (bad runtime_env).
        """
        if not spec.cwd.is_dir():
            raise LaunchError(f"working directory {spec.cwd} does not exist")
        spec.paths.ensure()
        # Only what the controller added to its own environment travels: the node keeps its
        # own PATH, HOME, etc. (in place, the node is this machine: take it all).
        env = spec.env if not self.ship else {
            k: v for k, v in spec.env.items() if os.environ.get(k) != v
        }
        node_spec = NodeSpec(
            argv=list(spec.argv), env=dict(env), cwd=str(spec.cwd),
            run_dir=str(spec.paths.run_dir), run_id=spec.run_id, attempt=spec.attempt,
            header=spec.header, shipped=self.ship, controller_python=sys.executable,
            checkpoint_sync_s=self.checkpoint_sync_s,
            files=self._seed_files(spec.paths) if self.ship else {},
        )
        cls: Any = self.ray.remote(RunActor)
        try:
            actor: Any = cls.options(
                num_cpus=self.config.num_cpus_per_worker,
                num_gpus=self.config.num_gpus_per_worker,
                max_concurrency=4,
                max_restarts=0,
                name=_actor_name(spec.run_id),
                namespace=NAMESPACE,
                runtime_env=self._runtime_env(spec),
            ).remote(node_spec)
            ref = actor.start.remote()
        except (ValueError, TypeError, OSError, self.ray.exceptions.RayError,
                self.ray.exceptions.RuntimeEnvSetupError) as e:
            raise LaunchError(f"{spec.key}: Ray refused the run: {e}") from None
        handle = RayRunHandle(spec, actor, ref)
        with self._lock:
            self._handles.append(handle)
            self._pending[ref] = (handle, "start")
        return handle

    def attach(self, key: str, pid: int, create_time: float, run_id: str, paths: RunPaths,
               attempt: int) -> RayRunHandle | None:
        """Ray actors die with the controller that owns them: nothing to re-attach to."""
        return None

    # -- the pump: long-polls every actor and applies the answers ---------------------------

    def _pump_loop(self) -> None:
        ray = self.ray
        while not self._closing.is_set():
            with self._lock:
                refs = list(self._pending)
            if not refs:
                self._closing.wait(0.02)
                continue
            ready, _ = ray.wait(refs, num_returns=1, timeout=0.05)
            for ref in ready:
                with self._lock:
                    handle, kind = self._pending.pop(ref)
                self._on_ready(handle, kind, ref)

    def _on_ready(self, handle: RayRunHandle, kind: str, ref: Any) -> None:
        ray = self.ray
        try:
            value = ray.get(ref)
        except ray.exceptions.RayError as e:
            if handle._killed:  # we killed it (stop before start, close): not a crash
                handle._finish(DEAD_ACTOR_CODE)
            else:
                handle._finish(DEAD_ACTOR_CODE, f"Ray actor of {handle.spec.key} ended: "
                               f"{_first_line(e)}")
            self._release(handle)
            return
        if kind == "start":
            handle.pid = value["pid"]
            handle.create_time = value["create_time"] or handle.create_time
            handle.node = value["node"]
            handle.node_cwd = value.get("cwd")
            handle.node_run_dir = value.get("run_dir")
        else:
            try:
                handle.apply(value)
            except OSError as e:
                handle.error = f"cannot write into {handle.spec.paths.run_dir}: {e}"
        if handle.done.is_set():
            self._release(handle)
            return
        next_ref = handle.actor.pull.remote(self.pull_wait_s)
        with self._lock:
            self._pending[next_ref] = (handle, "pull")

    def _kill(self, handle: RayRunHandle) -> None:
        try:
            self.ray.kill(handle.actor, no_restart=True)
        except (ValueError, self.ray.exceptions.RayError):  # already gone
            pass

    def _release(self, handle: RayRunHandle) -> None:
        """Kill a finished attempt's actor: frees its CPUs/GPUs on the cluster."""
        handle._killed = True
        self._kill(handle)
        with self._lock:
            if handle in self._handles:
                self._handles.remove(handle)

    # -- stopping ---------------------------------------------------------------------------

    def stop(self, handles: list[RunHandle], grace_s: float) -> list[StopReport]:
        """Stop each run's process tree on its node (in parallel), collect its last files,
        then kill its actor. A run whose actor is already dead reports nothing to kill."""
        ray = self.ray
        mine = [h for h in handles if isinstance(h, RayRunHandle)]
        reports = [StopReport() for _ in mine]
        start = time.monotonic()
        # An actor still creating itself or starting its worker is killed at once: it holds no
        # result yet, and its sentinel (started before the worker) stops whatever it launched.
        # The others stop their trees on their nodes, all at once.
        calls: list[Any] = []
        for h in mine:
            if h.done.is_set():
                calls.append(None)
            elif not ray.wait([h.start_ref], timeout=0)[0]:
                h._killed = True
                self._kill(h)
                calls.append(None)
            else:
                calls.append(h.actor.stop.remote(grace_s))
        for i, (h, ref) in enumerate(zip(mine, calls, strict=True)):
            if ref is None:
                continue
            try:
                reports[i] = ray.get(ref, timeout=max(0.0, start + grace_s + 30 - time.monotonic()))
            except ray.exceptions.GetTimeoutError:
                h._killed = True
                self._kill(h)
                h.error = "the node did not answer the stop; killed its actor"
            except ray.exceptions.RayError as e:  # dead already: its sentinel stopped the tree
                h.error = f"stop on the node failed: {_first_line(e)}"
        for i, h in enumerate(mine):  # the pump applies the final pull, then kills the actor
            if not h.done.wait(timeout=30):
                h._killed = True
                self._kill(h)
                h._finish(DEAD_ACTOR_CODE, "no answer from the actor after the stop")
            reports[i].duration_s = time.monotonic() - start
        return reports

    def close(self) -> None:
        """Kill every remaining actor, end the pump, and shut Ray down if we started it."""
        with self._lock:
            left = list(self._handles)
        for h in left:
            if not h.done.is_set():
                try:
                    self.ray.get(h.actor.stop.remote(self.plan.grace_s),
                                 timeout=self.plan.grace_s + 30)
                except Exception:  # dead already: its sentinel cleans up
                    pass
            h._killed = True
            self._kill(h)
        self._closing.set()
        self._pump.join(timeout=5)
        shutil.rmtree(self._scratch, ignore_errors=True)
        if self._owns_ray:
            self.ray.shutdown()
            self._owns_ray = False


def _quiet_logger() -> logging.Logger:
    """Ray's packaging logs every upload at INFO; keep warnings only."""
    logger = logging.getLogger("orchestrator.ray_executor.upload")
    logger.setLevel(logging.WARNING)
    return logger


def _actor_name(run_id: str) -> str:
    """Ray actor name of a run (unique per attempt), e.g. ``race/a/2/1f3c9e0a``."""
    return f"run:{run_id}"


def _first_line(e: BaseException) -> str:
    """The line of a Ray error that says what went wrong (its last ``...Error: ...`` line)."""
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in str(e).splitlines()]
    lines = [line for line in lines if line]
    if not lines:
        return type(e).__name__
    errors = [line for line in lines if re.match(r"^[\w.]+(Error|Exception|Exit)\b", line)]
    return (errors[-1] if errors else lines[0])[:300]


# -- the sentinel: stops the worker's tree when its actor dies ------------------------------


def _sentinel_main(argv: list[str]) -> int:
    """Stop a run's processes on this node once its actor process is gone.

    Ray kills an actor's process with SIGKILL (``ray.kill``, node OOM, a crash) and, on exit,
    its direct children, but not the worker's descendants (their own session). The sentinel is
    started before the worker, detaches at once (double fork, so it is nobody's direct child)
    and reads lines from stdin, a pipe from the actor:

    - ``leader PID CREATE_TIME``: the worker's launch wrapper, once started;
    - ``done``: the run is over and collected; exit quietly.

    End-of-file without ``done`` (or the actor's pid gone) means the actor died: stop the tree
    (processes.stop_trees: group, descendants and the ORCH_RUN_ID tag), or, if the wrapper was
    never reported, every process carrying the tag; then delete the node run directory.
    """
    p = argparse.ArgumentParser(prog="python -m orchestrator.ray_executor sentinel")
    p.add_argument("--watch-pid", type=int, required=True, help="the actor's pid")
    p.add_argument("--run-id", required=True, help="ORCH_RUN_ID of the worker's processes")
    p.add_argument("--exit-status", type=Path, default=None,
                   help="the attempt's exit status file, marked -9 when the actor died")
    p.add_argument("--remove", default=None, help="node run directory to delete afterwards")
    p.add_argument("--grace-s", type=float, default=5.0)
    p.add_argument("--interval-s", type=float, default=0.1)
    args = p.parse_args(argv)
    try:
        actor = ProcessKey.of(psutil.Process(args.watch_pid))
    except psutil.NoSuchProcess:
        actor = None
    if os.fork() > 0:
        os._exit(0)
    leader: ProcessKey | None = None
    buffer = b""
    actor_died = True
    while actor is not None and actor.process() is not None:
        ready, _, _ = select.select([0], [], [], args.interval_s)
        if ready:
            chunk = os.read(0, 4096)
            if not chunk:
                break  # the actor's end of the pipe closed: it died
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                words = line.decode().split()
                if words == ["done"]:
                    return 0
                if len(words) == 3 and words[0] == "leader":
                    leader = ProcessKey(int(words[1]), float(words[2]))
        if leader is not None and leader.process() is None:
            # The wrapper ended: normally after the worker (nothing is left; the actor will
            # say done), but Ray may have killed it as the actor's child, leaving the worker.
            if ProcessTree(leader, args.run_id).members(scan_env=False):
                actor_died = False
                break
    if leader is not None:
        stop_trees([ProcessTree(leader, args.run_id)], grace_s=args.grace_s)
    else:
        _stop_tagged(args.run_id, args.grace_s)
    if actor_died and args.exit_status is not None:
        # The wrapper wrote 0 if the worker obeyed SIGTERM; but this attempt was cut short,
        # so a controller that reads this file after a restart must resume it, not end it.
        atomic_write_json(args.exit_status, {
            "returncode": DEAD_ACTOR_CODE, "signal": -DEAD_ACTOR_CODE,
            "end_time_s": round(time.time(), 3), "error": "its Ray actor died"})
    if args.remove and (actor is None or actor.process() is None):
        shutil.rmtree(args.remove, ignore_errors=True)
    return 0


def _stop_tagged(run_id: str, grace_s: float) -> None:
    """SIGTERM every process of this user tagged ORCH_RUN_ID=run_id, SIGKILL after grace_s."""

    def tagged() -> list[psutil.Process]:
        found = []
        for proc in psutil.process_iter(["uids"]):
            try:
                uids = proc.info["uids"]  # None when psutil may not read it
                if proc.pid != os.getpid() and uids is not None and uids.real == os.getuid() \
                        and proc.environ().get(RUN_ID_ENV) == run_id:
                    found.append(proc)
            except (psutil.Error, OSError):
                continue
        return found

    for sig in (signal.SIGTERM, signal.SIGKILL):
        procs = tagged()
        for proc in procs:
            try:
                proc.send_signal(sig)
            except psutil.Error:
                pass
        psutil.wait_procs(procs, timeout=grace_s if sig == signal.SIGTERM else 5.0)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "sentinel":
        sys.exit(_sentinel_main(sys.argv[2:]))
    print("usage: python -m orchestrator.ray_executor sentinel --watch-pid PID ...",
          file=sys.stderr)
    sys.exit(2)
