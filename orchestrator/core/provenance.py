"""Provenance: which code, environment and software every attempt ran with.

Each attempt of a run records (``RunRecord.attempts``, and ``attempts/NNNN.provenance.json`` in
its run directory) its branch, the commit SHA it ran, how far that branch is behind the plan's
``base_ref``, the expanded argv, the plan's env (values of names that look secret redacted; the
inherited environment is not recorded), host, slot, start, end, exit, and the software. A dirty
worktree is refused unless the plan says ``allow_dirty: true``; then the diff is saved next to the
provenance and the attempt says ``dirty`` (untracked files, such as a script's own logs, are
listed but do not make a worktree dirty). The software (Python, torch, CUDA, GPU driver) is read
from package metadata and /proc, never by importing torch; ``pip_freeze.txt`` is written once per
race.
"""

from __future__ import annotations

import importlib.metadata
import json
import platform
import re
import socket
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orchestrator.errors import WorktreeError
from orchestrator.paths import ResultsPaths, RunPaths
from orchestrator.reporting import atomic_write_bytes, atomic_write_json
from orchestrator.running import worktrees

if TYPE_CHECKING:
    from orchestrator.core.config import Plan
    from orchestrator.core.runs import LiveRun

SECRET_NAME = re.compile(r"KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL", re.IGNORECASE)
REDACTED = "<redacted>"


def redact_env(env: dict[str, str]) -> dict[str, str]:
    """``env`` with the value of every name that looks secret (*KEY*, *TOKEN*, *SECRET*,
    *PASSWORD*, any case) replaced by ``<redacted>``."""
    return {k: (REDACTED if SECRET_NAME.search(k) else v) for k, v in env.items()}


def short_sha(commit: str | None) -> str:
    """The first 8 characters of a SHA ("—" for None)."""
    return commit[:8] if commit else "—"


def behind_text(behind: int | None, base_ref: str) -> str:
    """'3 commits behind main', 'up to date with main', or '' when unknown."""
    if behind is None:
        return ""
    if behind == 0:
        return f"up to date with {base_ref}"
    return f"{behind} commit{'s' if behind != 1 else ''} behind {base_ref}"


def software_versions() -> dict[str, str | None]:
    """Python, torch and its CUDA build, and the NVIDIA driver, without importing torch.

    torch's version comes from ``importlib.metadata``; its CUDA version from the
    ``torch/version.py`` file of that distribution (read as text); the driver from
    ``/proc/driver/nvidia/version``. Missing pieces are None.
    """
    out: dict[str, str | None] = {
        "python": platform.python_version(),
        "executable": sys.executable,
        "torch": None,
        "cuda": None,
        "gpu_driver": None,
    }
    try:
        dist = importlib.metadata.distribution("torch")
        out["torch"] = dist.version
        text = Path(str(dist.locate_file("torch/version.py"))).read_text()
        m = re.search(r"^cuda\s*(?::\s*\w+(?:\[\w+\])?)?\s*=\s*['\"]([^'\"]+)['\"]", text, re.M)
        out["cuda"] = m.group(1) if m else None
    except (importlib.metadata.PackageNotFoundError, OSError):
        pass
    try:
        first = Path("/proc/driver/nvidia/version").read_text().splitlines()[0]
        m = re.search(r"Kernel Module\s+(?:for \S+\s+)?([\d.]+)", first)
        out["gpu_driver"] = m.group(1) if m else first.strip()
    except (OSError, IndexError):
        pass
    return out


def pip_freeze() -> str:
    """``name==version`` of every installed distribution, sorted (what ``pip freeze`` lists,
    read from package metadata in-process instead of running pip)."""
    seen: dict[str, str] = {}
    for dist in importlib.metadata.distributions():
        name = dist.metadata["Name"]
        if name and name.lower() not in seen:
            seen[name.lower()] = f"{name}=={dist.version}"
    return "".join(line + "\n" for _, line in sorted(seen.items()))


def write_race_software(paths: ResultsPaths) -> dict[str, str | None]:
    """Write ``software.json`` and ``pip_freeze.txt`` of this race (once: kept if present).

    Returns:
        The software versions (as ``software_versions``).
    """
    if paths.software.exists():
        try:
            data = json.loads(paths.software.read_text())
            if isinstance(data, dict):
                return data
        except (OSError, ValueError):
            pass
    software = software_versions()
    atomic_write_json(paths.software, software)
    # Reading every installed distribution's metadata takes ~0.35 s: on a thread, so the first
    # launch never waits for it (it finishes long before any race ends).
    threading.Thread(
        target=lambda: atomic_write_bytes(paths.pip_freeze, pip_freeze().encode()),
        name="pip-freeze",
    ).start()
    return software


