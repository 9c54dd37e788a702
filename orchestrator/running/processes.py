"""Starting runs in their own process session, and stopping whole process trees with psutil.

Orphans come from wrapper scripts and from helpers that call setsid, so a stop works in phases
(shared/DESIGN.md, "Mechanisms"):

1. SIGTERM the leader (the launch wrapper forwards it to the worker, which checkpoints and exits).
2. When the leader is gone or ``grace_s`` has passed: SIGTERM the process group, every recorded
   descendant and every process whose environment carries the run's ORCH_RUN_ID tag.
3. After a short grace: SIGKILL everything left, from a fresh snapshot.
4. Wait until every process is gone (reaped, or a zombie whose parent is not us).

A process is identified by (pid, create_time), never by pid alone: pids are reused.
"""

from __future__ import annotations

import ctypes
import errno
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from orchestrator.errors import LaunchError

RUN_ID_ENV = "ORCH_RUN_ID"
PR_SET_CHILD_SUBREAPER = 36


@dataclass(frozen=True)
class ProcessKey:
    """A process identity that survives pid reuse."""

    pid: int
    create_time: float

    @classmethod
    def of(cls, proc: psutil.Process) -> ProcessKey:
        return cls(proc.pid, proc.create_time())

    def process(self) -> psutil.Process | None:
        """The live process with this identity, or None (gone, reused pid, or a zombie)."""
        try:
            proc = psutil.Process(self.pid)
            if abs(proc.create_time() - self.create_time) > 0.01:
                return None
            if proc.status() == psutil.STATUS_ZOMBIE:
                return None
            return proc
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            return None


def become_subreaper() -> bool:
    """Make this process adopt orphaned descendants (Linux prctl), so it can reap them.

    Only the CLI's controller process does this; it must then reap with ``reap_children``.
    Returns False where unsupported.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def reap_orphans(own: Mapping[int, subprocess.Popen[bytes]]) -> int:
    """Reap exited children without blocking; the ones in ``own`` through their Popen.

    Adopted orphans (see ``become_subreaper``) are reaped here; a child that ``own`` tracks is
    left to ``Popen.poll`` so its return code is not lost. Returns how many were reaped.
    """
    reaped = 0
    while True:
        try:
            info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return reaped
        if info is None:
            return reaped
        popen = own.get(info.si_pid)
        if popen is not None:
            popen.poll()
        else:
            try:
                os.waitpid(info.si_pid, os.WNOHANG)
            except ChildProcessError:
                pass
        reaped += 1


@dataclass
class ProcessTree:
    """The processes of one run: its leader, the descendants seen so far, and its env tag."""

    leader: ProcessKey
    run_id: str
    popen: subprocess.Popen[bytes] | None = None  # set when this controller started it
    seen: dict[int, float] = field(default_factory=dict)  # pid -> create_time
    returncode: int | None = None  # known when we reaped the leader ourselves

    def leader_process(self) -> psutil.Process | None:
        return self.leader.process()

    def alive(self) -> bool:
        """Whether the leader still runs (a zombie counts as dead)."""
        if self.popen is not None and self.returncode is None:
            rc = self.popen.poll()  # waitpid(WNOHANG): a zombie is reaped here
            if rc is None:
                return True  # our own child, not yet exited: no /proc read needed
            self.returncode = rc
        if self.returncode is not None:
            return False
        if self.leader_process() is not None:
            return True
        if self.popen is not None:
            # It exited between the poll above and the check (a zombie now): reap it, so its
            # return code is known and no un-waited Popen is left behind.
            try:
                self.returncode = self.popen.wait(timeout=1.0)
            except subprocess.TimeoutExpired:
                pass
        return False

    def refresh(self) -> None:
        """Record the leader's current descendants (called on every poll while it runs)."""
        proc = self.leader_process()
        if proc is None:
            return
        try:
            for child in proc.children(recursive=True):
                try:
                    self.seen.setdefault(child.pid, child.create_time())
                except psutil.NoSuchProcess:
                    continue
        except psutil.NoSuchProcess:
            return

    def members(self, *, scan_env: bool) -> list[psutil.Process]:
        """A fresh snapshot of every live process of this run (see ``snapshot``)."""
        return snapshot([self], scan_env=scan_env)[0]


