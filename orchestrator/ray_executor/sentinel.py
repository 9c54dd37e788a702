"""The sentinel of a Ray attempt: a detached process that stops the worker's tree when its
actor dies (``python -m orchestrator.ray_executor.sentinel sentinel ...``, run by ``RunActor``)."""

from __future__ import annotations

import argparse
import os
import select
import shutil
import signal
import sys
import time
from pathlib import Path

import psutil

from orchestrator.ray_executor.node import DEAD_ACTOR_CODE
from orchestrator.reporting import atomic_write_json
from orchestrator.running.processes import RUN_ID_ENV, ProcessKey, ProcessTree, stop_trees


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
    never reported, every process carrying the tag; then delete the attempt's node folder.
    """
    p = argparse.ArgumentParser(prog="python -m orchestrator.ray_executor.sentinel sentinel")
    p.add_argument("--watch-pid", type=int, required=True, help="the actor's pid")
    p.add_argument("--run-id", required=True, help="ORCH_RUN_ID of the worker's processes")
    p.add_argument("--exit-status", type=Path, default=None,
                   help="the attempt's exit status file, marked -9 when the actor died")
    p.add_argument("--remove", default=None,
                   help="the attempt's node-local folder, deleted afterwards")
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
    if actor_died and _said_done(buffer):
        return 0  # the actor said "done" and was killed before we read it: a normal end
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


def _said_done(buffer: bytes) -> bool:
    """Whether what is left unread in the pipe from the (now dead) actor holds ``done``.

    The launcher kills an actor right after its last pull, which says ``done`` first; when
    the kill wins the race against our read, the line is still in the pipe.
    """
    while True:
        try:
            ready, _, _ = select.select([0], [], [], 0)
            chunk = os.read(0, 4096) if ready else b""
        except OSError:
            chunk = b""
        if not chunk:
            break
        buffer += chunk
    return any(line.split() == [b"done"] for line in buffer.split(b"\n"))


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
    print("usage: python -m orchestrator.ray_executor.sentinel sentinel --watch-pid PID ...",
          file=sys.stderr)
    sys.exit(2)
