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

- **shipped** (a multi-node cluster, or ``ORCH_RAY_SHIP=1``): the worktree is packed into a
  deterministic zip (packaging.py: the files git would commit, minus .git, results/, runs/,
  data/, .worktrees/, caches and ``ray.runtime_env.excludes``), put in the cluster's object store
  once per content (``ray.put``) and unpacked by the actor into a node-local folder
  (``$ORCH_RAY_SCRATCH`` or the node's temp directory); the orchestrator package travels as the
  job's ``py_modules`` (``job_runtime_env``, given to ``ray.init``). Public Ray APIs only: Ray
  takes a local ``working_dir`` per actor only as a URI its private upload functions make. The
  worker writes to a node-local run directory that is streamed back as above. Paths in the
  command and env that point into the controller's worktree or run directory are rewritten to
  the node's copies, and a leading controller interpreter becomes the node's. Data under
  ``{repo}`` is NOT shipped: put datasets on shared storage (or let the worker build them).
- **in place** (every node of the cluster is this machine, e.g. ``ray.address: local``, or
  ``ORCH_RAY_SHIP=0`` for a cluster on a shared file system): the worker runs in the controller's
  worktree and writes the controller's run directory directly; nothing is copied.

Resume after a crash: a dead actor or node makes ``poll`` return -9, a crash like any other, so
the controller retries with ORCH_RESUME=1 (max_retries). A lost node is named (``ip id8
[custom resources]``) in the run's stderr.log, hence its error on the dashboard, and in the
next attempt's start event. In shipped mode the new attempt's node run directory is seeded with
the controller's copy of metrics.jsonl and checkpoints/latest.* (at most ``checkpoint_sync_s``
old), and the records it re-runs between that checkpoint and the controller's last record are
dropped (each epoch is recorded once); in place, the worker reads its own run directory.
Ray actors die with their driver, so runs do not survive a controller restart: ``attach``
returns None and the restarted controller resumes them from the checkpoints it holds.

References: Ray actors and runtime environments (docs.ray.io, "Actors", "Runtime environments");
Ray Tune's function trainables do the same job in-process (see benchmarks/bench_ray_vs_tune.py).