def snapshot(trees: list[ProcessTree], *, scan_env: bool) -> list[list[psutil.Process]]:
    """Every live process of each run, from one pass over the process table.

    A process belongs to a run if it is the leader, a descendant of it or of a process recorded
    earlier, in the leader's process group, or (``scan_env``) carries the run's ORCH_RUN_ID in
    its environment. Only processes started after the run's leader can carry the tag, so the
    environment is read for those alone.

    Returns:
        One list per tree, in the order of ``trees``.
    """
    me = os.getpid()
    found: list[dict[int, psutil.Process]] = [{} for _ in trees]

    def add(i: int, proc: psutil.Process) -> None:
        try:
            if proc.pid != me and proc.status() != psutil.STATUS_ZOMBIE:
                found[i][proc.pid] = proc
        except psutil.NoSuchProcess:
            pass

    for i, tree in enumerate(trees):
        roots = [tree.leader_process()]
        roots += [ProcessKey(pid, ct).process() for pid, ct in list(tree.seen.items())]
        for root in roots:
            if root is None:
                continue
            add(i, root)
            try:
                for child in root.children(recursive=True):
                    add(i, child)
                    tree.seen.setdefault(child.pid, child.create_time())
            except psutil.NoSuchProcess:
                continue
    by_group = {t.leader.pid: i for i, t in enumerate(trees)}
    by_tag = {t.run_id: i for i, t in enumerate(trees)}
    oldest = min(t.leader.create_time for t in trees) - 1.0 if trees else 0.0
    uid = os.getuid()
    for proc in psutil.process_iter(["uids", "create_time"]):
        if proc.pid == me:
            continue
        try:
            uids = proc.info["uids"]
            if uids is None or uids.real != uid:
                continue
            owner = by_group.get(os.getpgid(proc.pid))
            if owner is not None:
                add(owner, proc)
                continue
            if scan_env and (proc.info["create_time"] or 0) >= oldest:
                tag = proc.environ().get(RUN_ID_ENV)
                if tag in by_tag:
                    add(by_tag[tag], proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess, OSError):
            continue
    return [list(f.values()) for f in found]


def launch(
    argv: list[str],
    *,
    cwd: Path,
    env: Mapping[str, str],
    stdout: Path,
    stderr: Path,
    exit_status: Path,
    run_id: str,
    header: str = "",
) -> ProcessTree:
    """Start ``argv`` in a new session through the launch wrapper.

    Args:
        argv: the worker's command (no shell unless argv is /bin/sh -c ... on purpose).
        cwd: working directory (the worker's worktree).
        env: the complete environment (nothing is inherited implicitly).
        stdout, stderr: log files, appended to.
        exit_status: where the wrapper writes the exit status JSON.
        run_id: value of ORCH_RUN_ID, the tag used to find escaped processes at stop time.
        header: a line written to both logs before the attempt starts.

    Returns:
        The run's ProcessTree (leader = the wrapper, pid + create time recorded).

    Raises:
        LaunchError: the working directory is missing or the interpreter cannot start.
    """
    if not cwd.is_dir():
        raise LaunchError(f"working directory {cwd} does not exist")
    exit_status.parent.mkdir(parents=True, exist_ok=True)
    exit_status.unlink(missing_ok=True)
    full_env = dict(env)
    full_env[RUN_ID_ENV] = run_id
    wrapper = [sys.executable, "-m", "orchestrator.running._launch", str(exit_status), "--", *argv]
    # The wrapper must import this package even when cwd is another checkout.
    pkg_root = str(Path(__file__).resolve().parent.parent)
    full_env["PYTHONPATH"] = os.pathsep.join(
        p for p in (full_env.get("PYTHONPATH", ""), pkg_root) if p
    )
    with open(stdout, "ab") as out, open(stderr, "ab") as err:
        if header:
            out.write(header.encode() + b"\n")
            err.write(header.encode() + b"\n")
            out.flush()
            err.flush()
        try:
            popen = subprocess.Popen(
                wrapper,
                cwd=cwd,
                env=full_env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                start_new_session=True,
                close_fds=True,
            )
        except OSError as e:
            raise LaunchError(f"cannot start {wrapper[0]}: {e}") from None
    try:
        ctime = psutil.Process(popen.pid).create_time()
    except psutil.NoSuchProcess:
        ctime = time.time()
    return ProcessTree(ProcessKey(popen.pid, ctime), run_id, popen=popen)


def attach(pid: int, create_time: float, run_id: str) -> ProcessTree | None:
    """Re-attach to a run started by an earlier controller, if (pid, create_time) still runs."""
    key = ProcessKey(pid, create_time)
    if key.process() is None:
        return None
    return ProcessTree(key, run_id)


def _signal(procs: Iterable[psutil.Process], sig: int) -> None:
    for proc in procs:
        try:
            proc.send_signal(sig)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except OSError as e:
        if e.errno not in (errno.ESRCH, errno.EPERM):
            raise


@dataclass
class StopReport:
    """What a stop did: how many processes got SIGKILL and whether anything survived."""

    killed: int = 0
    survivors: list[int] = field(default_factory=list)
    duration_s: float = 0.0


