"""The state file is replaced atomically: a reader polling it during a burst of saves sees one
whole version or the next, never a torn or empty file (no mount rights or full disk needed)."""

from __future__ import annotations

import json
import threading
from pathlib import Path

from orchestrator.core.state import PlanState, RunRecord

SAVES = 300  # at most: the burst ends once the reader has seen ENOUGH versions
ENOUGH = 8


def test_a_reader_never_sees_a_torn_state_file(tmp_path: Path) -> None:
    path = tmp_path / "results" / "state.json"
    state = PlanState(plan="plan.yaml")
    for i in range(300):  # ~100 KB: a plain rewrite is visibly half-written for a while
        state.runs[f"race/w{i}"] = RunRecord("race", f"w{i}", f"exp/branch-{i}")
    state.controller = {"version": 0}
    state.save(path)
    done, enough = threading.Event(), threading.Event()

    def writer() -> None:
        try:
            for version in range(1, SAVES + 1):
                state.controller = {"version": version}
                state.save(path)
                if enough.is_set():
                    break
        finally:
            done.set()

    thread = threading.Thread(target=writer)
    thread.start()
    torn: list[str] = []
    seen: list[int] = []
    while not done.is_set():
        data = path.read_bytes()
        try:
            version = json.loads(data)["controller"]["version"]
        except ValueError as e:
            torn.append(f"{len(data)} bytes: {e}")
            continue
        if not seen or seen[-1] != version:
            seen.append(version)
            if len(seen) >= ENOUGH:
                enough.set()
    thread.join()
    assert torn == [], f"{len(torn)} torn reads, first: {torn[0]}"
    assert seen == sorted(seen)  # versions only move forward
    assert len(seen) >= 5, f"the reader hardly overlapped the saves: {seen}"
    assert json.loads(path.read_text())["controller"]["version"] == state.controller["version"]
    assert [p.name for p in path.parent.iterdir()] == ["state.json"]  # no temp files left