Layout: this module is the controller side (``RayLauncher``; ``RayRunHandle`` in handle.py);
the actor and what it runs on the node are in node.py (``RunActor``, ``NodeSpec``, ``Pull``),
the sentinel in sentinel.py, the worktree package in packaging.py. Their public names are
re-exported here.
"""

from __future__ import annotations

import json
import os
import re
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orchestrator.errors import LaunchError
from orchestrator.paths import RunPaths
from orchestrator.ray_executor.handle import RayRunHandle, last_recorded
from orchestrator.ray_executor.node import (
    APPEND_SUFFIXES,
    DEAD_ACTOR_CODE,
    MAX_CHUNK_BYTES,
    RESCAN_S,
    SCRATCH_ENV,
    NodeSpec,
    Pull,
    RunActor,
    is_append_only,
)
from orchestrator.ray_executor.packaging import pack_worktree
from orchestrator.reporting import LATEST
from orchestrator.running.launchers import Launcher, LaunchSpec, RunHandle
from orchestrator.running.processes import StopReport

if TYPE_CHECKING:
    from orchestrator.core.config import Plan

__all__ = [
    "APPEND_SUFFIXES",
    "DEAD_ACTOR_CODE",
    "MAX_CHUNK_BYTES",
    "NAMESPACE",
    "RESCAN_S",
    "RESOURCES_ENV",
    "SCRATCH_ENV",
    "SHIP_ENV",
    "WORKING_DIR_EXCLUDES",
    "NodeSpec",
    "Pull",
    "RayLauncher",
    "RayRunHandle",
    "RunActor",
    "is_append_only",
    "job_runtime_env",
    "last_recorded",
]

NAMESPACE = "orchestrator"
SHIP_ENV = "ORCH_RAY_SHIP"  # "1": ship worktrees, "0": use them in place; unset: auto
# A worker's env may carry extra Ray resources for its actor, as JSON ('{"node_b": 1}'), to pin
# it to the nodes that offer them (custom resources of `ray start --resources`).
RESOURCES_ENV = "ORCH_RAY_RESOURCES"
STANDARD_RESOURCES = ("CPU", "GPU", "memory", "object_store_memory")
NODE_DEATH_WAIT_S = 10.0  # how long a failed actor call waits for the GCS to call its node dead
UNAVAILABLE_GRACE_S = 30.0  # how long an actor may stay unavailable before it counts as dead


def package_dir() -> Path:
    """The ``orchestrator`` package directory this controller runs (shipped as py_modules)."""
    return Path(__file__).resolve().parent.parent


def job_runtime_env(runtime_env: dict[str, Any] | None = None) -> dict[str, Any]:
    """The job-level runtime_env a controller's Ray connection needs (for ``ray.init``).

    Ray uploads local ``py_modules`` only for the job (public ``ray.init(runtime_env=...)``):
    the ``orchestrator`` package goes there, so that actors on any node can import it (and
    their workers ``orchestrator.reporting``). The launcher calls ``ray.init`` with this itself;
    code that connects to Ray before creating a ``RayLauncher`` must pass it too.

    Args:
        runtime_env: the plan's ``ray.runtime_env``; its ``py_modules`` join the package.
    """
    modules = [str(package_dir()), *(runtime_env or {}).get("py_modules", [])]
    return {"py_modules": modules}
WORKING_DIR_EXCLUDES = [
    ".git", ".worktrees/", "results/", "runs/", "data/", "__pycache__/", "*.pyc", ".venv/",
    ".mypy_cache/", ".pytest_cache/", ".ruff_cache/",
]


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
        from orchestrator.core.config import RayConfig

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
            kwargs: dict[str, Any] = {"log_to_driver": False, "include_dashboard": False,
                                      "runtime_env": job_runtime_env(self.config.runtime_env)}
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
        if self.ship and not self._owns_ray and not self._job_has_py_modules():
            raise LaunchError(
                "shipped runs need the orchestrator package on every node, but this process "
                "connected to Ray without it",
                hint="connect with ray.init(..., runtime_env="
                "orchestrator.ray_executor.job_runtime_env()), or let the launcher connect",
            )
        self._packages: dict[str, Any] = {}  # sha256 of a worktree zip -> its ObjectRef
        self._node_labels: dict[str, str] = {}  # node id -> label
        self._lost: dict[str, str] = {}  # run key -> label of the node its last attempt lost
        self.lost_nodes: list[tuple[str, str, float]] = []  # (node label, run key, time.time())
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

    def _job_has_py_modules(self) -> bool:
        """Whether the job this process is connected as ships py_modules (the package)."""
        try:
            job_env = self.ray.get_runtime_context().runtime_env
        except Exception:  # an older Ray without it: trust the caller
            return True
        return bool(job_env.get("py_modules"))

    # -- starting ---------------------------------------------------------------------------

    def _runtime_env(self) -> dict[str, Any]:
        """The actor's runtime_env: the plan's (env_vars, pip, ...), public Ray fields only.

        ``excludes`` apply to our own worktree package; ``py_modules`` went to the job's
        runtime_env (``job_runtime_env``): Ray takes local paths there only.
        """
        env = dict(self.config.runtime_env)
        env.pop("excludes", None)
        if self._owns_ray:
            env.pop("py_modules", None)
        return env

    def _worktree_ref(self, cwd: Path) -> Any:
        """The worktree's zip in the object store (``ray.put`` once per distinct content)."""
        excludes = [*WORKING_DIR_EXCLUDES, *self.config.runtime_env.get("excludes", [])]
        digest, data = pack_worktree(cwd, excludes)
        with self._lock:
            ref = self._packages.get(digest)
            if ref is None:
                ref = self._packages[digest] = self.ray.put(data)
        return ref

    def _resources(self, spec: LaunchSpec) -> dict[str, float]:
        """Custom Ray resources the worker asks for (its ``ORCH_RAY_RESOURCES`` env, JSON).

        Raises:
            LaunchError: the value is not a JSON object of numbers.
        """
        text = spec.env.get(RESOURCES_ENV)
        if not text:
            return {}
        try:
            value = json.loads(text)
            if not isinstance(value, dict):
                raise ValueError("not an object")
            return {str(k): float(v) for k, v in value.items()}
        except (ValueError, TypeError) as e:
            raise LaunchError(
                f"{spec.key}: {RESOURCES_ENV}={text!r} is not a JSON object of numbers ({e})",
                hint=f'write it as {RESOURCES_ENV}: \'{{"node_b": 1}}\' in the worker\'s env',
            ) from None

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
        env = {k: v for k, v in env.items() if k != RESOURCES_ENV}
        resources = self._resources(spec)
        recorded_upto = last_recorded(spec.paths.metrics) if self.ship and spec.attempt > 1 \
            else None
        node_spec = NodeSpec(
            argv=list(spec.argv), env=dict(env), cwd=str(spec.cwd),
            run_dir=str(spec.paths.run_dir), run_id=spec.run_id, attempt=spec.attempt,
            header=spec.header, shipped=self.ship, controller_python=sys.executable,
            checkpoint_sync_s=self.checkpoint_sync_s,
            files=self._seed_files(spec.paths) if self.ship else {},
        )
        cls: Any = self.ray.remote(RunActor)
        try:
            package = self._worktree_ref(spec.cwd) if self.ship else None
            actor: Any = cls.options(
                num_cpus=self.config.num_cpus_per_worker,
                num_gpus=self.config.num_gpus_per_worker,
                resources=resources or None,
                max_concurrency=4,
                max_restarts=0,
                name=_actor_name(spec.run_id),
                namespace=NAMESPACE,
                runtime_env=self._runtime_env(),
            ).remote(node_spec)
            ref = actor.start.remote(package)
        except (ValueError, TypeError, OSError, self.ray.exceptions.RayError,
                self.ray.exceptions.RuntimeEnvSetupError) as e:
            raise LaunchError(f"{spec.key}: Ray refused the run: {e}") from None
        handle = RayRunHandle(spec, actor, ref, recorded_upto=recorded_upto,
                              previous_loss=self._lost.pop(spec.key, None))
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
                self._release(handle)
            else:  # find out why off the pump thread (asking the GCS may take seconds)
                threading.Thread(target=self._on_error, args=(handle, kind, e),
                                 name="ray-actor-error", daemon=True).start()
            return
        if kind == "start":
            handle.pid = value["pid"]
            handle.create_time = value["create_time"] or handle.create_time
            handle.node = value["node"]
            handle.node_id = value.get("node_id") or None
            handle.node_label = self._node_label(handle.node_id, handle.node)
            handle.node_cwd = value.get("cwd")
            handle.node_run_dir = value.get("run_dir")
            handle.node_package = value.get("package")
        else:
            handle._unavailable_since = None
            try:
                handle.apply(value)
            except OSError as e:
                handle.error = f"cannot write into {handle.spec.paths.run_dir}: {e}"
        if handle.done.is_set():
            if not handle._stopping:  # else stop() releases it once the tree is gone
                self._release(handle)
            return
        next_ref = handle.actor.pull.remote(self.pull_wait_s)
        with self._lock:
            self._pending[next_ref] = (handle, "pull")

    def _node_label(self, node_id: str | None, ip: str | None) -> str:
        """``ip id8 [custom resources]`` of a node, e.g. ``10.0.0.5 3f2a9c1e [node_b]``."""
        if not node_id:
            return ip or "?"
        if node_id not in self._node_labels:
            custom: list[str] = []
            for n in self.ray.nodes():
                if n.get("NodeID") == node_id:
                    custom = sorted(r for r in n.get("Resources", {})
                                    if r not in STANDARD_RESOURCES and ":" not in r)
            extra = f" [{', '.join(custom)}]" if custom else ""
            self._node_labels[node_id] = f"{ip or '?'} {node_id[:8]}{extra}"
        return self._node_labels[node_id]

    def _on_error(self, handle: RayRunHandle, kind: str, error: BaseException) -> None:
        """A call to the attempt's actor failed (not one we killed): a lost node, an actor
        that is only unavailable for a moment (the pull is retried), or a dead actor."""
        ray = self.ray
        lost = self._node_lost(handle, error)
        if lost is None and kind == "pull" and isinstance(
                error, ray.exceptions.ActorUnavailableError):
            now = time.monotonic()
            handle._unavailable_since = handle._unavailable_since or now
            if now - handle._unavailable_since < UNAVAILABLE_GRACE_S:
                time.sleep(0.5)
                next_ref = handle.actor.pull.remote(self.pull_wait_s)
                with self._lock:
                    self._pending[next_ref] = (handle, "pull")
                return
        if handle._killed:
            handle._finish(DEAD_ACTOR_CODE)
        elif lost is not None:
            handle.node_lost = lost
            with self._lock:
                self._lost[handle.spec.key] = lost
                self.lost_nodes.append((lost, handle.spec.key, time.time()))
            handle._finish(DEAD_ACTOR_CODE, f"Ray node {lost} was lost; attempt "
                           f"{handle.spec.attempt} of {handle.spec.key} ended with it")
        else:
            handle._finish(DEAD_ACTOR_CODE, f"Ray actor of {handle.spec.key} ended: "
                           f"{_first_line(error)}")
        self._release(handle)

    def _node_lost(self, handle: RayRunHandle, error: BaseException) -> str | None:
        """The label of the attempt's node if its actor died because the node is gone (Ray
        says so in the error, or lists the node as dead within NODE_DEATH_WAIT_S); else None."""
        if handle.node_id is None:
            return None
        text = str(error)
        if "ray.kill" in text:  # killed on purpose (by us, or by hand): the node is fine
            return None
        dead = "node has died" in text or "NODE_DIED" in text
        deadline = time.monotonic() + NODE_DEATH_WAIT_S
        while not dead and time.monotonic() < deadline and not self._closing.is_set():
            try:
                alive = {n.get("NodeID"): n.get("Alive") for n in self.ray.nodes()}
            except Exception:  # the GCS is unreachable: no verdict
                break
            if alive.get(handle.node_id) is False:
                dead = True
                break
            time.sleep(0.2)
        return self._node_label(handle.node_id, handle.node) if dead else None

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
                h._stopping = True
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
        for i, h in enumerate(mine):  # the pump applies the final pull; then kill the actor
            if not h.done.wait(timeout=30):
                h._killed = True
                self._kill(h)
                h._finish(DEAD_ACTOR_CODE, "no answer from the actor after the stop")
            if h._stopping:
                h._stopping = False
                self._release(h)
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
        self._packages.clear()  # frees the worktree zips in the object store
        if self._owns_ray:
            self.ray.shutdown()
            self._owns_ray = False


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

