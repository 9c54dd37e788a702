"""Pinning the winner: its checkpoint copied aside, its commit tagged, off the decision path.

After a decision the controller starts one thread per decided experiment (``Pinner.start``). It
tags the winning commit (``<tag_prefix>/<experiment>/<race-id>``, never moving an existing tag),
then waits, with a deadline, for the checkpoint that belongs to the winning record: the one whose
sidecar (``<checkpoint>.json``, written by ``orchestrator.reporting``) names the record's
epoch/step and is not a mid-epoch ``partial`` stop checkpoint. It snapshots that file (a hard
link, so the worker's checkpoint rotation cannot delete it under us), copies it into
``results/<experiment>/_winner/`` and writes ``winner.json``. A script that writes no sidecars
gets the newest checkpoint file at the decision (``matched_by: "time"``).

The experiment's ``on_success`` hook starts only once its pin finished (``HookRunner.start(...,
after=pinner.future(name))``): the hook may read winner.json.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orchestrator.paths import ResultsPaths
from orchestrator.reporting import LATEST, atomic_write_json

if TYPE_CHECKING:
    from orchestrator.core.config import Plan
    from orchestrator.core.runs import LiveRun
    from orchestrator.core.state import PlanState

PIN_POLL_S = 0.01
NO_SIDECAR_SETTLE_S = 0.5  # files without sidecars for this long: the script writes none


def checkpoint_files(folder: Path) -> list[Path]:
    """Numbered checkpoint files in ``folder``: regular files that are not sidecars (.json),
    not ``latest*`` and not temporary (leading '.')."""
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return []
    return [
        Path(e.path) for e in entries
        if not e.name.startswith((".", LATEST)) and not e.name.endswith(".json")
        and e.is_file(follow_symlinks=False)
    ]


def _sidecars(folder: Path) -> list[tuple[Path, dict[str, Any]]]:
    out = []
    try:
        names = [e.name for e in os.scandir(folder)]
    except OSError:
        return []
    for name in names:
        if not name.endswith(".json") or name.startswith((".", LATEST)):
            continue
        try:
            data = json.loads((folder / name).read_text())
        except (OSError, ValueError):
            continue  # pruned meanwhile, or being written
        if isinstance(data, dict):
            out.append((folder / name, data))
    return out


def sidecar_matches(sidecar: dict[str, Any], record: dict[str, Any]) -> bool:
    """Whether a checkpoint's sidecar belongs to a metric record: the same epoch (and step,
    where both give one), the same attempt where both give one, and not ``partial``."""
    if sidecar.get("partial"):
        return False
    keys = [k for k in ("epoch", "step") if record.get(k) is not None]
    if not keys or not any(sidecar.get(k) is not None for k in keys):
        return False
    for k in keys:
        if sidecar.get(k) is not None and sidecar[k] != record[k]:
            return False
    a, b = sidecar.get("attempt"), record.get("attempt")
    return a is None or b is None or a == b


def _snapshot(src: Path, tmp: Path) -> bool:
    """Hard-link ``src`` to ``tmp`` (a copy where links are impossible); False if ``src`` is
    gone."""
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except FileNotFoundError:
        return False
    except OSError:
        try:
            shutil.copyfile(src, tmp)
        except FileNotFoundError:
            return False
    return True


def _copy_hashing(src: Path, dst: Path) -> str:
    digest = hashlib.sha256()
    part = dst.with_name(f".{dst.name}.part")
    with open(src, "rb") as fin, open(part, "wb") as fout:
        while chunk := fin.read(1 << 20):
            digest.update(chunk)
            fout.write(chunk)
        fout.flush()
        os.fsync(fout.fileno())
    os.replace(part, dst)
    return digest.hexdigest()


def pin_checkpoint(
    checkpoints: Path,
    winner_dir: Path,
    record: dict[str, Any],
    *,
    timeout_s: float,
    ended: Callable[[], bool] = lambda: False,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Copy the checkpoint of the winning ``record`` into ``winner_dir`` and write winner.json.

    Args:
        checkpoints: the winner's checkpoints/ folder.
        winner_dir: where the copy and winner.json go (emptied first).
        record: the winning metric record.
        timeout_s: how long to wait for the checkpoint to appear (seconds).
        ended: True once the winner's processes are gone (then one last look, no more waiting).
        extra: more fields for winner.json (experiment, worker, commit, race id).

    Returns:
        The winner.json contents: checkpoint (file name, or None when none was found), sha256,
        record, matched_by ("sidecar" | "time" | None), source, and ``extra``; ``error`` says
        why nothing was pinned.
    """
    if winner_dir.exists():  # an earlier pin of this race (a resumed decision): replace it
        if any(winner_dir.iterdir()) and not (winner_dir / "winner.json").exists():
            raise OSError(f"{winner_dir} holds files that are not a pin; not replacing them")
        shutil.rmtree(winner_dir)
    winner_dir.mkdir(parents=True)
    tmp = winner_dir / ".snapshot"
    deadline = time.monotonic() + timeout_s
    at_decision = max(checkpoint_files(checkpoints), key=_mtime, default=None)
    unsidecared_since: float | None = None
    found: tuple[Path, str] | None = None
    last_look = False
    while found is None:
        for sidecar, data in _sidecars(checkpoints):
            if sidecar_matches(data, record):
                src = checkpoints / str(data.get("file") or sidecar.with_suffix("").name)
                if _snapshot(src, tmp):
                    found = (src, "sidecar")
                    break
        if found is not None:
            break
        files = checkpoint_files(checkpoints)
        if files and not _sidecars(checkpoints):
            unsidecared_since = unsidecared_since or time.monotonic()
            if last_look or time.monotonic() - unsidecared_since >= NO_SIDECAR_SETTLE_S:
                src = at_decision or max(files, key=_mtime)
                if _snapshot(src, tmp):
                    found = (src, "time")
                    break
        else:
            unsidecared_since = None
        if last_look:
            break
        last_look = ended() or time.monotonic() > deadline
        if not last_look:
            time.sleep(PIN_POLL_S)
    info: dict[str, Any] = {"checkpoint": None, "sha256": None, "record": record,
                            "matched_by": None, "source": None, **(extra or {})}
    if found is None:
        info["error"] = (f"no checkpoint of {_at(record)} appeared in {checkpoints} "
                         f"within {timeout_s:.0f}s (or before the winner exited)")
    else:
        src, how = found
        dst = winner_dir / src.name
        info.update(checkpoint=dst.name, sha256=_copy_hashing(tmp, dst), matched_by=how,
                    source=str(src))
        tmp.unlink(missing_ok=True)
    info["pinned_at"] = time.time()
    atomic_write_json(winner_dir / "winner.json", info)
    return info


