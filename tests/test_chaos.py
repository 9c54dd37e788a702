"""Chaos suite: faults injected into whole races with real git worktrees and real processes.

Every fault the reliability issue lists is injected here, at seeded random moments. The seed is
fixed (CI is reproducible) and shown in pytest's header; ``CHAOS_SEED=random`` explores with a
fresh one, ``CHAOS_SEED=<seed> python -m pytest tests/test_chaos.py -q`` reruns one:

- kill -9 of a worker (the trainer or its launch wrapper) at a random moment: 6 + 2 trials by
  default, 20 + 6 with ``CHAOS_TRIALS=20`` (the count of trainer kills; see ``trial_counts``);
- kill -9 of the controller (the real CLI) at a random moment, then ``run`` again: 4 trials by
  default (one per kind of moment, in a seeded order), 10 with ``CHAOS_TRIALS=20``;
- a worker that ignores SIGTERM, workers whose helpers escape the process group (setsid), on
  every way a run ends (stopped as a loser, exited on its own, crashed and retried);
- a stalled worker, with stall_action warn and restart;
- a full disk under the results directory and the dashboard (a small tmpfs, filled);
- corrupted metric files (garbage, glued partial lines, NaN/inf, non-numeric values, a file
  replaced and one deleted under the controller);
- 200 generated malformed plans (hypothesis).

Only the clock of nothing and the GPU of nothing are faked: every worker is a real process. The
``leak_check`` fixture fails a test if any process it started survives it.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml
from conftest import (
    FAKE_WORKER,
    chaos_seed,
    fake,
    git,
    marked_processes,
    run_cli,
    wait_for,
    write_plan,
)
from hypothesis import HealthCheck, example, given, seed, settings
from hypothesis import strategies as st

from orchestrator import cli
from orchestrator.core.config import load_plan
from orchestrator.core.state import PlanState, RunState
from orchestrator.errors import ConfigError
from orchestrator.paths import ResultsPaths
from orchestrator.session import build_controller
from orchestrator.views.dashboard import Dashboard

pytestmark = pytest.mark.slow  # whole races, on purpose; still part of the default suite

SEED = chaos_seed()  # also the plan generator's (hypothesis) seed

FAST = 0.05  # seconds per fake epoch


CHAOS_TRIALS_DEFAULT = 6  # trainer kills in the default run; CHAOS_TRIALS=20 is the long one


def trial_counts() -> tuple[int, int, int]:
    """(trainer kills, launch wrapper kills, controller kills) for this run.

    ``CHAOS_TRIALS=N`` asks for N trainer kills, N*3/10 (rounded up) wrapper kills and N/2
    controller kills, at least 4 so that every kind of moment is hit. The default N=6 keeps
    the default suite short; N=20 is the run docs/reliability.md reports (20, 6, 10).
    """
    value = os.environ.get("CHAOS_TRIALS", "").strip()
    n = int(value) if value else CHAOS_TRIALS_DEFAULT
    if n < 1:
        raise ValueError(f"CHAOS_TRIALS must be a positive number of trials, not {value!r}")
    return n, -(-n * 3 // 10), max(4, n // 2)


def rng_for(name: str) -> random.Random:
    """An independent, reproducible random stream per test."""
    return random.Random(f"{SEED}:{name}")


def _sid(pid: int) -> int | None:
    """The session id of ``pid``, or None once it is gone."""
    try:
        return os.getsid(pid)
    except ProcessLookupError:
        return None


class RaceThread:
    """An in-process Controller running its race on a thread, so the test can inject faults."""

    started: list[RaceThread] = []  # stopped after every test by ``_stop_abandoned_races``

    def __init__(self, plan_path: Path, **kw: Any) -> None:
        self.controller = build_controller(load_plan(plan_path), **kw)
        self.code: int | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        RaceThread.started.append(self)

    def _run(self) -> None:
        try:
            self.code = self.controller.run()
            self.controller.wait_for_views()
        except BaseException as e:  # surfaced by join()
            self.error = e

    def start(self) -> RaceThread:
        self.thread.start()
        return self

    def join(self, timeout: float = 120) -> int:
        self.thread.join(timeout)
        if self.thread.is_alive():
            self.controller.request_interrupt()
            self.thread.join(60)
            raise AssertionError(f"race did not finish within {timeout}s")
        if self.error is not None:
            raise self.error
        assert self.code is not None
        return self.code

    def live(self, worker: str, experiment: str = "race") -> Any:
        return self.controller.runs[f"{experiment}/{worker}"]

    def handle(self, worker: str) -> Any:
        """The worker's current run handle, or None (not loaded, not started, ended)."""
        live = self.controller.runs.get(f"race/{worker}")
        return None if live is None else live.handle


@pytest.fixture(autouse=True)
def _stop_abandoned_races() -> Any:
    """A test that fails mid-race leaves its controller thread running: stop it (and so its
    workers) before the next test starts, or it would relaunch workers into that test."""
    yield
    while RaceThread.started:
        race = RaceThread.started.pop()
        if race.thread.is_alive():
            race.controller.request_interrupt()
            race.thread.join(60)


def contiguous(records: list[dict[str, Any]]) -> list[int]:
    epochs = [r["epoch"] for r in records]
    assert epochs == list(range(1, len(epochs) + 1)), f"epochs lost or duplicated: {epochs}"
    return epochs


def state_of(results: Path) -> PlanState:
    return PlanState.load(ResultsPaths(results).state)


