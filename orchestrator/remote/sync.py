"""Push the dashboard, plots and reports to a laptop over SFTP, on a thread of its own.

The controller holds one ``Syncer`` (``make_syncer``): a ``NullSyncer`` when the plan has no
``sync:`` section, else an ``SftpSyncer``. It calls ``notify_changed()`` after rewriting files
and ``push_now()`` when a race is decided; both only set a flag and return (microseconds), so a
slow or dead link never delays a decision. The push thread:

- every ``interval_s`` (or at once after ``push_now``) scans the plan's folder for the configured
  globs and uploads the files whose (size, mtime, inode) changed since their last push, markdown
  last (so the dashboard never references an image that is not there yet);
- writes each file to a hidden temporary name next to the target, copies the local mtime, then
  ``posix_rename``s it into place: a reader on the laptop sees the old file or the new one;
- keeps one connection; every paramiko timeout is set and each round has a hard deadline after
  which the connection is closed;
- while the link is down retries with exponential backoff and "equal jitter" (AWS Architecture
  Blog, "Exponential Backoff And Jitter", 2015); host-key and authentication errors stop it
  (they need the user), and ``status().error`` says why.
"""

from __future__ import annotations

import fnmatch
import logging
import os
import posixpath
import random
import re
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import unquote

from orchestrator.errors import SyncError
from orchestrator.remote.ssh import (
    AuthError,
    ConnectOptions,
    HostKeyMismatchError,
    HostKeyUnknownError,
    LinkDownError,
    RemotePathError,
    SshSession,
    check_relative,
    classify_sftp_error,
    open_session,
    parse_target,
)

if TYPE_CHECKING:
    from orchestrator.remote.sync_config import SyncConfig

log = logging.getLogger(__name__)

# Errors a retry cannot fix: the push thread stops trying until the controller restarts.
FATAL_ERRORS: tuple[type[SyncError], ...] = (
    HostKeyUnknownError,
    HostKeyMismatchError,
    AuthError,
    RemotePathError,
)
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt", ".safetensors")

Signature = tuple[int, int, int]  # (st_size, st_mtime_ns, st_ino)


@dataclass(frozen=True)
class SyncStatus:
    """What the dashboard shows about the push side."""

    last_success_s: float | None  # unix time of the last complete successful push
    error: str | None  # current error (one line, no secrets), None when healthy
    pushes: int  # completed push rounds


class Syncer:
    """Interface of the push side; the controller calls only these five methods."""

    def start(self) -> None:
        """Start pushing in the background."""
        raise NotImplementedError

    def notify_changed(self) -> None:
        """Local files changed: push them at the next interval. Never blocks."""
        raise NotImplementedError

    def push_now(self) -> None:
        """A race was decided: push as soon as possible. Never blocks."""
        raise NotImplementedError

    def status(self) -> SyncStatus:
        """Last success, current error and completed rounds."""
        raise NotImplementedError

    def close(self, timeout_s: float = 5.0) -> None:
        """One last flush bounded by ``timeout_s``, then stop the thread."""
        raise NotImplementedError


class NullSyncer(Syncer):
    """The syncer of a plan without ``sync:``: every call is a no-op."""

    def start(self) -> None:
        pass

    def notify_changed(self) -> None:
        pass

    def push_now(self) -> None:
        pass

    def status(self) -> SyncStatus:
        return SyncStatus(last_success_s=None, error=None, pushes=0)

    def close(self, timeout_s: float = 5.0) -> None:
        pass


# --------------------------------------------------------------------------- local files


def _component_regex(part: str) -> str:
    """Regex of one glob component: ``*`` and ``?`` never cross ``/``; ``[...]`` classes kept."""
    out, i = [], 0
    while i < len(part):
        ch = part[i]
        if ch == "*":
            out.append("[^/]*")
        elif ch == "?":
            out.append("[^/]")
        elif ch == "[" and "]" in part[i + 2 :]:
            end = part.index("]", i + 2)
            body = part[i + 1 : end].replace("\\", "\\\\")
            out.append("[" + ("^" + body[1:] if body.startswith("!") else body) + "]")
            i = end
        else:
            out.append(re.escape(ch))
        i += 1
    return "".join(out)