def check_worktree(worktree: Path, *, allow_dirty: bool) -> str | None:
    """Refuse a dirty worktree (uncommitted changes to tracked files), or return its diff when
    the plan allows it. Untracked files do not make it dirty (a script's own logs land there);
    the attempt lists them (``untracked``).

    Returns:
        None for a clean worktree; the diff text (``worktrees.worktree_diff``) of a dirty one
        when ``allow_dirty``.

    Raises:
        WorktreeError: the worktree holds uncommitted work and ``allow_dirty`` is False.
    """
    return _dirty_diff(worktree, worktrees.tracked_changes(worktree), allow_dirty=allow_dirty)


def _dirty_diff(worktree: Path, dirty: list[str], *, allow_dirty: bool) -> str | None:
    if not dirty:
        return None
    if not allow_dirty:
        raise WorktreeError(
            f"worktree {worktree} has uncommitted changes ({len(dirty)} files, e.g. "
            f"{dirty[0].strip()}); a run must be reproducible from a commit",
            hint="commit or stash them, or set 'allow_dirty: true' in the plan (the diff is "
            "then saved with the attempt)",
        )
    return worktrees.worktree_diff(worktree)


def attempt_provenance(
    *,
    repo: Path,
    worktree: Path,
    branch: str,
    base_ref: str,
    attempt: int,
    argv: list[str],
    plan_env: dict[str, str],
    slot: str | None,
    software: dict[str, Any],
    allow_dirty: bool,
    run_paths: RunPaths,
) -> dict[str, Any]:
    """Collect and save what one attempt is about to run (before it is launched).

    Writes ``attempts/NNNN.provenance.json`` (and ``NNNN.diff`` for a dirty worktree) in the
    run directory.

    Returns:
        The provenance dict (kept in ``RunRecord.attempts``): branch, commit, behind, base_ref,
        dirty, diff (path or None), argv, env (redacted), host, slot, attempt, software,
        started_at/ended_at/exit (filled in later).

    Raises:
        WorktreeError: the worktree is dirty and ``allow_dirty`` is False, or git fails.
    """
    commit, changed, untracked = worktrees.worktree_status(worktree)  # one git process
    diff = _dirty_diff(worktree, changed, allow_dirty=allow_dirty)
    diff_path = None
    if diff is not None:
        diff_path = run_paths.attempt_diff(attempt)
        atomic_write_bytes(diff_path, diff.encode())
    prov: dict[str, Any] = {
        "attempt": attempt,
        "branch": branch,
        "commit": commit,
        "base_ref": base_ref,
        "behind": worktrees.commits_behind(repo, commit, base_ref),
        "dirty": diff is not None,
        "diff": str(diff_path) if diff_path else None,
        "untracked": untracked[:20],
        "untracked_count": len(untracked),
        "argv": list(argv),
        "env": redact_env(dict(plan_env)),
        "host": socket.gethostname(),
        "slot": slot,
        "software": software,
        "started_at": None,
        "ended_at": None,
        "exit": None,
    }
    atomic_write_json(run_paths.provenance(attempt), prov)
    return prov


def close_attempt(
    prov: dict[str, Any], run_paths: RunPaths, *, started_at: float | None,
    ended_at: float, exit_code: int | None,
) -> None:
    """Fill in start, end (Unix seconds) and exit of an attempt and rewrite its file."""
    prov["started_at"] = started_at
    prov["ended_at"] = ended_at
    prov["exit"] = exit_code
    try:
        atomic_write_json(run_paths.provenance(int(prov["attempt"])), prov)
    except OSError:
        pass  # the state file holds the same; a full disk must not end the race


def begin_attempt(
    plan: Plan, live: LiveRun, worktree: Path, argv: list[str], slot: str | None
) -> None:
    """Record the provenance of the attempt ``live`` is about to launch (``live.record.attempt``)
    in its record (``attempts``, ``commit``, ``behind``, ``dirty``) and its run directory.

    Raises:
        WorktreeError: the worktree is dirty and the plan does not say ``allow_dirty: true``.
    """
    rec = live.record
    prov = attempt_provenance(
        repo=plan.repo, worktree=worktree, branch=live.worker.branch, base_ref=plan.base_ref,
        attempt=rec.attempt, argv=argv, plan_env=dict(live.worker.env), slot=slot,
        software=write_race_software(ResultsPaths(plan.results_dir)),
        allow_dirty=plan.allow_dirty, run_paths=live.paths,
    )
    rec.attempts.append(prov)
    rec.commit, rec.behind, rec.dirty = prov["commit"], prov["behind"], prov["dirty"]


def end_attempt(live: LiveRun, now: float, exit_code: int | None) -> None:
    """Close the provenance of ``live``'s current attempt: start, end and exit."""
    rec = live.record
    if rec.attempts and rec.attempts[-1].get("attempt") == rec.attempt:
        close_attempt(rec.attempts[-1], live.paths, started_at=rec.started_at, ended_at=now,
                      exit_code=exit_code)