def metric_lines(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def trainer_and_wrapper(live: Any) -> tuple[psutil.Process | None, psutil.Process | None]:
    """The launch wrapper (the run's leader) and the trainer it started."""
    handle = live.handle
    if handle is None:
        return None, None
    wrapper = handle.tree.leader_process()
    if wrapper is None:
        return None, None
    try:
        children = wrapper.children()
    except psutil.NoSuchProcess:
        return None, None
    return (children[0] if children else None), wrapper


# -- kill -9 of a worker ----------------------------------------------------------------------


# the trainer killed (what the OOM killer does); the launch wrapper killed instead (the trainer
# becomes an orphan); the controller killed
WORKER_KILL_TRIALS, WRAPPER_KILL_TRIALS, CONTROLLER_KILL_TRIALS = trial_counts()
PASS_EPOCH = 9  # acc = 0.1 * epoch passes acc >= 0.9 first at epoch 9


@pytest.mark.timeout(600)
def test_worker_kill9_at_random_moments_resumes_and_races_correctly(
    repo: Path, leak_check: str
) -> None:
    """WORKER_KILL_TRIALS trials: SIGKILL the would-be winner's trainer (as the OOM killer
    would) at a random moment before it passes. Each time it is retried with ORCH_RESUME=1,
    resumes from its checkpoint, and wins at exactly the epoch an undisturbed run wins at; the
    history the criteria saw holds every epoch once. WRAPPER_KILL_TRIALS more kill its launch
    wrapper: the orphaned trainer is stopped (SIGTERM, it checkpoints) before the retry
    starts."""
    rng = rng_for("worker-kill")
    orphan_wins = late = trial = 0
    todo = ["trainer"] * WORKER_KILL_TRIALS + ["wrapper"] * WRAPPER_KILL_TRIALS
    rng.shuffle(todo)
    while todo:
        trial += 1
        assert late <= WORKER_KILL_TRIALS // 2, f"{late} kills came too late: machine too loaded"
        kill_after = rng.randint(1, PASS_EPOCH - 2)  # metric lines written before the kill
        jitter = rng.uniform(0, FAST)
        target = todo[-1]
        results = repo / f"results-{trial}"
        plan = write_plan(
            repo,
            [
                {
                    "name": "a",
                    "branch": "r/a",
                    "command": fake(
                        "--epochs", 100, "--interval", FAST, "--metric", "acc=0.1*epoch"
                    ),
                },
                {
                    "name": "b",
                    "branch": "r/b",
                    "command": fake(
                        "--epochs", 300, "--interval", 0.1, "--metric", "acc=0.015*epoch"
                    ),
                },
            ],
            results_dir=str(results.name),
            dashboard=f"{results.name}/PROGRESS.md",
            max_retries=3,
        )
        race = RaceThread(plan).start()
        metrics = ResultsPaths(results).run("race", "a").metrics
        wait_for(lambda m=metrics, k=kill_after: metric_lines(m) >= k, timeout=60, interval=0.005)
        time.sleep(jitter)
        trainer, wrapper = trainer_and_wrapper(race.live("a"))
        victim = trainer if target == "trainer" else wrapper
        written_at_kill = metric_lines(metrics)
        if victim is not None:
            try:
                victim.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:  # it ended between the lookup and the kill: no trial
                victim = None
        code = race.join()
        what = f"trial {trial} (kill the {target} after {kill_after} records + {jitter:.3f}s)"
        state = state_of(results)
        exp = state.experiments["race"]
        assert code == 0 and exp.winner == "a" and exp.winner_epoch == PASS_EPOCH, what
        if victim is None or written_at_kill >= PASS_EPOCH:
            late += 1  # this thread was starved: the race was already won; not a trial
            continue
        todo.pop()
        rec = state.run("race", "a")
        history = race.live("a").history.records
        epochs = contiguous(history)
        assert epochs[-1] >= PASS_EPOCH and rec.state == RunState.succeeded, what
        events = "\n".join(race.controller.events)
        if target == "wrapper" and rec.attempt == 1:
            # the orphaned trainer went on until the controller stopped it (SIGTERM: it
            # checkpoints and exits); its records count, and here they won the race
            assert all(r["resumed"] == 0 for r in history), what
            orphan_wins += 1
            leaked = marked_processes(leak_check)
            assert leaked == [], what + " leaked: " + repr([_describe(p) for p in leaked])
            continue
        if target == "wrapper":
            assert "race/a: stopped processes left behind by the exited attempt" in events, what
        assert rec.attempt == 2, what + events
        # attempt 2 resumed from attempt 1's last checkpoint: right after its last record, or
        # at that record when the kill fell between the metric line and the checkpoint
        paths = ResultsPaths(results).run("race", "a")
        written = [json.loads(line) for line in paths.metrics.read_text().splitlines()]
        last_of_first = max(r["epoch"] for r in written if r["resumed"] == 0)
        stdout = paths.stdout.read_text()
        if "resumed at epoch " in stdout:
            resumed_at = int(stdout.split("resumed at epoch ")[1].split()[0])
        else:  # killed before its first checkpoint was written: nothing to resume, start over
            assert last_of_first == 1, what + stdout
            resumed_at = 1
        assert last_of_first >= kill_after, what
        assert resumed_at in (last_of_first, last_of_first + 1), what
        assert all(r["resumed"] == (r["epoch"] >= resumed_at) for r in history), what
        assert state.run("race", "b").state == RunState.stopped, what
        leaked = marked_processes(leak_check)
        assert leaked == [], what + " leaked: " + repr([_describe(p) for p in leaked])
    print(
        f"worker kills: {WORKER_KILL_TRIALS} trainers and {WRAPPER_KILL_TRIALS} launch wrappers "
        f"killed; {orphan_wins} orphaned trainers won before their retry started; {late} kills "
        "too late (not counted)"
    )


# -- kill -9 of the controller ----------------------------------------------------------------


GUARD = textwrap.dedent(
    """
    # Runs a worker under an exclusive lock on its run directory; a second live copy of the same
    # worker cannot take it and leaves a DUPLICATE note instead. exec keeps the lock's file
    # description open in the worker itself, until its last process is gone.
    import fcntl, os, sys, time
    run_dir = os.environ["ORCH_RUN_DIR"]
    fd = os.open(os.path.join(run_dir, "guard.lock"), os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        with open(os.path.join(run_dir, "DUPLICATE"), "a") as f:
            f.write(f"pid {os.getpid()} attempt {os.environ.get('ORCH_ATTEMPT')}\\n")
        sys.exit(99)
    with open(os.path.join(run_dir, "attempts.log"), "a") as f:
        f.write(f"{os.environ.get('ORCH_ATTEMPT')} {os.getpid()} {time.time():.3f}\\n")
    os.set_inheritable(fd, True)
    os.execv(sys.executable, [sys.executable, *sys.argv[1:]])
    """
)

@pytest.mark.timeout(600)
def test_controller_kill9_at_random_moments_then_run_again(repo: Path, leak_check: str) -> None:
    """CONTROLLER_KILL_TRIALS trials: SIGKILL the CLI controller at a random moment (before
    launch, mid-race, during the losers' stop, after the end), then `run` again. Every rerun
    re-attaches to the workers still alive (pid + create time), finishes with the undisturbed
    race's winner and epoch, never runs a worker twice at once (an flock held by each worker
    process proves it), and leaves no process behind."""
    guard = repo.parent / "guard.py"
    guard.write_text(GUARD)
    rng = rng_for("controller-kill")

    def plan_for(results: str) -> Path:
        return write_plan(
            repo,
            [
                {
                    "name": "a",
                    "branch": "r/a",
                    "command": [
                        "python",
                        str(guard),
                        *fake("--epochs", 100, "--interval", 0.1, "--metric", "acc=0.15*epoch")[1:],
                    ],
                },
                {
                    "name": "b",
                    "branch": "r/b",
                    "command": [
                        "python",
                        str(guard),
                        *fake(
                            "--epochs",
                            300,
                            "--interval",
                            0.1,
                            "--metric",
                            "acc=0.01*epoch",
                            "--children",
                            1,
                        )[1:],
                    ],
                },
            ],
            results_dir=results,
            dashboard=f"{results}/PROGRESS.md",
            file=f"{results}.yaml",
            grace_s=3,
        )

    # the undisturbed race
    ref = run_cli("run", str(plan_for("reference")), "--plain", cwd=repo)
    assert ref.returncode == 0, ref.stdout + ref.stderr
    want = state_of(repo / "reference").experiments["race"]
    assert (want.winner, want.winner_epoch) == ("a", 6)
    reattached = strays = ended_meanwhile = no_live = 0
    phases = {"start-up": 0, "mid-race": 0, "decided": 0}
    for trial in range(CONTROLLER_KILL_TRIALS):
        # the moment, relative to the race (so a loaded machine does not skew it): during
        # start-up, mid-race after a random epoch of a, or right after the decision (while the
        # losers are being stopped); plus a random jitter. Each round of four trials hits every
        # kind of moment once (mid-race twice), in a seeded order.
        if trial % 4 == 0:
            moments = ["start-up", "mid-race", "mid-race", "decided"]
            rng.shuffle(moments)
        phase = moments[trial % 4]
        epoch = rng.randint(1, 4)
        jitter = rng.uniform(0, 0.3)
        name = f"trial-{trial}"
        plan = plan_for(name)
        started = time.monotonic()
        proc = subprocess.Popen(
            [sys.executable, "-m", "orchestrator", "run", str(plan), "--plain"],
            cwd=repo,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        if phase == "mid-race":
            wait_for(
                lambda n=name, e=epoch, p=proc: (
                    ((s := _try_state(repo / n)) and (s.run("race", "a").epoch or 0) >= e)
                    or p.poll() is not None
                ),
                timeout=60,
            )
        elif phase == "decided":
            wait_for(
                lambda n=name, p=proc: (
                    ((s := _try_state(repo / n)) and s.experiments["race"].winner)
                    or p.poll() is not None
                ),
                timeout=60,
                interval=0.005,
            )
        time.sleep(jitter)
        delay = time.monotonic() - started
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        phases[phase] += 1
        before = _try_state(repo / name)
        alive_before = {
            k: r.pid
            for k, r in (before.runs.items() if before else [])
            if r.state == RunState.running and r.pid and psutil.pid_exists(r.pid)
        }
        again = run_cli("run", str(plan), "--plain", cwd=repo)
        what = (
            f"trial {trial} (controller killed {phase} after {delay:.2f}s; "
            f"running then: {alive_before})"
        )
        assert again.returncode == 0, what + again.stdout + again.stderr
        state = state_of(repo / name)
        got = state.experiments["race"]
        assert (got.winner, got.winner_epoch) == (want.winner, want.winner_epoch), what
        for w in ("a", "b"):
            run_dir = ResultsPaths(repo / name).run("race", w).run_dir
            assert not (run_dir / "DUPLICATE").exists(), what + (run_dir / "DUPLICATE").read_text()
            starts = (
                (run_dir / "attempts.log").read_text().split()
                if (run_dir / "attempts.log").exists()
                else []
            )
            # nobody crashed, so the rerun starts at most one attempt per worker: none for a
            # run it re-attached to or that the race no longer needs (cancelled), one for a run
            # that never started or whose launch the dead controller could not record (the
            # rerun first stops such an untracked attempt, found by its environment tag)
            rec = state.run("race", w)
            earlier = before.runs[f"race/{w}"].attempt if before else 0
            assert earlier <= rec.attempt <= earlier + 1, what
            assert rec.attempt <= max(1, len(starts) // 3 + 1), what
            assert rec.state.terminal, what
            strays += f"race/{w}: stopping" in again.stdout and "untracked" in again.stdout
        # every run alive at the kill was re-attached, unless it ended before the rerun looked
        # (e.g. it was being stopped): then its exit status file settled it
        for key, pid in alive_before.items():
            attempt = before.runs[key].attempt
            if f"{key}: re-attached to pid {pid}" in again.stdout:
                reattached += 1
            else:
                ended = f"{key}: attempt {attempt} ended while no controller ran"
                assert ended in again.stdout, what + again.stdout
                ended_meanwhile += 1
        no_live += not alive_before
        leaked = marked_processes(leak_check)
        assert leaked == [], what + " leaked: " + repr([_describe(p) for p in leaked])
    print(
        f"controller kills: {CONTROLLER_KILL_TRIALS} trials; {reattached} live runs re-attached, "
        f"{ended_meanwhile} ended between the kill and the rerun, {no_live} trials with no live "
        f"run at the kill (before the launch or after the end), {strays} untracked attempts "
        f"(launched, pid not yet saved) stopped; kill moments: {phases}"
    )


def _try_state(results: Path) -> PlanState | None:
    try:
        return state_of(results)
    except Exception:
        return None


# -- SIGTERM-ignoring workers and process-group escapees --------------------------------------


def test_sigterm_ignoring_and_setsid_losers_are_stopped_without_orphans(
    repo: Path, leak_check: str
) -> None:
    plan = write_plan(
        repo,
        [
            {
                "name": "winner",
                "branch": "r/w",
                "command": fake("--epochs", 200, "--interval", FAST, "--metric", "acc=0.02*epoch"),
            },
            {
                "name": "deaf",
                "branch": "r/deaf",
                "command": fake(
                    "--epochs",
                    400,
                    "--interval",
                    FAST,
                    "--metric",
                    "acc=0",
                    "--ignore-sigterm",
                    "--children",
                    2,
                ),
            },
            {
                "name": "escaper",
                "branch": "r/esc",
                "command": fake(
                    "--epochs",
                    400,
                    "--interval",
                    FAST,
                    "--metric",
                    "acc=0",
                    "--setsid-child",
                    "--children",
                    1,
                ),
            },
        ],
        grace_s=1,
    )
    race = RaceThread(plan).start()
    # the setsid helper really escaped: it is in another session than the run's leader
    def escaped() -> bool:  # the helper is born, then calls setsid: wait for both
        h = race.handle("escaper")
        if h is None:
            return False
        members = h.tree.members(scan_env=True)
        return len(members) >= 4 and len({_sid(p.pid) for p in members} - {None}) == 2

    wait_for(escaped)
    handle = race.handle("escaper")
    leader_sid = os.getsid(handle.pid)
    sids = {os.getsid(p.pid) for p in handle.tree.members(scan_env=True)}
    assert len(sids) == 2 and leader_sid in sids
    assert race.join() == 0
    state = state_of(repo / "results")
    assert state.experiments["race"].winner == "winner"
    assert state.run("race", "deaf").state == RunState.stopped
    assert state.run("race", "escaper").state == RunState.stopped
    assert any("deaf: stopping" in e for e in race.controller.events)
    assert marked_processes(leak_check) == []


def test_leftovers_of_runs_that_end_on_their_own_are_stopped(repo: Path, leak_check: str) -> None:
    """A setsid helper outlives its worker when the worker exits by itself (exhausted) or
    crashes (retried): the controller stops it before the slot is reused or the retry starts."""
    plan = write_plan(
        repo,
        [
            {
                "name": "done",
                "branch": "r/done",
                "command": fake(
                    "--epochs", 3, "--interval", FAST, "--metric", "acc=0", "--setsid-child"
                ),
            },
            {
                "name": "crash",
                "branch": "r/crash",
                "command": fake(
                    "--epochs",
                    6,
                    "--interval",
                    FAST,
                    "--metric",
                    "acc=0",
                    "--setsid-child",
                    "--crash-at",
                    2,
                ),
            },
        ],
    )
    race = RaceThread(plan).start()
    assert race.join() == 1  # nobody passes
    state = state_of(repo / "results")
    assert state.run("race", "done").state == RunState.exhausted
    crash = state.run("race", "crash")
    assert crash.state == RunState.exhausted and crash.attempt == 2
    left_behind = [e for e in race.controller.events if "left behind by the exited attempt" in e]
    assert len(left_behind) == 3, race.controller.events  # done once, crash twice
    assert marked_processes(leak_check) == []


# -- stalls -----------------------------------------------------------------------------------


ATTEMPT_ARGS = textwrap.dedent(
    """
    # Runs the fake worker, adding the arguments after '--first' on attempt 1 only.
    import os, sys
    args = sys.argv[1:]
    cut = args.index("--first")
    extra = args[cut + 1:] if os.environ.get("ORCH_ATTEMPT") == "1" else []
    os.execv(sys.executable, [sys.executable, *args[:cut], *extra])
    """
)


def test_stalled_worker_warn_is_flagged_in_state_and_dashboard(repo: Path, leak_check: str) -> None:
    plan = write_plan(
        repo,
        [
            {
                "name": "hung",
                "branch": "r/hung",
                "command": fake(
                    "--epochs", 400, "--interval", FAST, "--metric", "acc=0", "--hang-at", 3
                ),
            },
            {
                "name": "slow",
                "branch": "r/slow",
                "command": fake("--epochs", 400, "--interval", 0.1, "--metric", "acc=0.01*epoch"),
            },
        ],
        stall_timeout_s=2.0,
        stall_action="warn",
        experiment={"max_epochs": 400},
    )
    race = RaceThread(plan).start()
    try:
        wait_for(
            lambda: (s := _try_state(repo / "results")) and s.run("race", "hung").stalled,
            timeout=60,
        )
        dashboard = repo / "PARALLEL_PROGRESS.md"
        wait_for(lambda: dashboard.exists() and "⚠ stalled" in dashboard.read_text(), timeout=30)
        assert race.live("hung").handle is not None  # warn: it keeps running
        assert any("hung: STALLED" in e for e in race.controller.events)
    finally:
        race.controller.request_interrupt()
        race.join()
    assert state_of(repo / "results").run("race", "hung").attempt == 1
    assert marked_processes(leak_check) == []


def test_stalled_worker_restart_is_stopped_and_resumed(repo: Path, leak_check: str) -> None:
    wrapper = repo.parent / "attempt_args.py"
    wrapper.write_text(ATTEMPT_ARGS)
    command = [
        "python",
        str(wrapper),
        str(FAKE_WORKER),
        "--epochs",
        "100",
        "--interval",
        str(FAST),
        "--metric",
        "acc=0.1*epoch",
        "--first",
        "--hang-at",
        "4",
    ]
    plan = write_plan(
        repo,
        [{"name": "w", "branch": "r/w", "command": command}],
        stall_timeout_s=2.0,
        stall_action="restart",
    )
    race = RaceThread(plan).start()
    assert race.join() == 0
    state = state_of(repo / "results")
    rec = state.run("race", "w")
    assert rec.state == RunState.succeeded and rec.attempt == 2
    assert state.experiments["race"].winner_epoch == PASS_EPOCH
    contiguous(race.live("w").history.records)
    events = "\n".join(race.controller.events)
    assert "w: STALLED" in events and "stopping (stalled)" in events
    assert (
        "resumed at epoch 4" in ResultsPaths(repo / "results").run("race", "w").stdout.read_text()
    )
    assert marked_processes(leak_check) == []


# -- a full disk --------------------------------------------------------------------------------


def _mount_tmpfs(path: Path, size: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    out = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
        capture_output=True,
        text=True,
    )
    if out.returncode != 0:
        pytest.skip(
            f"cannot mount a tmpfs here (needs root and mount rights): {out.stderr.strip()}"
        )


def _fill(path: Path) -> Path:
    """Append to a file until the file system is full (ENOSPC); again to top it up."""
    filler = path / "filler.bin"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        for size in (1 << 16, 4096, 1):
            try:
                while True:
                    os.write(fd, b"\0" * size)
            except OSError:
                continue
    finally:
        os.close(fd)
    return filler


def test_full_disk_keeps_last_good_state_and_dashboard_and_keeps_racing(
    repo: Path, leak_check: str, capfd: pytest.CaptureFixture[str]
) -> None:
    """The results directory (state, events, dashboard, plot) is a 2 MiB tmpfs, filled while the
    race runs. Run directories live elsewhere (a symlink), so the workers keep writing. Every
    failed write keeps the previous file intact, the error is reported once per interval, and
    the race goes on and is decided; once space is back the final state is written."""
    results = repo / "results"
    _mount_tmpfs(results, "2m")
    try:
        runs = repo / "rundata"
        runs.mkdir()
        (results / "race").symlink_to(runs, target_is_directory=True)
        plan = write_plan(
            repo,
            [
                {
                    "name": "a",
                    "branch": "r/a",
                    "command": fake(
                        "--epochs", 200, "--interval", FAST, "--metric", "acc=0.01*epoch"
                    ),
                },
                {
                    "name": "b",
                    "branch": "r/b",
                    "command": fake(
                        "--epochs", 200, "--interval", FAST, "--metric", "acc=0.005*epoch"
                    ),
                },
            ],
            dashboard="results/PROGRESS.md",
            dashboard_interval_s=0.1,
            experiment={"max_epochs": 400},
        )
        race = RaceThread(plan).start()
        wait_for(
            lambda: (s := _try_state(results)) and (s.run("race", "a").epoch or 0) >= 3, timeout=60
        )
        # A progress plot being written while the disk fills would fail and delete its temp
        # file, handing its pages back to the next small write: fill only once the first plot
        # is on disk (the next is at least 30 s away), and top up once more after a moment.
        dash = next(v for v in race.controller.views if isinstance(v, Dashboard))
        wait_for(
            lambda: dash.progress_path.exists() and not dash.plot_in_flight(),
            timeout=60,
        )
        filler = _fill(results)
        time.sleep(0.1)
        _fill(results)
        def write_errors() -> int:
            return dash.write_errors.count + race.controller.write_errors.count

        errors_at_fill = write_errors()
        full_at = race.live("a").record.epoch
        time.sleep(0.5)  # several failed writes of each kind
        good_state = (results / "state.json").read_bytes()
        good_dash = (results / "PROGRESS.md").read_bytes()
        # still racing: the controller follows the workers while nothing can be written
        wait_for(lambda: (race.live("a").record.epoch or 0) >= full_at + 10, timeout=60)
        assert write_errors() - errors_at_fill >= 4, capfd.readouterr().err
        assert (results / "state.json").read_bytes() == good_state  # the last good version
        assert (results / "PROGRESS.md").read_bytes() == good_dash
        assert json.loads(good_state)["runs"]["race/a"]["state"] == "running"  # whole, parseable
        assert "race" in good_dash.decode() and len(good_dash) > 200
        # failed atomic writes leave no temp files (one may exist for the instant a write is
        # being tried and fails; it must be gone right after)
        wait_for(lambda: not [p for p in results.iterdir() if p.name.endswith(".tmp")], 5)
        err = capfd.readouterr().err
        assert err.count("warning: cannot write state") == 1, err  # once per interval (a minute)
        assert err.count("warning: cannot write dashboard") == 1, err
        filler.unlink()  # space is back: the race ends and its outcome is saved
        assert race.join() == 0
        state = state_of(results)
        assert (
            state.experiments["race"].winner == "a" and state.experiments["race"].winner_epoch == 90
        )
        assert state.finished
        contiguous(race.live("a").history.records)
        assert "a WINS" in (results / "PROGRESS.md").read_text()
    finally:
        subprocess.run(["umount", "-l", str(results)], capture_output=True)
    assert marked_processes(leak_check) == []


# -- corrupted metric files -------------------------------------------------------------------


CORRUPT_WORKER = textwrap.dedent(
    """
    # Writes metrics.jsonl by hand, with every kind of damage, between good records.
    import json, os, sys, time
    run_dir = os.environ["ORCH_RUN_DIR"]
    path = os.path.join(run_dir, "metrics.jsonl")
    def write(text):
        with open(path, "a") as f:
            f.write(text)
    def good(epoch):
        return json.dumps({"epoch": epoch, "time_s": time.time(), "acc": 0.1 * epoch}) + "\\n"
    before = {  # garbage in front of the epoch's good line
        1: "garbage that is not json\\n",
        3: '{"epoch": "three", "acc": 0.3}\\n',  # no usable epoch ("three": a bad value)
        5: "\\x00\\xff\\xfe binary\\n",
        6: '{"epoch": 6, "ac',  # a writer died mid-line: the good line gets glued to it
        7: "[" * 50000 + "]" * 50000 + "\\n",  # a nesting bomb
    }
    instead = {  # written instead of the epoch's good line
        26: '{"epoch": 26, "acc": NaN, "loss": Infinity}\\n',
        27: '{"epoch": 27, "acc": "high", "note": [1, 2], "time_s": null}\\n',  # 3 bad values
    }
    for epoch in range(1, 40):
        write(before.get(epoch, "") + instead.get(epoch, good(epoch)))
        if epoch == 18:  # the whole file rewritten cleanly and replaced (a new inode)
            tmp = path + ".new"
            with open(tmp, "w") as f:
                f.write("".join(good(e) for e in range(1, 19)))
            os.replace(tmp, path)
        if epoch == 24:  # deleted, then written anew (the worker keeps its history in memory)
            os.unlink(path)
            write("".join(good(e) for e in range(1, 25)))
        time.sleep(0.1)
    """
)


def test_corrupted_metric_files_are_counted_and_reported_never_fatal(
    repo: Path, leak_check: str
) -> None:
    worker = repo.parent / "corrupt.py"
    worker.write_text(CORRUPT_WORKER)
    csv_worker = repo.parent / "csv_corrupt.py"
    csv_worker.write_text(
        textwrap.dedent(
            """
        import os, time
        path = os.path.join(os.environ["ORCH_RUN_DIR"], "metrics.csv")
        with open(path, "w") as f:
            f.write("epoch,acc\\n")
        for epoch in range(1, 200):
            with open(path, "a") as f:
                if epoch == 2:
                    f.write("2,0.\\x001\\n")      # a NUL byte in a cell (ignored)
                elif epoch == 3:
                    f.write("x" * 200000 + "\\n")  # a field over csv's size limit
                f.write(f"{epoch},0.0\\n")
            time.sleep(0.05)
        """
        )
    )
    plan = write_plan(
        repo,
        [
            {"name": "w", "branch": "r/w", "command": ["python", str(worker)]},
            {
                "name": "c",
                "branch": "r/c",
                "command": ["python", str(csv_worker)],
                "metrics": {"source": "csv", "path": "metrics.csv"},
            },
        ],
        criteria=["acc >= 3.0"],
        max_retries=0,
        experiment={"max_epochs": 400},
    )
    race = RaceThread(plan).start()
    assert race.join() == 0
    state = state_of(repo / "results")
    exp = state.experiments["race"]
    assert exp.winner == "w" and exp.winner_epoch == 30
    history = race.live("w").history.records
    contiguous(history)  # every epoch once: also epoch 6, glued to the dead writer's half line
    assert history[25]["acc"] is None and history[25]["loss"] is None  # NaN, inf
    assert "acc" not in history[26] and "note" not in history[26]  # "high", [1, 2]
    problems = dict(state.run("race", "w").metric_problems)
    # garbage, "three", binary, the glued line, the nesting bomb: 5 bad lines (1 salvaged);
    # "three", "high", [1, 2], "time_s": null: 4 bad values; the replacement and the
    # re-creation: a new inode each (or, if the file system reused the inode number, a file
    # shorter than what was read: a truncation)
    new_files = problems.pop("replacements", 0) + problems.pop("truncations", 0)
    assert problems == {"bad_lines": 5, "bad_values": 4, "salvaged": 1} and new_files == 2, problems
    assert any("w: metric file problems" in e for e in race.controller.events)
    c = state.run("race", "c")
    assert c.state == RunState.stopped and c.metric_problems == {"bad_lines": 1}, c.metric_problems
    contiguous(race.live("c").history.records)  # the rows after the oversized one still count
    assert marked_processes(leak_check) == []


# -- malformed plans ----------------------------------------------------------------------------


BASE_PLAN: dict[str, Any] = {
    "gpus": "none",
    "poll_interval_s": 0.5,
    "max_retries": 1,
    "experiments": [
        {
            "name": "race",
            "criteria": ["acc >= 0.9"],
            "max_epochs": 10,
            "workers": [
                {"name": "a", "branch": "r/a", "command": "python train.py --lr 0.1"},
                {
                    "name": "b",
                    "branch": "r/b",
                    "command": ["python", "train.py", "--run", "{run_dir}"],
                },
            ],
        }
    ],
}

junk = st.one_of(
    st.text(max_size=8),
    st.integers(-5, 5),
    st.floats(allow_nan=True),
    st.none(),
    st.booleans(),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)
not_a_string = st.one_of(
    st.integers(), st.floats(), st.none(), st.booleans(), st.lists(st.integers(), max_size=2)
)
bad_name = st.sampled_from(["", "-x", "a b", "a/b", "..", "ä", ".hidden", "x" * 101, "a:b"])
bad_number = st.one_of(
    st.integers(-10, 0),
    st.floats(max_value=0, allow_nan=False),
    st.text(alphabet="abc", min_size=1, max_size=4),
    st.lists(st.integers(), min_size=1, max_size=2),
)
bad_criterion = st.sampled_from(
    [
        "acc >=",
        "acc.real > 1",
        "__import__('os').system('true')",
        "open('/etc/passwd')",
        "acc >= 0.9 and",
        "(acc",
        "acc = 1",
        "lambda: 1",
        "[x for x in y]",
        "acc > 'a'",
        "",
        "acc if 1 else 2",
    ]
)
bad_command = st.sampled_from(
    ["", [], "python 'unclosed", "python train.py {nope}", ["python", "{bogus}"]]
)
bad_branch = st.sampled_from(["", "-x", "a..b", "x/", "has space"])


def _mutations() -> st.SearchStrategy[tuple[str, Any]]:
    """(what, value) pairs; each one alone makes BASE_PLAN invalid."""
    return st.one_of(
        st.tuples(st.just("unknown_top_key"), st.from_regex(r"[a-z]{3,8}_x", fullmatch=True)),
        st.tuples(
            st.sampled_from(
                ["poll_interval_s", "workers_per_gpu", "max_parallel", "stall_timeout_s"]
            ),
            bad_number,
        ),
        st.tuples(
            st.sampled_from(["grace_s", "max_retries", "retry_backoff_s"]),
            st.one_of(st.integers(-9, -1), st.text(alphabet="xyz", min_size=1, max_size=3)),
        ),
        st.tuples(
            st.just("gpus"),
            st.one_of(
                st.sampled_from(["all", "gpu0", ""]),
                st.lists(st.integers(-9, -1), min_size=1, max_size=2),
                st.dictionaries(st.text(max_size=2), st.integers(), min_size=1, max_size=1),
            ),
        ),
        st.tuples(
            st.just("stall_action"),
            st.text(alphabet="abcdefgh", min_size=1, max_size=6).filter(
                lambda s: s not in ("warn",)
            ),
        ),
        st.tuples(
            st.just("experiments"),
            st.one_of(
                st.just([]),
                st.none(),
                st.text(max_size=5),
                st.integers(),
                st.just([None]),
                st.just([{}]),
            ),
        ),
        st.tuples(st.just("exp_name"), bad_name),
        st.tuples(
            st.just("criteria"),
            st.one_of(
                st.just([]),
                bad_criterion.map(lambda c: [c]),
                st.lists(not_a_string, min_size=1, max_size=2),
            ),
        ),
        st.tuples(
            st.sampled_from(["max_epochs", "check_every"]),
            st.one_of(
                st.integers(-5, 0), st.just(2.5), st.text(alphabet="qz", min_size=1, max_size=3)
            ),
        ),
        st.tuples(st.just("exp_unknown_key"), st.from_regex(r"[a-z]{3,8}_y", fullmatch=True)),
        st.tuples(
            st.just("workers"),
            st.one_of(st.just([]), st.none(), st.integers(), st.just([None]), st.just(["a"])),
        ),
        st.tuples(st.just("worker_name"), bad_name),
        st.tuples(st.just("branch"), bad_branch),
        st.tuples(st.just("same_branch"), st.just(None)),
        st.tuples(st.just("duplicate_worker"), st.just(None)),
        st.tuples(st.just("command"), bad_command),
        st.tuples(st.just("drop"), st.sampled_from(["command", "branch", "name"])),
        st.tuples(
            st.just("worker_field"),
            st.tuples(
                st.sampled_from(["priority", "env", "shell", "max_epochs"]),
                st.sampled_from([[1, 2], "not a number", {"k": [1]}, -3]),
            ),
        ),
        st.tuples(
            st.just("metrics"),
            st.sampled_from(
                [
                    {"source": "regex"},
                    {"source": "regex", "pattern": "(unclosed"},
                    {"source": "regex", "pattern": r"loss (\S+)"},
                    {"source": "regex", "pattern": r"loss (?P<loss>\S+)"},
                    {"source": "csv"},
                    {"source": "tensorboard"},
                    {"source": "wandb"},
                    {"source": "jsonl", "pattern": "x"},
                    "metrics.jsonl",
                ]
            ),
        ),
        st.tuples(
            st.just("not_a_mapping"),
            st.one_of(
                st.lists(st.integers(), max_size=2),
                st.integers(),
                st.text(alphabet="abc ", min_size=1, max_size=5),
            ),
        ),
        st.tuples(
            st.just("yaml_syntax"),
            st.sampled_from(
                [
                    "experiments: [\n",
                    "a: b: c\n",
                    "\tgpus: none\n",
                    "x: 'unclosed\n",
                    "- a\nb: c\n",
                    "{{{\n",
                ]
            ),
        ),
    )


def _apply(plan: dict[str, Any], what: str, value: Any) -> Any:
    """Apply one mutation; returns the document to write (may not be a dict any more)."""
    if what == "not_a_mapping":
        return value
    if what == "yaml_syntax":
        return value  # raw text
    if (
        not isinstance(plan.get("experiments"), list)
        or not plan["experiments"]
        or not isinstance(plan["experiments"][0], dict)
    ):
        plan["bogus_key"] = 1  # an earlier mutation broke the structure; keep it invalid
        return plan
    exp = plan["experiments"][0]
    workers = exp.get("workers")
    w = (
        workers[0]
        if isinstance(workers, list) and workers and isinstance(workers[0], dict)
        else None
    )
    if what == "unknown_top_key":
        plan[value] = 1
    elif what in (
        "poll_interval_s",
        "workers_per_gpu",
        "max_parallel",
        "stall_timeout_s",
        "grace_s",
        "max_retries",
        "retry_backoff_s",
        "gpus",
        "stall_action",
        "experiments",
    ):
        plan[what] = value
    elif what == "exp_name":
        exp["name"] = value
    elif what in ("criteria", "max_epochs", "check_every", "workers"):
        exp[what] = value
    elif what == "exp_unknown_key":
        exp[value] = 1
    elif w is None:
        plan["bogus_key"] = 1
    elif what == "worker_name":
        w["name"] = value
    elif what == "branch":
        w["branch"] = value
    elif what == "same_branch":
        rest = workers[1:] if isinstance(workers, list) else []
        other = rest[0] if rest and isinstance(rest[0], dict) else None
        if other is None or "branch" not in w:
            plan["bogus_key"] = 1  # an earlier mutation removed what this one copies
        else:
            other["branch"] = w["branch"]
    elif what == "duplicate_worker":
        workers.append(dict(w))  # type: ignore[union-attr]
    elif what == "command":
        w["command"] = value
    elif what == "drop":
        w.pop(value, None)
    elif what == "worker_field":
        key, bad = value
        if key == "priority" and isinstance(bad, int):
            w[key] = "first"  # any int is a valid priority
        elif key == "env" and isinstance(bad, dict):
            w[key] = bad
        elif key == "env":
            w[key] = bad if not isinstance(bad, dict) else {"k": [1]}
        elif key == "shell" and isinstance(bad, int):
            w[key] = "maybe"
        else:
            w[key] = bad if not (key == "max_epochs" and bad == -3) else 0
    elif what == "metrics":
        w["metrics"] = value
    return plan


@pytest.fixture(scope="module")
def plan_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One git repository for all generated plans (nothing may ever be created in it)."""
    path = tmp_path_factory.mktemp("chaos plans") / "repo"
    path.mkdir()
    git(path, "init", "-q", "-b", "main")
    git(
        path,
        "-c",
        "user.email=t@e",
        "-c",
        "user.name=t",
        "commit",
        "-q",
        "--allow-empty",
        "-m",
        "init",
    )
    return path


@settings(
    max_examples=200,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@seed(SEED)
@given(mutations=st.lists(_mutations(), min_size=1, max_size=3))
@example(mutations=[("drop", "branch"), ("same_branch", None)])  # once broke the generator
def test_malformed_plans_give_one_clear_error_and_create_nothing(
    mutations: list[tuple[str, Any]], plan_repo: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    repo = plan_repo
    doc: Any = json.loads(json.dumps(BASE_PLAN))
    raw: str | None = None
    for what, value in mutations:
        out = _apply(doc if isinstance(doc, dict) else {"experiments": []}, what, value)
        if what == "yaml_syntax":
            raw = value
        else:
            doc = out
    text = raw if raw is not None else yaml.safe_dump(doc, sort_keys=False, allow_unicode=True)
    plan = repo / "plan.yaml"
    plan.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_plan(plan)
    assert str(info.value).strip(), mutations
    capsys.readouterr()
    code = cli.main(["run", str(plan), "--plain"])
    out = capsys.readouterr()
    assert code == 2, (mutations, out)
    lines = out.err.splitlines()
    assert lines and lines[0].startswith("error: "), (mutations, out.err)
    assert sum(line.startswith("error:") for line in lines) == 1, out.err
    assert "Traceback" not in out.err and out.out == "", out
    created = sorted(p.name for p in repo.iterdir() if p.name not in (".git", "plan.yaml"))
    assert created == [], (mutations, created)
    assert not (repo / ".git" / "worktrees").exists()  # no worktree registered
    heads = repo / ".git" / "refs" / "heads"
    assert sorted(p.name for p in heads.iterdir()) == ["main"]  # no branch created either


def test_a_malformed_plan_through_the_real_cli(repo: Path, leak_check: str) -> None:
    """The same, through a real `python -m orchestrator run` process."""
    doc = json.loads(json.dumps(BASE_PLAN))
    doc["experiments"][0]["criteria"] = ["acc.real > 1"]
    doc["experiments"][0]["workers"][0]["branch"] = "-x"
    (repo / "plan.yaml").write_text(yaml.safe_dump(doc))
    out = run_cli("run", "plan.yaml", cwd=repo)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.startswith("error: 2 problems in ") and out.stderr.count("error:") == 1
    assert "Traceback" not in out.stderr
    assert sorted(p.name for p in repo.iterdir()) == [".git", "README.md", "plan.yaml"]


def _describe(proc: psutil.Process) -> tuple[int, str, str]:
    """(pid, status, command line) of a leaked process, for the failure message."""
    try:
        return proc.pid, proc.status(), " ".join(proc.cmdline())[:200]
    except psutil.Error as e:
        return proc.pid, type(e).__name__, ""