def glob_regex(pattern: str) -> re.Pattern[str]:
    """Compile a relative glob for posix relative paths.

    ``*``, ``?`` and ``[...]`` match within one path component, ``**`` zero or more whole
    components; a trailing ``dir/**`` matches everything below ``dir``.
    """
    parts = pattern.split("/")
    regex = ""
    for index, part in enumerate(parts):
        last = index == len(parts) - 1
        if part == "**":
            regex += ".*" if last else "(?:[^/]+/)*"
        else:
            regex += _component_regex(part) + ("" if last else "/")
    return re.compile(regex + r"\Z")


def _may_contain(dir_parts: list[str], pats: list[str]) -> bool:
    """Whether a file under the directory ``dir_parts`` could match ``pats``."""
    if not dir_parts:
        return len(pats) > 0
    if not pats:
        return False
    if pats[0] == "**":
        return True
    return fnmatch.fnmatchcase(dir_parts[0], pats[0]) and _may_contain(dir_parts[1:], pats[1:])


def is_checkpoint(rel: str) -> bool:
    """A checkpoint-like file: under a ``checkpoints/`` folder or with a weights suffix."""
    return "checkpoints" in rel.split("/")[:-1] or rel.endswith(CHECKPOINT_SUFFIXES)


def scan_files(
    root: Path, patterns: tuple[str, ...], *, include_checkpoints: bool = False
) -> dict[str, os.stat_result]:
    """Files under ``root`` matching any glob, as {posix relative path: stat}.

    Hidden files and folders (``.git``, ``.worktrees``, ``.venv``, temp files) are skipped,
    symlinks are followed only when they resolve inside ``root``, checkpoints are skipped
    unless ``include_checkpoints``.
    """
    root = root.resolve()
    split = [p.split("/") for p in patterns]
    regexes = [glob_regex(p) for p in patterns]
    found: dict[str, os.stat_result] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = Path(dirpath).relative_to(root).parts
        dirnames[:] = sorted(
            d
            for d in dirnames
            if not d.startswith(".")
            and d != "__pycache__"
            and any(_may_contain([*rel_dir, d], pats) for pats in split)
        )
        for name in filenames:
            parts = [*rel_dir, name]
            rel = "/".join(parts)
            if name.startswith(".") or not any(r.match(rel) for r in regexes):
                continue
            if not include_checkpoints and is_checkpoint(rel):
                continue
            path = Path(dirpath, name)
            if path.is_symlink() and not path.resolve().is_relative_to(root):
                log.warning("sync: skipping %s, a symlink leading outside %s", rel, root)
                continue
            try:
                found[rel] = path.stat()
            except OSError:
                continue  # vanished between listing and stat
    return found


IMAGE_LINK = re.compile(r"!\[[^\]]*\]\(\s*(<[^>]+>|[^)\s]+)(?:\s+\"[^\"]*\")?\s*\)")
_HTML_IMAGE = re.compile(r"<img\s[^>]*src=[\"']([^\"']+)[\"']", re.IGNORECASE)


def image_references(markdown: str) -> list[str]:
    """Relative image paths a markdown page references (``![..](x)`` and ``<img src=x>``).

    URLs, absolute paths, data: URIs and paths with ``..`` are left out (never synced).
    """
    refs: list[str] = []
    for raw in [*IMAGE_LINK.findall(markdown), *_HTML_IMAGE.findall(markdown)]:
        ref = unquote(raw.strip("<>").split("#", 1)[0].split("?", 1)[0])
        if not ref or "://" in ref or ref.startswith(("data:", "mailto:")):
            continue
        try:
            ref = check_relative(ref)
        except RemotePathError:
            continue
        if ref not in refs:
            refs.append(ref)
    return refs