def _mtime(p: Path) -> float:
    try:
        return p.stat().st_mtime
    except OSError:
        return 0.0


def _at(record: dict[str, Any]) -> str:
    return ", ".join(f"{k} {record[k]}" for k in ("epoch", "step") if record.get(k) is not None)


def tag_winner(plan: Plan, experiment: str, race_id: str | None, commit: str | None) -> str | None:
    """Create the lightweight tag of the winning commit (never moving an existing one).

    Returns:
        A line for the state and the reports ("race/x/ID (created)", "... (exists, left
        alone)", "... (failed: why)"), or None when tagging is off or nothing can be tagged.
    """
    from orchestrator.errors import WorktreeError
    from orchestrator.running import worktrees

    if not plan.tag or commit is None or race_id is None:
        return None
    name = f"{plan.tag_prefix}/{experiment}/{race_id}"
    try:
        created = worktrees.create_tag(plan.repo, name, commit)
    except WorktreeError as e:
        return f"{name} (failed: {e})"
    return f"{name} ({'created' if created else 'exists, left alone'})"


class Pinner:
    """The pin threads of one controller, by experiment name."""

    def __init__(self, wake: threading.Event) -> None:
        self._wake = wake
        self._futures: dict[str, Future[dict[str, Any]]] = {}
        self._settled: set[str] = set()

    def start(
        self, plan: Plan, state: PlanState, live: LiveRun, record: dict[str, Any],
        *, after: Callable[[], bool] = lambda: True,
    ) -> None:
        """Start tagging and pinning ``live``'s winning ``record`` on a thread (returns at once).

        Sets the experiment's ``winner_commit`` now; ``pin`` and ``tag`` once ``settle`` sees
        the thread done. ``after``: the thread first waits (at most ``grace_s`` + 10 s) until
        it returns True, so git and the copy do not compete for the CPU with the losers that
        are checkpointing and exiting (the decision latency); the checkpoint itself is safe
        meanwhile (a stop checkpoint never replaces an evaluated one).
        """
        exp = live.experiment.name
        erec = state.experiments[exp]
        erec.winner_commit = live.record.commit
        paths = ResultsPaths(plan.results_dir)
        extra = {"experiment": exp, "worker": live.worker.name, "commit": live.record.commit,
                 "dirty": live.record.dirty, "race_id": state.race_id}
        future: Future[dict[str, Any]] = Future()

        def work() -> None:
            try:
                deadline = time.monotonic() + plan.grace_s + 10.0
                while not after() and time.monotonic() < deadline:
                    time.sleep(PIN_POLL_S)
                tag = tag_winner(plan, exp, state.race_id, live.record.commit)
                info = pin_checkpoint(
                    live.paths.checkpoints, paths.winner_dir(exp), record,
                    timeout_s=plan.grace_s + 60.0,
                    ended=lambda: live.handle is None and live.stopping is None,
                    extra={**extra, "tag": tag},
                )
                future.set_result(info)
            except BaseException as e:  # reported by settle(); never kills the controller
                future.set_exception(e)
            finally:
                self._wake.set()

        self._futures[exp] = future
        threading.Thread(target=work, name=f"pin-{exp}", daemon=True).start()

    def future(self, experiment: str) -> Future[dict[str, Any]] | None:
        """The pin of ``experiment`` (None when none was started)."""
        return self._futures.get(experiment)

    @property
    def running(self) -> bool:
        """True while a pin is in flight or done but not yet copied into the state."""
        return any(exp not in self._settled for exp in self._futures)

    def settle(self, state: PlanState) -> list[str]:
        """Copy the finished pins into the state; return one event line per pin."""
        out = []
        for exp, future in self._futures.items():
            if exp in self._settled or not future.done():
                continue
            self._settled.add(exp)
            erec = state.experiments[exp]
            try:
                info = future.result()
            except Exception as e:
                erec.pin = {"error": repr(e)}
                out.append(f"{exp}: pinning the winner's checkpoint failed: {e!r}")
                continue
            erec.pin = info
            erec.tag = info.get("tag")
            if info.get("checkpoint"):
                out.append(f"{exp}: pinned {info['checkpoint']} (matched by "
                           f"{info['matched_by']}, sha256 {str(info['sha256'])[:12]})")
            else:
                out.append(f"{exp}: winner NOT pinned: {info.get('error')}")
            if erec.tag:
                out.append(f"{exp}: tag {erec.tag}")
        return out

    def wait(self, timeout_s: float) -> None:
        """Wait for every pin (tests)."""
        deadline = time.monotonic() + timeout_s
        for f in list(self._futures.values()):
            try:
                f.exception(timeout=max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                return
