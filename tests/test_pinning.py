"""The winner's weights pinned (byte-identical to what was saved at the winning record) and
its commit tagged, off the decision path; the on_success hook starts after the pin."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

from conftest import fake, git, write_plan

from orchestrator.core.config import load_plan
from orchestrator.core.state import PlanState
from orchestrator.paths import ResultsPaths
from orchestrator.session import build_controller


def race(plan_path: Path, **kw):
    controller = build_controller(load_plan(plan_path), **kw)
    code = controller.run()
    controller.wait_for_views()
    return code, PlanState.load(ResultsPaths(controller.plan.results_dir).state), controller


HOOK = "import shutil, sys; shutil.copy(sys.argv[1], sys.argv[2])\n"


def _check_pinned(repo: Path, state: PlanState, archive: Path) -> dict:
    erec = state.experiments["race"]
    winner = ResultsPaths(repo / "results").winner_dir("race")
    info = json.loads((winner / "winner.json").read_text())
    assert info["matched_by"] == "sidecar"
    assert info["record"]["epoch"] == erec.winner_epoch
    pinned = (winner / info["checkpoint"]).read_bytes()
    saved = (archive / f"epoch_{erec.winner_epoch:06d}.ckpt").read_bytes()
    assert pinned == saved  # byte-identical to what was saved at the winning record
    assert info["sha256"] == hashlib.sha256(pinned).hexdigest()
    assert info["commit"] == state.run("race", "w").commit and info["commit"]
    assert erec.pin is not None and erec.pin["checkpoint"] == info["checkpoint"]
    report = ResultsPaths(repo / "results").race_report("race").read_text()
    assert f"_winner/{info['checkpoint']}" in report
    return info


def test_winner_stopped_mid_epoch_pins_the_checkpoint_of_its_record(
    repo: Path, leak_check: str
) -> None:
    archive = repo.parent / "saved"
    (repo / "hook.py").write_text(HOOK)
    out = repo.parent / "hook-saw-winner.json"
    winner_json = ResultsPaths(repo / "results").winner_json("race")
    plan = write_plan(repo, [
        {"name": "w", "branch": "r/w", "command": fake(
            "--epochs", 100, "--interval", 0.3, "--metric", "acc=0.5+0.1*epoch",
            "--random-checkpoints", "--partial-on-stop", "--checkpoint-archive", str(archive))},
    ], experiment={"on_success": ["python", "hook.py", str(winner_json), str(out)]})
    code, state, _ = race(plan)
    assert code == 0
    info = _check_pinned(repo, state, archive)
    # the SIGTERM came mid-epoch: a partial stop checkpoint exists, and was not pinned
    partials = list(archive.glob("*_partial.ckpt"))
    assert partials and info["checkpoint"] not in {p.name for p in partials}
    latest = ResultsPaths(repo / "results").run("race", "w").latest_checkpoint_info
    assert json.loads(latest.read_text())["partial"] is True
    # the hook started after the pin: it saw winner.json
    assert json.loads(out.read_text())["checkpoint"] == info["checkpoint"]
    assert state.experiments["race"].hook == "ok"


def test_stop_losers_false_keeps_the_winning_checkpoint(repo: Path, leak_check: str) -> None:
    archive = repo.parent / "saved"
    plan = write_plan(repo, [
        {"name": "w", "branch": "r/w", "command": fake(
            "--epochs", 10, "--interval", 0.4, "--metric", "acc=0.5+0.1*epoch",
            "--random-checkpoints", "--keep-checkpoints", 1,
            "--checkpoint-archive", str(archive))},
    ], experiment={"stop_losers": False})
    code, state, _ = race(plan)
    assert code == 0 and state.run("race", "w").epoch == 10  # trained on after winning
    _check_pinned(repo, state, archive)
    # rotation deleted the winner's checkpoint from the run dir; the pinned copy is the one left
    ckpts = ResultsPaths(repo / "results").run("race", "w").checkpoints
    assert not (ckpts / f"epoch_{state.experiments['race'].winner_epoch:06d}.ckpt").exists()


NO_SIDECARS = """
import json, os, pathlib, signal, sys, time
run = pathlib.Path(os.environ["ORCH_RUN_DIR"]); (run / "ckpt").mkdir(exist_ok=True)
signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
for epoch in range(1, 50):
    time.sleep(0.1)
    (run / "checkpoints").mkdir(exist_ok=True)
    (run / "checkpoints" / "model.bin").write_bytes(b"weights %d" % epoch)
    with open(run / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"epoch": epoch, "acc": 0.2 * epoch}) + "\\n")
"""


def test_a_script_without_sidecars_gets_the_newest_checkpoint(repo: Path, leak_check: str) -> None:
    (repo / "nosidecar.py").write_text(NO_SIDECARS)
    plan = write_plan(repo, [
        {"name": "w", "branch": "r/w", "command": [sys.executable, str(repo / "nosidecar.py")]},
    ])
    code, state, _ = race(plan)
    assert code == 0
    info = json.loads(ResultsPaths(repo / "results").winner_json("race").read_text())
    assert info["matched_by"] == "time" and info["checkpoint"] == "model.bin"
    report = ResultsPaths(repo / "results").race_report("race").read_text()
    assert "matched by time" in report


def test_the_winning_commit_is_tagged_and_an_existing_tag_left_alone(
    repo: Path, leak_check: str
) -> None:
    plan = write_plan(repo, [
        {"name": "w", "branch": "r/w",
         "command": fake("--epochs", 20, "--interval", 0.05, "--metric", "acc=0.5+0.2*epoch")},
    ], tag_prefix="won")
    code, state, _ = race(plan)
    race_id = state.race_id
    assert code == 0 and race_id
    name = f"won/race/{race_id}"
    assert state.experiments["race"].tag == f"{name} (created)"
    assert git(repo, "rev-parse", name).strip() == state.run("race", "w").commit
    # an existing tag of the same name (another commit) is reported, never moved
    git(repo, "tag", "-d", name)
    (repo / "other.txt").write_text("x\n")
    git(repo, "add", "other.txt")
    git(repo, "commit", "-q", "-m", "other")
    other = git(repo, "rev-parse", "HEAD").strip()
    git(repo, "tag", name, other)
    from orchestrator.core.pinning import tag_winner

    line = tag_winner(load_plan(plan), "race", race_id, state.run("race", "w").commit)
    assert line == f"{name} (exists, left alone)"
    assert git(repo, "rev-parse", name).strip() == other


def test_tag_false_creates_no_tag(repo: Path, leak_check: str) -> None:
    plan = write_plan(repo, [
        {"name": "w", "branch": "r/w",
         "command": fake("--epochs", 20, "--interval", 0.05, "--metric", "acc=0.5+0.2*epoch")},
    ], tag=False)
    code, state, _ = race(plan)
    assert code == 0 and state.experiments["race"].tag is None
    assert git(repo, "tag", "--list").strip() == ""