def referenced_files(root: Path, page_rel: str) -> list[str]:
    """Images the markdown file ``root/page_rel`` references, as paths relative to ``root``."""
    try:
        text = (root / page_rel).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return []
    base = posixpath.dirname(page_rel)
    return [posixpath.join(base, ref) if base else ref for ref in image_references(text)]


def _signature(st: os.stat_result) -> Signature:
    return (st.st_size, st.st_mtime_ns, st.st_ino)


def push_order(rels: list[str]) -> list[str]:
    """Images and other files first, markdown last, so pages never reference missing files."""
    return sorted(rels, key=lambda r: (r.endswith(".md"), r))


def upload_atomic(session: SshSession, local: Path, rel: str) -> Signature | None:
    """Upload ``local`` to ``<root>/<rel>`` via a temporary name and ``posix_rename``.

    Returns:
        the local (size, mtime_ns, inode) of what was uploaded, or None if the local file
        vanished before it could be opened.

    Raises:
        SyncError subclasses (LinkDownError, RemotePermissionError, RemoteDiskFullError, ...).
    """
    remote = session.remote_path(rel)
    session.ensure_parent(remote)
    try:
        fh = open(local, "rb")
    except FileNotFoundError:
        return None
    tmp = posixpath.join(
        posixpath.dirname(remote), f".{posixpath.basename(remote)}.{uuid.uuid4().hex[:12]}.part"
    )
    with fh:
        st = os.fstat(fh.fileno())
        try:
            session.sftp.putfo(fh, tmp, file_size=st.st_size, confirm=True)
            session.sftp.utime(tmp, (st.st_atime, st.st_mtime))
            session.sftp.posix_rename(tmp, remote)
        except Exception as exc:  # noqa: BLE001 (classified and re-raised)
            err = classify_sftp_error(exc, op="write", path=remote, session=session)
            # Best effort only: on a stalled or lost link the cleanup would block (until the
            # round's deadline) and its own error would hide the one that ended the write.
            if session.alive and not isinstance(err, LinkDownError):
                try:
                    session.sftp.remove(tmp)
                except Exception:  # noqa: BLE001 (the temp file was never created, or the link went)
                    pass
            raise err from exc
    return _signature(st)


def remote_matches(session: SshSession, rel: str, st: os.stat_result) -> bool:
    """Whether the remote copy has the local size and (whole-second) mtime."""
    try:
        attrs = session.sftp.stat(session.remote_path(rel))
    except OSError:
        return False
    return attrs.st_size == st.st_size and attrs.st_mtime == int(st.st_mtime)


def connect_options(config: SyncConfig, *, local_root: Path) -> ConnectOptions:
    """The ConnectOptions a SyncConfig describes; relative file paths are under ``local_root``
    (the plan's directory), ``~`` is expanded."""

    def path(value: Path | None) -> Path | None:
        return None if value is None else local_root / value.expanduser()

    return ConnectOptions(
        port=config.port,
        key_file=path(config.key_file),
        known_hosts=path(config.known_hosts),
        accept_new_host_key=config.accept_unknown_host,
        ssh_config=path(config.ssh_config),
        connect_timeout_s=config.connect_timeout_s,
        op_timeout_s=config.op_timeout_s,
    )


def backoff_delay_s(failures: int, *, base_s: float, cap_s: float, rng: random.Random) -> float:
    """Exponential backoff with equal jitter: uniform in [d/2, d], d = min(cap, base * 2^(n-1))."""
    ceiling = min(cap_s, base_s * 2 ** min(failures - 1, 30))
    return ceiling / 2 + rng.uniform(0, ceiling / 2)


# --------------------------------------------------------------------------- the pusher


