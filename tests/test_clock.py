"""Where time is the subject (retry backoff, stalls, once-a-minute warnings, dashboard
throttling), the controller runs on a fake clock that only the test moves: no sleeps stand in
for minutes, and nothing here asserts on wall time. Workers are still real processes."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import fake, wait_for, write_plan

from orchestrator.core.config import load_plan
from orchestrator.core.controller import Controller
from orchestrator.core.runs import METRIC_PROBLEM_REPORT_S, live_runs
from orchestrator.core.snapshot import RaceSnapshot
from orchestrator.core.state import PlanState, RunRecord, RunState
from orchestrator.errors import WriteErrors
from orchestrator.paths import ResultsPaths
from orchestrator.remote.sync import NullSyncer
from orchestrator.session import build_controller
from orchestrator.views.dashboard import Dashboard

T0 = 1_800_000_000.0
FAST = 0.05  # seconds per fake epoch (real time: the workers are real)


class FakeClock:
    """A clock that stands still until ``advance``; safe to read from any thread."""

    def __init__(self, start: float = T0) -> None:
        self._now = start
        self._lock = threading.Lock()

    def __call__(self) -> float:
        with self._lock:
            return self._now

    def advance(self, seconds: float) -> None:
        with self._lock:
            self._now += seconds


class Race:
    """A controller on a fake clock, run on a thread, with a count of its loop passes."""

    def __init__(self, controller: Controller) -> None:
        self.controller = controller
        self.ticks = 0
        self.code: int | None = None
        tick = controller.tick

        def counted() -> None:
            tick()
            self.ticks += 1

        controller.tick = counted  # type: ignore[method-assign]
        self._thread = threading.Thread(target=self._run, name="controller", daemon=True)

    def _run(self) -> None:
        self.code = self.controller.run()

    def settle(self, passes: int = 3) -> None:
        """Wait until the loop has made ``passes`` more passes (it polls every 0.1 s)."""
        target = self.ticks + passes
        wait_for(lambda: self.ticks >= target or not self._thread.is_alive())

    def run(self, key: str) -> RunRecord:
        return self.controller.runs[key].record

    def events(self, text: str) -> list[str]:
        return [e for e in self.controller.events if text in e]


@contextmanager
def racing(plan_path: Path, clock: FakeClock) -> Iterator[Race]:
    race = Race(build_controller(load_plan(plan_path), clock=clock))
    race._thread.start()
    try:
        wait_for(lambda: race.controller.runs or not race._thread.is_alive())
        yield race
    finally:
        if race._thread.is_alive():
            race.controller.request_interrupt("test over")
        race._thread.join(120)
        race.controller.wait_for_views()
        assert not race._thread.is_alive(), "the controller did not stop"


def test_retry_backoff_doubles_per_attempt_on_the_controller_clock(
    repo: Path, leak_check: str
) -> None:
    plan = write_plan(repo, [
        {"name": "w", "branch": "r/w", "command": fake(
            "--epochs", 4, "--interval", FAST, "--crash-at", 2, "--crash-attempts", 2)},
    ], max_retries=2, retry_backoff_s=1000)
    clock = FakeClock()
    with racing(plan, clock) as race:
        rec = race.run("race/w")
        wait_for(lambda: rec.state == RunState.pending and rec.retry_at is not None)
        assert rec.attempt == 1 and rec.retry_at == clock() + 1000
        race.settle()
        clock.advance(999)
        race.settle()
        assert rec.state == RunState.pending and rec.attempt == 1  # 1 s short of the backoff
        clock.advance(1)
        wait_for(lambda: rec.attempt == 2 and rec.state == RunState.pending and rec.retry_at)
        assert rec.retry_at == clock() + 2000  # 1000 * 2 ** (attempt - 1)
        clock.advance(1999)
        race.settle()
        assert rec.state == RunState.pending and rec.attempt == 2
        clock.advance(1)
        wait_for(lambda: rec.attempt == 3)
        wait_for(lambda: race.code is not None, timeout=60)
    assert race.code == 1 and rec.state == RunState.exhausted and rec.epoch == 4
    assert race.events("retrying with resume in 1000s") and race.events("in 2000s")


@pytest.mark.parametrize("action", ["warn", "restart"])
def test_stall_is_declared_after_stall_timeout_on_the_controller_clock(
    repo: Path, leak_check: str, action: str
) -> None:
    plan = write_plan(repo, [
        {"name": "w", "branch": "r/w", "command": fake(
            "--epochs", 1000, "--interval", FAST, "--hang-at", 3, "--metric", "acc=0")},
    ], stall_timeout_s=100, stall_action=action, retry_backoff_s=500, max_retries=1,
        experiment={"max_epochs": 1000})
    clock = FakeClock()
    with racing(plan, clock) as race:
        rec = race.run("race/w")
        wait_for(lambda: rec.epoch == 2)  # then it hangs: no record for epoch 3
        race.settle()
        clock.advance(99.5)
        race.settle()
        assert not rec.stalled and rec.state == RunState.running
        clock.advance(0.5)
        wait_for(lambda: race.events("STALLED"))
        assert race.events("race/w: STALLED, no metric for 100s")
        if action == "warn":
            assert rec.stalled and rec.state == RunState.running and rec.attempt == 1
        else:  # stopped, then requeued with resume after retry_backoff_s (clock time)
            wait_for(lambda: rec.state == RunState.pending)
            assert rec.resume and rec.retry_at == clock() + 500 and rec.attempt == 1
            clock.advance(500)
            wait_for(lambda: rec.attempt == 2 and rec.state == RunState.running)
    assert race.code == 130


def test_metric_file_problems_are_reported_at_most_once_a_minute(repo: Path) -> None:
    plan = load_plan(write_plan(repo, [{"name": "w", "branch": "r/w", "command": fake()}]))
    live = live_runs(plan, PlanState(str(plan.source)), ResultsPaths(plan.results_dir))["race/w"]
    live.paths.metrics.parent.mkdir(parents=True)

    def garbage_then_read(now: float) -> list[str]:
        with live.paths.metrics.open("a") as f:
            f.write("not json\n")
        return live.read_new(now)[1]

    assert len(garbage_then_read(T0)) == 1
    assert garbage_then_read(T0 + METRIC_PROBLEM_REPORT_S - 0.5) == []  # counted, not reported
    assert live.record.metric_problems == {"bad_lines": 2}
    reported = garbage_then_read(T0 + METRIC_PROBLEM_REPORT_S)
    assert len(reported) == 1 and "bad lines 3" in reported[0]


def test_write_errors_warn_once_a_minute_per_kind(capsys: pytest.CaptureFixture[str]) -> None:
    clock = FakeClock()
    errors = WriteErrors(clock)
    full = OSError(28, "No space left on device")
    assert errors.report("state", full) is True
    clock.advance(59.9)
    assert errors.report("state", full) is False
    assert errors.report("dashboard", full) is True  # another kind has its own minute
    clock.advance(0.1)
    assert errors.report("state", full) is True
    assert errors.count == 4
    assert capsys.readouterr().err.count("warning: cannot write state: No space left") == 2


def test_dashboard_is_rewritten_at_most_every_dashboard_interval(repo: Path) -> None:
    plan = load_plan(write_plan(repo, [{"name": "w", "branch": "r/w", "command": fake()}],
                                dashboard_interval_s=5))
    clock = FakeClock()
    dashboard = Dashboard(plan, ResultsPaths(plan.results_dir), NullSyncer(), clock=clock)
    state = PlanState(str(plan.source))
    state.runs = {}
    events: list[str] = []

    def refresh(force: bool = False) -> str:
        snap = RaceSnapshot(plan=plan, state=state, histories={}, events=list(events),
                            now=clock())
        dashboard.refresh(snap, force=force)
        return plan.dashboard.read_text()

    try:
        assert "event one" not in refresh()
        events.append("12:00:00 event one")
        clock.advance(4.9)
        assert "event one" not in refresh()  # throttled
        clock.advance(0.1)
        assert "event one" in refresh()  # dashboard_interval_s has passed
        events.append("12:00:05 event two")
        assert "event two" in refresh(force=True)  # a decision is never throttled
    finally:
        dashboard.close()
