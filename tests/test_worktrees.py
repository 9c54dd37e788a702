"""Worktrees through GitPython on a real repository (path with spaces)."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import fake, git, run_cli, write_plan

from orchestrator.running import worktrees
from orchestrator.errors import WorktreeError


def test_create_reuse_and_branch_from_base(repo: Path) -> None:
    wt = repo.parent / "wt root" / "exp" / "a"
    worktrees.ensure_worktree(repo, wt, "exp/a", "HEAD")
    assert (wt / "README.md").read_text() == "test repo\n"
    assert git(repo, "rev-parse", "exp/a") == git(repo, "rev-parse", "HEAD")
    (wt / "new.txt").write_text("x")  # untracked work: reuse keeps it
    assert worktrees.ensure_worktree(repo, wt, "exp/a", "HEAD") == wt.resolve()
    assert (wt / "new.txt").exists()


def test_existing_branch_is_checked_out_not_recreated(repo: Path) -> None:
    git(repo, "branch", "exp/b")
    git(repo, "commit", "-q", "--allow-empty", "-m", "main moves on")
    wt = repo.parent / "wts" / "b"
    worktrees.ensure_worktree(repo, wt, "exp/b", "HEAD")
    assert git(wt, "rev-parse", "HEAD") == git(repo, "rev-parse", "exp/b")
    assert git(wt, "rev-parse", "HEAD") != git(repo, "rev-parse", "main")


def test_branch_checked_out_elsewhere_is_an_error(repo: Path) -> None:
    with pytest.raises(WorktreeError, match="already checked out"):
        worktrees.ensure_worktree(repo, repo.parent / "wts" / "x", "main", "HEAD")


def test_dirty_worktree_is_refused_on_fresh(repo: Path) -> None:
    wt = repo.parent / "wts" / "c"
    worktrees.ensure_worktree(repo, wt, "exp/c", "HEAD")
    (wt / "README.md").write_text("changed\n")
    with pytest.raises(WorktreeError, match="uncommitted changes"):
        worktrees.ensure_worktree(repo, wt, "exp/c", "HEAD", fresh=True)
    with pytest.raises(WorktreeError, match="uncommitted"):
        worktrees.remove_worktree(repo, wt)
    assert (wt / "README.md").read_text() == "changed\n"  # nothing lost


def test_fresh_recreates_a_clean_worktree(repo: Path) -> None:
    wt = repo.parent / "wts" / "d"
    worktrees.ensure_worktree(repo, wt, "exp/d", "HEAD")
    worktrees.lock_worktree(repo, wt, "test run")
    worktrees.ensure_worktree(repo, wt, "exp/d", "HEAD", fresh=True)
    assert (wt / "README.md").exists()


def test_foreign_directory_and_bad_base_ref(repo: Path) -> None:
    foreign = repo.parent / "wts" / "e"
    foreign.mkdir(parents=True)
    (foreign / "file").write_text("mine")
    with pytest.raises(WorktreeError, match="is not a worktree"):
        worktrees.ensure_worktree(repo, foreign, "exp/e", "HEAD")
    with pytest.raises(WorktreeError, match="base_ref 'nope'"):
        worktrees.ensure_worktree(repo, repo.parent / "wts" / "f", "exp/f", "nope")


def test_stale_worktree_metadata_is_pruned(repo: Path) -> None:
    import shutil

    wt = repo.parent / "wts" / "g"
    worktrees.ensure_worktree(repo, wt, "exp/g", "HEAD")
    shutil.rmtree(wt)  # deleted behind git's back
    worktrees.ensure_worktree(repo, wt, "exp/g", "HEAD")
    assert (wt / "README.md").exists()


def test_list_parses_porcelain(repo: Path) -> None:
    wt = repo.parent / "wts" / "h"
    worktrees.ensure_worktree(repo, wt, "exp/h", "HEAD")
    worktrees.lock_worktree(repo, wt, "a reason")
    with worktrees.open_repo(repo) as r:
        infos = {i.path: i for i in worktrees.list_worktrees(r)}
    assert infos[wt.resolve()].branch == "exp/h" and infos[wt.resolve()].locked
    assert infos[repo.resolve()].branch == "main"
    worktrees.unlock_worktree(repo, wt)


def test_not_a_repository(tmp_path: Path) -> None:
    with pytest.raises(WorktreeError, match="not a git repository"):
        worktrees.ensure_worktree(tmp_path, tmp_path / "w", "b", "HEAD")


def test_cli_clean_removes_worktrees_but_refuses_uncommitted_work(repo: Path) -> None:
    plan = write_plan(repo, [
        {"name": "a", "branch": "r/a", "command": fake("--epochs", 1)},
        {"name": "b", "branch": "r/b", "command": fake("--epochs", 1)},
    ])
    for name in ("a", "b"):
        worktrees.ensure_worktree(repo, repo / ".worktrees" / "race" / name, f"r/{name}", "HEAD")
    (repo / ".worktrees" / "race" / "b" / "README.md").write_text("edited\n")
    out = run_cli("clean", str(plan), cwd=repo)
    assert out.returncode == 2 and "uncommitted work" in out.stderr
    assert (repo / ".worktrees" / "race" / "a").exists()  # nothing removed
    git(repo / ".worktrees" / "race" / "b", "checkout", "README.md")
    out = run_cli("clean", str(plan), "--results", "--yes", cwd=repo)
    assert out.returncode == 0, out.stderr
    assert not (repo / ".worktrees" / "race").exists()


def test_cli_clean_refuses_a_worktree_whose_only_work_is_untracked(repo: Path) -> None:
    plan = write_plan(repo, [{"name": "a", "branch": "r/a", "command": fake("--epochs", 1)}])
    wt = repo / ".worktrees" / "race" / "a"
    worktrees.ensure_worktree(repo, wt, "r/a", "HEAD")
    (wt / "notes from the night run.md").write_text("new, never added\n")
    out = run_cli("clean", str(plan), cwd=repo)
    assert out.returncode == 2 and "uncommitted work" in out.stderr
    assert "notes from the night run.md" in out.stderr
    assert (wt / "notes from the night run.md").read_text() == "new, never added\n"