class SftpSyncer(Syncer):
    """Pushes ``config.patterns`` under ``local_root`` to ``config.target`` on its own thread.

    Args:
        config: the plan's sync section.
        local_root: the plan's directory; globs are relative to it and map to the same
            relative paths under the remote target directory.
        rng: source of backoff jitter (seed it in tests).
        options: connection options overriding the ones derived from ``config`` (tests use it
            to turn the ssh-agent off).
    """

    def __init__(
        self,
        config: SyncConfig,
        *,
        local_root: Path,
        rng: random.Random | None = None,
        options: ConnectOptions | None = None,
    ) -> None:
        self.config = config
        self.local_root = Path(local_root).resolve()
        self.target = parse_target(config.target)
        self.options = options or connect_options(config, local_root=self.local_root)
        self._rng = rng or random.Random()
        self._cond = threading.Condition()
        self._urgent = False
        self._closing = False
        self._close_budget_s = 5.0
        self._thread: threading.Thread | None = None
        self._session_lock = threading.Lock()
        self._session: SshSession | None = None
        self._pushed: dict[str, Signature] = {}
        self._page_refs: dict[str, tuple[Signature, list[str]]] = {}
        self._fatal = False
        self._status = SyncStatus(last_success_s=None, error=None, pushes=0)
        self.files_uploaded = 0  # total files written remotely (for tests and benchmarks)

    # -- the interface (called from the controller's thread; never touch the network)

    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="orchestrator-sync", daemon=True)
        self._thread.start()

    def notify_changed(self) -> None:
        pass  # the next interval's scan finds changed files by (size, mtime, inode)

    def push_now(self) -> None:
        with self._cond:
            self._urgent = True
            self._cond.notify()

    def status(self) -> SyncStatus:
        return self._status  # replaced atomically (frozen dataclass), never mutated

    def close(self, timeout_s: float = 5.0) -> None:
        with self._cond:
            self._closing = True
            self._close_budget_s = max(0.1, 0.8 * timeout_s)
            self._cond.notify()
        thread = self._thread
        if thread is None:
            return
        thread.join(timeout_s)
        if thread.is_alive():
            self._abort_session()
            thread.join(0.5)

    # -- the push thread

    def _run(self) -> None:
        due = time.monotonic()  # first round at once: shows auth/host-key problems early
        failures = 0
        while True:
            with self._cond:
                while not (self._closing or self._urgent):
                    wait_s = None if due == float("inf") else due - time.monotonic()
                    if wait_s is not None and wait_s <= 0:
                        break
                    self._cond.wait(wait_s)
                closing, self._urgent = self._closing, False
            if self._fatal:
                if closing:
                    break
                due = float("inf")
                continue
            ok = self._round(self._close_budget_s if closing else self.config.attempt_deadline_s)
            if closing:
                break
            if ok:
                failures = 0
                due = time.monotonic() + self.config.interval_s
            elif self._fatal:
                due = float("inf")
            else:
                failures += 1
                due = time.monotonic() + backoff_delay_s(
                    failures,
                    base_s=min(1.0, self.config.max_backoff_s),
                    cap_s=self.config.max_backoff_s,
                    rng=self._rng,
                )
        self._abort_session()

    def _round(self, deadline_s: float) -> bool:
        """One push round; returns True on success. Never raises."""
        started = time.monotonic()
        try:
            for attempt in range(2):
                reused = self._session is not None
                try:
                    self._push_changed(deadline_s - (time.monotonic() - started), deadline_s)
                    break
                except LinkDownError:
                    self._abort_session()
                    if not (reused and attempt == 0):
                        raise  # a fresh connection failed too: back off
        except SyncError as exc:
            self._fail(exc)
            return False
        except Exception as exc:  # noqa: BLE001 (a bug must not kill the push thread)
            log.exception("sync: unexpected error")
            self._fail(SyncError(f"internal error in sync: {type(exc).__name__}: {exc}"))
            return False
        was_failing = self._status.error is not None
        self._status = SyncStatus(
            last_success_s=time.time(), error=None, pushes=self._status.pushes + 1
        )
        if was_failing:
            log.warning("sync: link to %s is back", self.target)
        return True

    def _deadline_error(self, round_s: float) -> LinkDownError:
        """The error of a round whose deadline expired (named, whatever paramiko raised)."""
        return LinkDownError(f"push to {self.target} exceeded its {round_s:g} s deadline")

    def _push_changed(self, budget_s: float, round_s: float) -> None:
        """Push what changed within ``budget_s`` (what is left of the round's ``round_s``)."""
        if budget_s <= 0:
            raise self._deadline_error(round_s)
        files = scan_files(
            self.local_root,
            self.config.patterns,
            include_checkpoints=self.config.include_checkpoints,
        )
        self._add_referenced(files)
        changed = [rel for rel, st in files.items() if self._pushed.get(rel) != _signature(st)]
        session = self._session
        if not changed and session is not None and session.alive:
            # Nothing to upload: one round trip proves the link (and the status) still true.
            limit_s = max(0.1, min(budget_s, self.options.op_timeout_s))
            with session.deadline(limit_s):
                try:
                    session.sftp.stat(session.root)
                except Exception as exc:  # noqa: BLE001 (classified and re-raised)
                    if session.deadline_fired and limit_s >= budget_s:
                        raise self._deadline_error(round_s) from exc
                    raise classify_sftp_error(
                        exc, op="stat", path=session.root, session=session
                    ) from exc
            return
        if session is None:
            session = open_session(self.target, self.options, create_root=True, deadline_s=budget_s)
            with self._session_lock:
                self._session = session
        try:
            self._upload(session, files, changed, budget_s)
        except Exception as exc:  # noqa: BLE001 (named after the deadline if that is what fired)
            if session.deadline_fired:
                raise self._deadline_error(round_s) from exc
            raise

    def _upload(
        self, session: SshSession, files: dict[str, os.stat_result], changed: list[str],
        budget_s: float,
    ) -> None:
        """Upload ``changed`` files, the dashboard last; the connection is closed after
        ``budget_s`` (what paramiko then raises is replaced by the deadline's error)."""
        with session.deadline(max(0.1, budget_s)):
            for rel in push_order(changed):
                st = files[rel]
                if rel not in self._pushed and remote_matches(session, rel, st):
                    self._pushed[rel] = _signature(st)  # pushed before a controller restart
                    continue
                signature = upload_atomic(session, self.local_root / rel, rel)
                if signature is None:
                    self._pushed.pop(rel, None)
                else:
                    self._pushed[rel] = signature
                    self.files_uploaded += 1

    def _add_referenced(self, files: dict[str, os.stat_result]) -> None:
        """Add the images that the matched markdown pages reference (wherever they live)."""
        for page in [rel for rel in files if rel.endswith(".md")]:
            signature = _signature(files[page])
            if self._page_refs.get(page, (None, []))[0] != signature:
                self._page_refs[page] = (signature, referenced_files(self.local_root, page))
            for rel in self._page_refs[page][1]:
                path = self.local_root / rel
                if rel in files or rel.startswith(".") or "/." in rel:
                    continue
                if is_checkpoint(rel) and not self.config.include_checkpoints:
                    continue
                try:
                    if not path.resolve().is_relative_to(self.local_root):
                        continue  # a symlink leading out of the plan's folder
                    files[rel] = path.stat()
                except OSError:
                    continue  # not written yet

    def _fail(self, exc: SyncError) -> None:
        message = " ".join(str(exc).split())
        if exc.hint:
            message += f" ({exc.hint})"
        if isinstance(exc, FATAL_ERRORS):
            self._fatal = True
            message += "; sync stopped until the controller restarts"
        if message != self._status.error:
            log.warning("sync: %s", message)
        self._status = SyncStatus(
            last_success_s=self._status.last_success_s, error=message, pushes=self._status.pushes
        )
        self._abort_session()

    def _abort_session(self) -> None:
        with self._session_lock:
            session, self._session = self._session, None
        if session is not None:
            session.close()


def make_syncer(config: SyncConfig | None, *, local_root: Path) -> Syncer:
    """The controller's syncer: NullSyncer without a ``sync:`` section, else an SftpSyncer.

    Nothing connects until ``start()``.
    """
    if config is None:
        return NullSyncer()
    return SftpSyncer(config, local_root=local_root)
