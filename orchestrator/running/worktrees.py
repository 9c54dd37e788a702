"""Git worktrees, one per worker, through GitPython (which has no worktree API of its own).

Rules (shared/DESIGN.md, "Mechanisms"): prune stale metadata before adding; create a branch with
``-b`` only when ``rev-parse --verify`` says it does not exist (never ``-B``); a branch checked out
elsewhere, a dirty worktree on --fresh, or a path that is not ours are errors, never silent
repairs; a worktree is locked while its run is alive; every ``Repo`` is closed (each keeps
``git cat-file`` children alive).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.core.refnames import ref_format_problem  # noqa: F401  (re-exported)
from orchestrator.errors import WorktreeError


class _LazyGit:
    """GitPython, imported on first use: the launch path (worktree exists, lock, provenance)
    runs plain git processes, so a race whose worktrees exist never pays its import."""

    def __getattr__(self, name: str) -> Any:
        import git as gitpython

        globals()["git"] = gitpython
        return getattr(gitpython, name)


git: Any = _LazyGit()


@dataclass(frozen=True)
class WorktreeInfo:
    """One entry of ``git worktree list --porcelain -z``."""

    path: Path
    head: str | None
    branch: str | None  # short name (without refs/heads/), None when detached or bare
    locked: bool
    prunable: bool
    bare: bool = False


@contextmanager
def open_repo(repo_path: Path) -> Iterator[git.Repo]:
    """A GitPython Repo that is always closed.

    Raises:
        WorktreeError: if ``repo_path`` is not inside a git repository.
    """
    try:
        repo = git.Repo(repo_path, search_parent_directories=False)
    except (git.InvalidGitRepositoryError, git.NoSuchPathError):
        raise WorktreeError(
            f"{repo_path} is not a git repository",
            hint="set 'repo:' in the plan to the repository that holds the branches",
        ) from None
    try:
        yield repo
    finally:
        repo.close()


def _git_env() -> dict[str, str]:
    return {"GIT_LFS_SKIP_SMUDGE": "1", "GIT_TERMINAL_PROMPT": "0"}


def list_worktrees(repo: git.Repo) -> list[WorktreeInfo]:
    """Parse ``git worktree list --porcelain -z`` (paths with spaces and newlines are safe)."""
    out = repo.git.worktree("list", "--porcelain", "-z")
    entries: list[WorktreeInfo] = []
    fields: dict[str, str] = {}

    def flush() -> None:
        if "worktree" in fields:
            branch = fields.get("branch")
            entries.append(
                WorktreeInfo(
                    path=Path(fields["worktree"]).resolve(),
                    head=fields.get("HEAD"),
                    branch=branch.removeprefix("refs/heads/") if branch else None,
                    locked="locked" in fields,
                    prunable="prunable" in fields,
                    bare="bare" in fields,
                )
            )
        fields.clear()

    for token in out.split("\0"):
        if token == "":
            flush()
            continue
        key, _, value = token.partition(" ")
        fields[key] = value
    flush()
    return entries


def branch_exists(repo: git.Repo, branch: str) -> bool:
    try:
        repo.git.rev_parse("--verify", "--quiet", f"refs/heads/{branch}")
        return True
    except git.GitCommandError:
        return False


def dirty_files(path: Path) -> list[str]:
    """Uncommitted changes in a worktree: modified/staged tracked files and untracked,
    non-ignored files (``git status --porcelain``), as short lines."""
    with open_repo(path) as repo:
        out = repo.git.status("--porcelain", "--untracked-files=normal")
    return [line for line in out.splitlines() if line.strip()]


def ensure_worktree(
    repo_path: Path,
    path: Path,
    branch: str,
    base_ref: str,
    *,
    fresh: bool = False,
) -> Path:
    """Create the worktree for ``branch`` at ``path``, or reuse it if it is already there.

    Args:
        repo_path: the main repository.
        path: where the worktree goes (absolute; under the plan's worktree_root).
        branch: the worker's branch; created from ``base_ref`` if it does not exist.
        base_ref: commit-ish to branch from.
        fresh: recreate an existing worktree from its branch (refused if it is dirty).

    Returns:
        ``path``.

    Raises:
        WorktreeError: the branch is checked out in another worktree, ``path`` exists but is not
            a worktree of this repository, the worktree is dirty on --fresh, ``base_ref`` does not
            exist, or git fails (the message carries git's stderr).
    """
    path = path.resolve()
    if not fresh and _checked_out_here(repo_path, path, branch):
        return path  # the common case on every launch after the first: no git process
    with open_repo(repo_path) as repo:
        with repo.git.custom_environment(**_git_env()):
            try:
                repo.git.worktree("prune")
                trees = list_worktrees(repo)
                mine = next((t for t in trees if t.path == path), None)
                elsewhere = next(
                    (t for t in trees if t.branch == branch and t.path != path), None
                )
                if elsewhere is not None:
                    raise WorktreeError(
                        f"branch {branch!r} is already checked out at {elsewhere.path}",
                        hint="check out another branch there, or give this worker its own branch",
                    )
                if mine is not None:
                    if mine.branch != branch:
                        raise WorktreeError(
                            f"worktree {path} has {mine.branch or 'a detached HEAD'} checked out, "
                            f"not {branch!r}",
                            hint="run `python -m orchestrator clean PLAN` to remove stale "
                            "worktrees",
                        )
                    if not fresh:
                        return path
                    dirty = dirty_files(path)
                    if dirty:
                        raise WorktreeError(
                            f"worktree {path} has uncommitted changes ({len(dirty)} files, e.g. "
                            f"{dirty[0].strip()}); --fresh would discard them",
                            hint="commit or stash them in that worktree, then run again",
                        )
                    if mine.locked:
                        repo.git.worktree("unlock", str(path))
                    repo.git.worktree("remove", str(path))
                elif path.exists() and any(path.iterdir()):
                    raise WorktreeError(
                        f"{path} exists and is not a worktree of {repo_path}",
                        hint="move it away or change 'worktree_root' in the plan",
                    )
                path.parent.mkdir(parents=True, exist_ok=True)
                if branch_exists(repo, branch):
                    repo.git.worktree("add", str(path), branch)
                else:
                    try:
                        repo.git.rev_parse("--verify", "--quiet", f"{base_ref}^{{commit}}")
                    except git.GitCommandError:
                        raise WorktreeError(
                            f"base_ref {base_ref!r} is not a commit in {repo_path}",
                            hint="set 'base_ref' in the plan to an existing branch, tag or commit",
                        ) from None
                    repo.git.worktree("add", "-b", branch, str(path), base_ref)
            except git.GitCommandError as e:
                raise WorktreeError(
                    f"git {' '.join(map(str, e.command[1:]))} failed: {_stderr(e)}"
                ) from None
    return path


def ensure_detached_worktree(repo_path: Path, path: Path, commit: str) -> Path:
    """A worktree at ``path`` with ``commit`` checked out (detached HEAD), for running a worker
    of an earlier race again at the code that race ran (``rerun --race``).

    An existing worktree at ``path`` is reused when it holds ``commit``, and moved to ``commit``
    otherwise (refused if it holds uncommitted work). No branch is created or moved.

    Returns:
        ``path`` (resolved).

    Raises:
        WorktreeError: ``commit`` is not in the repository (e.g. garbage-collected after a
            rebase), ``path`` exists but is not a worktree of this repository, the worktree
            holds uncommitted work, or git fails.
    """
    path = path.resolve()
    if resolve_commit(repo_path, commit) is None:
        raise WorktreeError(
            f"commit {commit[:12]} is not in {repo_path} (rewritten or garbage-collected?)",
            hint="fetch or restore that commit (the race's tag names it, if one was made)",
        )
    with open_repo(repo_path) as repo:
        with repo.git.custom_environment(**_git_env()):
            try:
                repo.git.worktree("prune")
                mine = next((t for t in list_worktrees(repo) if t.path == path), None)
                if mine is None:
                    if path.exists() and any(path.iterdir()):
                        raise WorktreeError(
                            f"{path} exists and is not a worktree of {repo_path}",
                            hint="move it away, then run again",
                        )
                    path.parent.mkdir(parents=True, exist_ok=True)
                    repo.git.worktree("add", "--detach", str(path), commit)
                    return path
            except git.GitCommandError as e:
                raise WorktreeError(
                    f"git {' '.join(map(str, e.command[1:]))} failed: {_stderr(e)}"
                ) from None
    if head_commit(path) != resolve_commit(repo_path, commit):
        if dirty := dirty_files(path):
            raise WorktreeError(
                f"worktree {path} has uncommitted changes ({len(dirty)} files, e.g. "
                f"{dirty[0].strip()}); not moving it to {commit[:12]}",
                hint="commit or stash them in that worktree first",
            )
        _git(path, "checkout", "--quiet", "--detach", commit)
    return path


def _checked_out_here(repo_path: Path, path: Path, branch: str) -> bool:
    """True if ``path`` is a linked worktree of ``repo_path`` with ``branch`` checked out,
    read from git's on-disk layout (``<path>/.git`` -> ``gitdir: <repo>/.git/worktrees/<id>``,
    whose ``HEAD`` names the branch and ``gitdir`` points back at ``<path>/.git``). Anything
    unexpected returns False and the caller asks git."""
    try:
        text = (path / ".git").read_text().strip()
        if not text.startswith("gitdir: "):
            return False
        admin = Path(text.removeprefix("gitdir: ")).resolve()
        main_git = (repo_path / ".git").resolve()
        if admin.parent != main_git / "worktrees":
            return False
        head = (admin / "HEAD").read_text().strip()
        back = Path((admin / "gitdir").read_text().strip()).resolve()
    except OSError:
        return False
    return head == f"ref: refs/heads/{branch}" and back == (path / ".git").resolve()


def lock_worktree(repo_path: Path, path: Path, reason: str) -> None:
    """``git worktree lock`` (idempotent) so ``prune``/``remove`` leave a live run alone.

    One git process, no GitPython (this runs at every launch: a race whose worktrees exist
    never imports GitPython).

    Raises:
        WorktreeError: git refuses (other than "already locked").
    """
    try:
        _git(repo_path, "worktree", "lock", "--reason", reason, str(path))
    except WorktreeError as e:
        if "already locked" not in str(e):
            raise WorktreeError(f"cannot lock worktree {path}: {e}") from None


def unlock_worktree(repo_path: Path, path: Path) -> None:
    """``git worktree unlock``; a worktree that is not locked (or gone) is fine."""
    try:
        _git(repo_path, "worktree", "unlock", str(path))
    except WorktreeError:
        pass


def remove_worktree(repo_path: Path, path: Path) -> None:
    """Remove a worktree after checking it holds no uncommitted work.

    Raises:
        WorktreeError: the worktree has uncommitted changes or git fails.
    """
    path = path.resolve()
    if path.exists():
        dirty = dirty_files(path)
        if dirty:
            raise WorktreeError(
                f"worktree {path} has uncommitted changes ({len(dirty)} files, e.g. "
                f"{dirty[0].strip()}); not removing it",
                hint="commit or stash them in that worktree first",
            )
    with open_repo(repo_path) as repo:
        try:
            if any(t.path == path for t in list_worktrees(repo)):
                repo.git.worktree("unlock", str(path)) if _is_locked(repo, path) else None
                repo.git.worktree("remove", str(path))
            repo.git.worktree("prune")
        except git.GitCommandError as e:
            raise WorktreeError(f"cannot remove worktree {path}: {_stderr(e)}") from None
    if path.parent.is_dir() and not any(path.parent.iterdir()):
        os.rmdir(path.parent)  # the experiment's folder under worktree_root, now empty


def worktrees_under(repo_path: Path, folder: Path) -> list[Path]:
    """The repository's worktrees whose path is inside ``folder`` (e.g. ``rerun --race``'s),
    deepest first; none when ``folder`` does not exist."""
    folder = folder.resolve()
    if not folder.is_dir():
        return []
    with open_repo(repo_path) as repo:
        paths = [t.path for t in list_worktrees(repo) if t.path.is_relative_to(folder)]
    return sorted(paths, key=lambda p: len(p.parts), reverse=True)


def _is_locked(repo: git.Repo, path: Path) -> bool:
    return any(t.path == path and t.locked for t in list_worktrees(repo))


def _stderr(e: git.GitCommandError) -> str:
    text = (e.stderr or str(e)).strip()
    text = text.removeprefix("stderr:").strip().strip("'").strip()
    return text.splitlines()[-1] if text else "unknown git error"


# -- names and commits (provenance) --------------------------------------------------------------

def _git(cwd: Path, *args: str) -> str:
    """Run git in ``cwd`` and return stdout.

    Raises:
        WorktreeError: git failed (the message carries the command and git's last stderr line).
    """
    import subprocess

    proc = subprocess.run(
        ["git", *args], cwd=cwd, capture_output=True, text=True,
        env={**os.environ, **_git_env()}, stdin=subprocess.DEVNULL,
    )
    if proc.returncode != 0:
        err = proc.stderr.strip().splitlines()
        raise WorktreeError(
            f"git {' '.join(args)} failed in {cwd}: {err[-1] if err else f'exit {proc.returncode}'}"
        )
    return proc.stdout


def head_commit(path: Path) -> str:
    """The full SHA checked out in the worktree (or repository) at ``path``.

    Raises:
        WorktreeError: ``path`` is not in a git repository or has no commit.
    """
    return _git(path, "rev-parse", "--verify", "HEAD").strip()


def resolve_commit(repo_path: Path, ref: str) -> str | None:
    """The full SHA ``ref`` names in ``repo_path``, or None when it names no commit."""
    try:
        return _git(repo_path, "rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}").strip()
    except WorktreeError:
        return None


def commits_behind(repo_path: Path, ref: str, base_ref: str) -> int | None:
    """How many commits of ``base_ref`` are not in ``ref`` (``git rev-list --count
    ref..base_ref``, one git process); None when either does not resolve to a commit."""
    try:
        out = _git(repo_path, "rev-list", "--count", f"{ref}^{{commit}}..{base_ref}^{{commit}}")
    except WorktreeError:
        return None
    return int(out.strip() or 0)


def worktree_status(path: Path) -> tuple[str, list[str], list[str]]:
    """HEAD, uncommitted changes to tracked files and untracked non-ignored files of the
    worktree at ``path``, from one ``git status --porcelain=v2 --branch -z``.

    Returns:
        (full SHA of HEAD, ``XY path`` lines of changed tracked files, untracked paths).

    Raises:
        WorktreeError: not a git worktree, or it has no commit.
    """
    out = _git(path, "status", "--porcelain=v2", "--branch", "-z", "--untracked-files=all")
    head, changed, untracked = "", [], []
    entries = out.split("\0")
    i = 0
    while i < len(entries):
        entry = entries[i]
        i += 1
        if entry.startswith("# branch.oid "):
            head = entry.split(" ", 2)[2]
        elif entry.startswith("? "):
            untracked.append(entry[2:])
        elif entry.startswith(("1 ", "u ")):
            fields = entry.split(" ")
            changed.append(f"{fields[1].replace('.', ' ')} "
                           f"{entry.split(' ', 8 if entry[0] == '1' else 10)[-1]}")
        elif entry.startswith("2 "):  # a rename: the original path is the next entry
            fields = entry.split(" ", 9)
            changed.append(f"{fields[1].replace('.', ' ')} {fields[-1]}")
            i += 1
    if not head or head == "(initial)":
        raise WorktreeError(f"{path} has no commit checked out")
    return head, changed, untracked


def tracked_changes(path: Path) -> list[str]:
    """Uncommitted changes to tracked files (modified, staged, deleted), as short ``git status``
    lines. Untracked files are left out: training scripts write logs into their working
    directory (Lightning's ``lightning_logs/``), which is not a change of the code."""
    return [line for line in _git(path, "status", "--porcelain", "--untracked-files=no")
            .splitlines() if line.strip()]


def untracked_files(path: Path) -> list[str]:
    """Untracked, non-ignored files of a worktree (relative paths)."""
    return _git(path, "ls-files", "--others", "--exclude-standard").splitlines()


def worktree_diff(path: Path) -> str:
    """The uncommitted work of a worktree as one text: ``git diff HEAD`` (staged and unstaged
    changes of tracked files) followed by the list of untracked, non-ignored files."""
    diff = _git(path, "diff", "HEAD", "--no-color", "--no-ext-diff")
    untracked = _git(path, "ls-files", "--others", "--exclude-standard").splitlines()
    if untracked:
        diff += "\n# untracked files (contents not saved):\n"
        diff += "".join(f"#   {name}\n" for name in untracked)
    return diff


def branch_checked_out_at(repo_path: Path, branch: str) -> Path | None:
    """Where ``branch`` is checked out in a worktree of ``repo_path`` (the main one included),
    or None."""
    with open_repo(repo_path) as repo:
        for t in list_worktrees(repo):
            if t.branch == branch:
                return t.path
    return None


def create_tag(repo_path: Path, name: str, commit: str) -> bool:
    """Create the lightweight tag ``name`` at ``commit``; never moves an existing tag.

    Returns:
        True if it was created, False if a tag of that name already exists (left alone).

    Raises:
        WorktreeError: git refused (an invalid name, an unknown commit).
    """
    if resolve_commit(repo_path, f"refs/tags/{name}") is not None:
        return False
    _git(repo_path, "tag", name, commit)
    return True