def stop_trees(
    trees: list[ProcessTree],
    *,
    grace_s: float,
    kill_wait_s: float = 10.0,
    term_wait_s: float = 1.0,
    poll_s: float = 0.02,
) -> list[StopReport]:
    """Stop several runs at once, in phases (see module docstring), and wait until reaped.

    Args:
        trees: the runs to stop.
        grace_s: how long the leaders get to checkpoint and exit after SIGTERM.
        kill_wait_s: how long to wait for SIGKILLed processes to disappear.
        term_wait_s: grace for the rest of the tree after the leader is gone.

    Returns:
        One StopReport per tree; ``survivors`` lists pids still alive at the end (should be
        empty; a process in uninterruptible sleep can outlive SIGKILL for a while).
    """
    start = time.monotonic()
    reports = [StopReport() for _ in trees]
    for tree in trees:
        tree.refresh()
        leader = tree.leader_process()
        if leader is not None:
            _signal([leader], signal.SIGTERM)
    # Phase 1: the leaders get grace_s to checkpoint and exit.
    deadline = start + grace_s
    next_refresh = 0.0
    while time.monotonic() < deadline and any(_leader_running(t) for t in trees):
        if time.monotonic() >= next_refresh:  # new descendants; a walk per tree is costly
            for t in trees:
                t.refresh()
            next_refresh = time.monotonic() + 0.5
        time.sleep(poll_s)
    # Phase 2: SIGTERM everything else of each tree (group, descendants, tagged).
    members = snapshot(trees, scan_env=True)
    for t, procs in zip(trees, members, strict=True):
        _signal_group(t.leader.pid, signal.SIGTERM)
        _signal(procs, signal.SIGTERM)
    phase2_deadline = time.monotonic() + min(term_wait_s, max(grace_s, 0.05))
    while time.monotonic() < phase2_deadline:
        _reap_own(trees)
        if not any(_alive(p) for procs in members for p in procs):
            break
        time.sleep(poll_s)
    # Phase 3: SIGKILL what is left, from a fresh snapshot.
    fresh = snapshot(trees, scan_env=True)
    for i, t in enumerate(trees):
        left = fresh[i]
        _signal_group(t.leader.pid, signal.SIGKILL)
        _signal(left, signal.SIGKILL)
        reports[i].killed = len(left)
        members[i] = left
    kill_deadline = time.monotonic() + kill_wait_s
    while time.monotonic() < kill_deadline:
        _reap_own(trees)
        if not any(_alive(p) for procs in members for p in procs):
            break
        time.sleep(poll_s)
    _reap_own(trees)
    for i, procs in enumerate(members):
        reports[i].survivors = [p.pid for p in procs if _alive(p)]
        reports[i].duration_s = time.monotonic() - start
    return reports


def _leader_running(tree: ProcessTree) -> bool:
    _reap_own([tree])
    return tree.alive()


def _reap_own(trees: list[ProcessTree]) -> None:
    for t in trees:
        if t.popen is not None and t.returncode is None:
            rc = t.popen.poll()
            if rc is not None:
                t.returncode = rc


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def find_strays(run_dirs: Mapping[str, set[str]]) -> dict[str, list[psutil.Process]]:
    """Processes of earlier attempts that no controller tracks, by run directory.

    A process belongs to run directory ``d`` if its environment carries ``ORCH_RUN_DIR=d`` and
    an ``ORCH_RUN_ID`` tag (every process an attempt starts inherits both, setsid helpers
    included). Processes whose tag is in ``run_dirs[d]`` (the attempt a controller re-attached
    to) are not strays. Used after a controller restart: an attempt launched just before the
    old controller died (state not yet saved), or the orphaned children of a dead launch
    wrapper, must not keep running next to the attempt that replaces them.

    Args:
        run_dirs: absolute run directory -> the run ids that are legitimately alive there.

    Returns:
        run directory -> live processes (not zombies, not this process) that are strays.
    """
    me = os.getpid()
    uid = os.getuid()
    out: dict[str, list[psutil.Process]] = {d: [] for d in run_dirs}
    for proc in psutil.process_iter(["uids"]):
        if proc.pid == me:
            continue
        try:
            uids = proc.info["uids"]
            if uids is None or uids.real != uid:
                continue
            env = proc.environ()
            tag, run_dir = env.get(RUN_ID_ENV), env.get("ORCH_RUN_DIR")
            if tag is None or run_dir not in run_dirs or tag in run_dirs[run_dir]:
                continue
            if proc.status() == psutil.STATUS_ZOMBIE:
                continue
            out[run_dir].append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess, OSError):
            continue
    return out


def stop_processes(
    procs: list[psutil.Process], *, grace_s: float, kill_wait_s: float = 10.0
) -> list[int]:
    """SIGTERM ``procs``, wait up to ``grace_s``, SIGKILL the rest, wait until they are gone.

    Works for processes that are not our children (psutil polls them). Returns the pids still
    alive at the end (should be empty).
    """
    if not procs:
        return []
    _signal(procs, signal.SIGTERM)
    alive = _wait_gone(procs, max(grace_s, 0.05))
    _signal(alive, signal.SIGKILL)
    return [p.pid for p in _wait_gone(alive, kill_wait_s)]


def _wait_gone(
    procs: list[psutil.Process], timeout_s: float, poll_s: float = 0.02
) -> list[psutil.Process]:
    """Wait until every process is gone or a zombie (someone else reaps it); the rest."""
    deadline = time.monotonic() + timeout_s
    alive = [p for p in procs if _alive(p)]
    while alive and time.monotonic() < deadline:
        time.sleep(poll_s)
        alive = [p for p in alive if _alive(p)]
    return alive
