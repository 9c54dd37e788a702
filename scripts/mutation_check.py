"""Mutation spot-check: does the test suite catch the bugs that matter?

Each mutation is a small text change to orchestrator/ (a grace period skipped, a backoff without
its exponent, a non-atomic write, a watcher that never wakes the loop, a CLI flag dropped...).
The script copies the working tree (tracked and untracked, not ignored files) into a temporary
folder, never touching the checkout, runs the unmutated targeted tests there once (they must
pass), then applies each mutation in turn, runs the tests that should catch it, and prints a
table of caught/survived. A developer tool, not part of CI (a few minutes on 2 cores).

    python scripts/mutation_check.py                 # every mutation
    python scripts/mutation_check.py -k backoff -k grace   # mutations whose name matches
    python scripts/mutation_check.py --list

Exit status: 0 when every mutation was caught, 1 when one survived (or a mutation's text is no
longer in the source: the table says "stale"), 2 when the unmutated tests fail.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutation:
    """One bug: ``edits`` are (file, old text, new text); ``tests`` are pytest node ids."""

    name: str
    edits: tuple[tuple[str, str, str], ...]
    tests: tuple[str, ...]


PROC = "orchestrator/running/processes.py"
CTRL = "orchestrator/core/controller.py"
CLI = "orchestrator/cli/__init__.py"
CLI_COMMANDS = "orchestrator/cli/commands.py"

MUTATIONS = [
    Mutation(
        "stop: SIGKILL at once instead of after grace_s",
        ((PROC, "    deadline = start + grace_s\n", "    deadline = start\n"),),
        ("tests/test_processes.py::test_grace_covers_a_slow_stop_checkpoint_or_sigkill_ends_it",),
    ),
    Mutation(
        "retry backoff without its exponent",
        ((CTRL, "delay = self.plan.retry_backoff_s * (2 ** (rec.attempt - 1))",
          "delay = self.plan.retry_backoff_s"),),
        ("tests/test_clock.py::test_retry_backoff_doubles_per_attempt_on_the_controller_clock",),
    ),
    Mutation(
        "state written in place (no temp file + rename)",
        (("orchestrator/core/state.py", 'atomic_write_bytes(path, (data + "\\n").encode())',
          'path.write_bytes((data + "\\n").encode())'),),
        ("tests/test_state_atomic.py",),
    ),
    Mutation(
        "criteria: >= evaluated as >",
        (("orchestrator/core/criteria.py", "ast.GtE: operator.ge,", "ast.GtE: operator.gt,"),),
        ("tests/test_criteria.py::test_each_comparison_at_and_around_its_threshold",),
    ),
    Mutation(
        "check_every ignored",
        ((CTRL, "return x if every <= 1 or x % every == 0 else None", "return x"),),
        ("tests/test_race.py::test_check_every_and_per_worker_criteria",),
    ),
    Mutation(
        "partial metric lines not buffered",
        (("orchestrator/sources/metrics.py", "data = self.buffer + chunk", "data = chunk"),),
        ("tests/test_metrics.py::test_jsonl_reads_only_new_complete_lines",),
    ),
    Mutation(
        "SIGKILL replaced by SIGTERM",
        ((PROC, "_signal_group(t.leader.pid, signal.SIGKILL)",
          "_signal_group(t.leader.pid, signal.SIGTERM)"),
         (PROC, "_signal(left, signal.SIGKILL)", "_signal(left, signal.SIGTERM)")),
        ("tests/test_processes.py::test_sigterm_ignoring_worker_is_killed_after_grace",),
    ),
    Mutation(
        "inotify disabled (file events never wake the loop)",
        (("orchestrator/core/file_events.py",
          "def on_any_event(self, event: Any) -> None:\n                wake.set()",
          "def on_any_event(self, event: Any) -> None:\n                pass"),),
        ("tests/test_run_modes.py::test_file_events_wake_the_loop_without_waiting_for_the_poll",),
    ),
    Mutation(
        "run --fresh ignored",
        ((CLI, "        fresh=args.fresh,\n", "        fresh=False,\n"),),
        ("tests/test_run_modes.py::test_run_fresh_starts_a_new_race_from_nothing",),
    ),
    Mutation(
        "run --only ignored",
        ((CTRL, "self.only = set(only) if only else None", "self.only = None"),),
        ("tests/test_run_modes.py::test_run_only_leaves_the_other_workers_untouched",),
    ),
    Mutation(
        "rerun --resume ignored",
        ((CLI_COMMANDS, "rec.attempt, resume=args.resume,", "rec.attempt, resume=False,"),),
        ("tests/test_run_modes.py::test_rerun_resume_continues_from_the_latest_checkpoint",),
    ),
    Mutation(
        "stop_losers: false ignored",
        ((CTRL, "        if exp.stop_losers:\n", "        if True:\n"),),
        ("tests/test_run_modes.py::test_stop_losers_false_records_the_winner_and_stops_nobody",),
    ),
    Mutation(
        "stall declared before stall_timeout_s",
        ((CTRL, "if now - since < timeout:", "if now - since < timeout / 2:"),),
        ("tests/test_clock.py::test_stall_is_declared_after_stall_timeout_on_the_controller_clock",),
    ),
    Mutation(
        "metric-problem warning not throttled",
        (("orchestrator/core/runs.py", "if last is None or now - last >= METRIC_PROBLEM_REPORT_S:",
          "if True:"),),
        ("tests/test_clock.py::test_metric_file_problems_are_reported_at_most_once_a_minute",),
    ),
    Mutation(
        "write-error warning not throttled",
        (("orchestrator/errors.py", "if last is not None and now - last < self.interval_s:",
          "if False:"),),
        ("tests/test_clock.py::test_write_errors_warn_once_a_minute_per_kind",),
    ),
    Mutation(
        "a decision's views drawn at once (not after the losers' stops)",
        ((CTRL, "self._flush(force=True, views=False)", "self._flush(force=True, views=True)"),),
        ("tests/test_race.py::test_the_verdict_is_drawn_after_the_stops_or_while_a_slow_one_runs",),
    ),
    Mutation(
        "a decision's views held until every stop ends (a slow loser hides the verdict)",
        ((CTRL, "VIEWS_AFTER_DECISION_S = 1.0", "VIEWS_AFTER_DECISION_S = 600.0"),),
        ("tests/test_race.py::test_the_verdict_is_drawn_after_the_stops_or_while_a_slow_one_runs",),
    ),
    Mutation(
        "rerun --race ignored (runs the live race's branch)",
        ((CLI_COMMANDS, "        if not race.live:\n", "        if False:\n"),),
        ("tests/test_provenance.py::test_rerun_of_an_earlier_race_runs_its_commit_and_leaves_the_race_alone",),
    ),
    Mutation(
        "dashboard not throttled",
        (("orchestrator/views/dashboard.py",
          "and now - self._last_write < self.plan.dashboard_interval_s", "and False"),),
        ("tests/test_clock.py::test_dashboard_is_rewritten_at_most_every_dashboard_interval",),
    ),
    Mutation(
        "Ray actor takes its killed launch wrapper for the worker's exit",
        (("orchestrator/ray_executor/node.py",
          "        if not exit_file.exists() and tree.members(scan_env=False):\n",
          "        if False:\n"),),
        ("tests/test_ray_executor.py::"
         "test_wrapper_killed_with_worker_running_is_not_an_exit_and_the_sentinel_stays",),
    ),
]


def copy_tree(dest: Path) -> None:
    """Tracked and untracked (not ignored) files of the checkout, as they are on disk."""
    out = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT, check=True, capture_output=True,
    ).stdout.decode()
    for rel in filter(None, out.split("\0")):
        src = ROOT / rel
        if not src.is_file():
            continue  # deleted in the working tree
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, target)


def run_tests(copy: Path, tests: tuple[str, ...], timeout_s: float) -> tuple[bool, str]:
    """(passed, last lines of output)."""
    env = {**os.environ, "PYTHONPATH": f"{copy / 'src'}{os.pathsep}{copy}"}
    env.pop("UPDATE_GOLDEN", None)
    argv = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
    try:
        out = subprocess.run(argv, cwd=copy, env=env, capture_output=True, text=True,
                             timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return False, f"timed out after {timeout_s:.0f}s"
    lines = (out.stdout + out.stderr).strip().splitlines()
    return out.returncode == 0, lines[-1] if lines else ""


def apply(copy: Path, mutation: Mutation) -> dict[Path, str] | None:
    """Apply the edits; the original texts to restore, or None if one edit is stale."""
    originals: dict[Path, str] = {}
    for rel, old, new in mutation.edits:
        path = copy / rel
        text = originals.get(path, path.read_text())
        originals.setdefault(path, text)
        current = path.read_text()
        if current.count(old) != 1:
            for p, t in originals.items():
                p.write_text(t)
            return None
        path.write_text(current.replace(old, new))
    return originals


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("-k", action="append", default=[], help="only mutations whose name has this")
    p.add_argument("--list", action="store_true", help="list the mutations and their tests")
    p.add_argument("--timeout-s", type=float, default=300, help="per pytest run")
    args = p.parse_args()
    chosen = [m for m in MUTATIONS if not args.k or any(k in m.name for k in args.k)]
    if args.list:
        for m in chosen:
            print(f"{m.name}\n    " + "\n    ".join(m.tests))
        return 0
    with tempfile.TemporaryDirectory(prefix="mutation-check-") as tmp:
        copy = Path(tmp) / "repo"
        copy_tree(copy)
        all_tests = tuple(dict.fromkeys(t for m in chosen for t in m.tests))
        ok, tail = run_tests(copy, all_tests, args.timeout_s * 2)
        if not ok:
            print(f"the unmutated tests fail; fix them first: {tail}", file=sys.stderr)
            return 2
        print(f"baseline: {len(all_tests)} targeted tests pass unmutated ({tail})\n")
        width = max(len(m.name) for m in chosen)
        print(f"| {'mutation':<{width}} | result   | time  | tests |")
        print(f"|{'-' * (width + 2)}|----------|-------|-------|")
        survived = 0
        for m in chosen:
            started = time.monotonic()
            originals = apply(copy, m)
            if originals is None:
                result = "stale"
                survived += 1
            else:
                try:
                    passed, tail = run_tests(copy, m.tests, args.timeout_s)
                finally:
                    for path, text in originals.items():
                        path.write_text(text)
                result = "survived" if passed else "caught"
                survived += passed
            took = time.monotonic() - started
            names = ", ".join(t.split("::")[-1] if "::" in t else t for t in m.tests)
            print(f"| {m.name:<{width}} | {result:<8} | {took:4.0f}s | {names} |", flush=True)
    print(f"\n{len(chosen) - survived} of {len(chosen)} mutations caught")
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
