"""SSH plumbing shared by the push side (sync) and the pull side (watch), built on paramiko.

- ``parse_target("user@host:~/project")`` splits a target; the host may be an ~/.ssh/config alias.
- ``open_session(target, options)`` resolves the alias with ``paramiko.SSHConfig``, verifies the
  host key against known_hosts (unknown keys are refused unless ``accept_new_host_key``; a changed
  key is always refused), authenticates with keys only (agent, key file, ssh config IdentityFile,
  ~/.ssh/id_*; never a password), sets every timeout, opens SFTP and resolves the remote root.
- ``SshSession.remote_path(rel)`` maps a relative path to an absolute remote path that cannot
  leave the root (no ``..``, no absolute paths, no symlinked directory pointing elsewhere).
- Every failure becomes one ``SyncError`` subclass with a one-line message and a hint; none of
  them carries key material. ``LinkDownError`` (and subclasses) are the transient ones.

paramiko is imported inside functions so that ``import orchestrator.remote.sync`` stays cheap.

This module holds the live session (``SshSession``, ``open_session``, ``classify_sftp_error``) and
re-exports the rest: errors from ``ssh_errors``, targets, options, ssh-config resolution and host
keys from ``ssh_hosts``; connecting through ProxyCommand/ProxyJump is in ``ssh_connect``.
"""

from __future__ import annotations

import errno
import posixpath
import shlex
import socket
import stat
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from orchestrator.errors import SyncError
from orchestrator.remote.ssh_connect import ProxyProcess, connect_chain
from orchestrator.remote.ssh_errors import (
    AuthError,
    HostKeyMismatchError,
    HostKeyUnknownError,
    HostNotFoundError,
    LinkDownError,
    RemoteDiskFullError,
    RemoteIOError,
    RemotePathError,
    RemotePermissionError,
    one_line,
)
from orchestrator.remote.ssh_hosts import (
    DEFAULT_KNOWN_HOSTS,
    DEFAULT_SSH_CONFIG,
    ConnectOptions,
    Endpoint,
    SshTarget,
    host_key_name,
    parse_jump,
    parse_target,
    resolve,
)

if TYPE_CHECKING:
    import paramiko

__all__ = [
    "DEFAULT_KNOWN_HOSTS",
    "DEFAULT_SSH_CONFIG",
    "AuthError",
    "ConnectOptions",
    "Endpoint",
    "HostKeyMismatchError",
    "HostKeyUnknownError",
    "HostNotFoundError",
    "LinkDownError",
    "RemoteDiskFullError",
    "RemoteIOError",
    "RemotePathError",
    "RemotePermissionError",
    "SshSession",
    "SshTarget",
    "check_relative",
    "classify_sftp_error",
    "host_key_name",
    "open_session",
    "parse_jump",
    "parse_target",
    "resolve",
]


# --------------------------------------------------------------------------- remote paths


def check_relative(rel: str) -> str:
    """Normalize a relative POSIX path that must stay inside its root.

    Raises:
        RemotePathError: if ``rel`` is empty, absolute, contains ``..``, NUL or a newline.
    """
    if not rel or any(ch in rel for ch in "\0\n\r"):
        raise RemotePathError(f"invalid remote path {rel!r}")
    if rel.startswith("/") or rel.startswith("~"):
        raise RemotePathError(f"remote path {rel!r} must be relative to the target directory")
    parts = [p for p in rel.split("/") if p not in ("", ".")]
    if not parts or ".." in parts:
        raise RemotePathError(f"remote path {rel!r} would leave the target directory")
    return "/".join(parts)


def _inside(path: str, root: str) -> bool:
    return root == "/" or path == root or path.startswith(root.rstrip("/") + "/")


# --------------------------------------------------------------------------- sessions


def classify_sftp_error(
    exc: BaseException, *, op: str, path: str, session: SshSession | None = None
) -> SyncError:
    """Turn an exception from an SFTP call into the SyncError a user can act on.

    ``op`` is a verb phrase ("write", "create directory"), ``path`` the remote path. SFTP v3
    reports a full disk as a generic "Failure"; the free space is then asked with OpenSSH's
    statvfs@openssh.com extension to tell a full disk from other failures.
    """
    import paramiko

    if isinstance(exc, SyncError):
        return exc
    where = session.endpoint.label if session else "remote"
    if session is not None and session.deadline_fired:
        return LinkDownError(f"{op} {path} on {where}: attempt exceeded its deadline")
    if isinstance(exc, (TimeoutError, socket.timeout)):
        after = f" after {session.op_timeout_s:g} s (op_timeout_s)" if session else ""
        return LinkDownError(f"{op} {path} on {where} timed out{after}")
    if isinstance(exc, (EOFError, paramiko.SSHException)):
        return LinkDownError(f"{op} {path} on {where}: connection lost ({one_line(exc)})")
    if isinstance(exc, OSError):
        code = exc.errno
        if code in (errno.EACCES, errno.EPERM):
            return RemotePermissionError(
                f"permission denied: cannot {op} {path} on {where}",
                hint="check the owner and mode of the target directory on the remote machine",
            )
        if code in (errno.ENOSPC, errno.EDQUOT):
            return RemoteDiskFullError(f"remote disk full: cannot {op} {path} on {where}")
        if code == errno.ENOENT:
            return RemoteIOError(f"cannot {op} {path} on {where}: no such file or directory")
        if code is not None or session is None or not session.alive:
            return LinkDownError(f"{op} {path} on {where}: connection lost ({one_line(exc)})")
        free_bytes = session.free_bytes(posixpath.dirname(path) or ".")
        if free_bytes is not None and free_bytes < 64 * 1024:
            return RemoteDiskFullError(
                f"remote disk full: cannot {op} {path} on {where} ({free_bytes} bytes free)",
                hint="free space on the remote machine; the push resumes by itself",
            )
        return RemoteIOError(f"cannot {op} {path} on {where}: {one_line(exc)}")
    return RemoteIOError(f"cannot {op} {path} on {where}: {one_line(exc)}")


class SshSession:
    """One SSH connection with an SFTP channel and a canonical remote root directory.

    Not thread-safe except ``close()``, which any thread may call to abort blocked calls.
    """

    def __init__(self, client: paramiko.SSHClient, endpoint: Endpoint, op_timeout_s: float):
        self.client = client
        self.endpoint = endpoint
        self.op_timeout_s = op_timeout_s
        self.sftp = client.open_sftp()
        channel = self.sftp.get_channel()
        assert channel is not None
        channel.settimeout(op_timeout_s)
        self.root = "/"
        self.deadline_fired = False
        self.new_host_key: str | None = None  # fingerprint, when this connection accepted it
        self.closers: list[Any] = []  # ProxyJump hops' clients, ProxyCommand processes
        self._safe_dirs: set[str] = set()

    @property
    def alive(self) -> bool:
        transport = self.client.get_transport()
        channel = self.sftp.get_channel()
        return bool(transport and transport.is_active() and channel and not channel.closed)

    def close(self) -> None:
        """Close SFTP and the connection; safe from any thread, safe twice."""
        transport = self.client.get_transport()
        try:
            self.sftp.close()
        finally:
            self.client.close()
            if (
                self.closers
                and transport is not None
                and transport is not threading.current_thread()
            ):
                transport.join(2.0)  # stop reading from a ProxyCommand before closing its pipes
            for closer in reversed(self.closers):
                closer.close()

    @contextmanager
    def deadline(self, seconds: float) -> Iterator[None]:
        """Abort (close the connection) if the block runs longer than ``seconds``."""

        def fire() -> None:
            self.deadline_fired = True
            self.client.close()
            for closer in self.closers:
                if not isinstance(closer, ProxyProcess):  # no waiting in a timer thread
                    closer.close()

        timer = threading.Timer(seconds, fire)
        timer.daemon = True
        timer.start()
        try:
            yield
        finally:
            timer.cancel()

    # -- paths

    def set_root(self, path: str, *, create: bool) -> str:
        """Resolve ``path`` (relative = under the remote home) to its canonical absolute form.

        Raises:
            RemoteIOError: if it does not exist and ``create`` is False.
            RemotePermissionError: if it cannot be created.
        """
        if create:
            self._makedirs(path)
        try:
            self.root = self.sftp.normalize(path)  # OpenSSH: may succeed for a missing leaf
            mode = self.sftp.stat(self.root).st_mode or 0
            if not stat.S_ISDIR(mode):
                raise RemoteIOError(f"remote path {path!r} on {self.endpoint.label} is a file")
        except RemoteIOError:
            raise
        except Exception as exc:  # noqa: BLE001 (classified, not swallowed)
            err = classify_sftp_error(exc, op="open directory", path=path, session=self)
            if isinstance(err, RemoteIOError):
                err = RemoteIOError(
                    f"remote directory {path!r} does not exist on {self.endpoint.label}",
                    hint="check the target path (relative paths are under the remote home)",
                )
            raise err from exc
        self._safe_dirs = {self.root}
        return self.root

    def remote_path(self, rel: str) -> str:
        """Absolute remote path of ``rel`` under the root (lexically; see ``ensure_parent``)."""
        return posixpath.join(self.root, check_relative(rel))

    def ensure_parent(self, remote: str) -> None:
        """Create the parent directories of ``remote`` and check none is a symlink leading out.

        Raises:
            RemotePathError: if a parent resolves outside the root.
            RemotePermissionError, RemoteDiskFullError, LinkDownError: from SFTP.
        """
        parent = posixpath.dirname(remote)
        if parent in self._safe_dirs:
            return
        if not _inside(parent, self.root):
            raise RemotePathError(f"remote path {remote!r} is outside {self.root!r}")
        self._makedirs(parent)
        try:
            real = self.sftp.normalize(parent)
        except Exception as exc:  # noqa: BLE001
            raise classify_sftp_error(exc, op="resolve", path=parent, session=self) from exc
        if not _inside(real, self.root):
            raise RemotePathError(
                f"remote directory {parent!r} resolves to {real!r}, outside {self.root!r}"
            )
        self._safe_dirs.add(parent)

    def _makedirs(self, path: str) -> None:
        current = "/" if path.startswith("/") else ""
        for part in [p for p in path.split("/") if p not in ("", ".")]:
            current = posixpath.join(current, part) if current else part
            if current in self._safe_dirs:
                continue
            try:
                self.sftp.stat(current)
                continue
            except OSError as exc:
                if exc.errno != errno.ENOENT:
                    raise classify_sftp_error(exc, op="stat", path=current, session=self) from exc
            except Exception as exc:  # noqa: BLE001
                raise classify_sftp_error(exc, op="stat", path=current, session=self) from exc
            try:
                self.sftp.mkdir(current)
            except Exception as exc:  # noqa: BLE001
                raise classify_sftp_error(
                    exc, op="create directory", path=current, session=self
                ) from exc

    def free_bytes(self, path: str) -> int | None:
        """Bytes available to the user under ``path`` (statvfs@openssh.com), None if unknown."""
        from paramiko.sftp import CMD_EXTENDED, CMD_EXTENDED_REPLY

        try:
            kind, msg = self.sftp._request(CMD_EXTENDED, "statvfs@openssh.com", path)
        except Exception:  # noqa: BLE001 (server lacks the extension: free space unknown)
            return None
        if kind != CMD_EXTENDED_REPLY or msg is None:
            return None
        _bsize, frsize, _blocks, _bfree, bavail = (msg.get_int64() for _ in range(5))
        return int(bavail * frsize)

    # -- commands

    def run(self, argv: list[str], *, timeout_s: float) -> tuple[int, str, str]:
        """Run ``argv`` in the root directory on the remote machine (every argument quoted).

        Returns:
            (exit status, stdout, stderr) decoded as UTF-8 with replacement.

        Raises:
            LinkDownError: on timeout or a dropped connection.
        """
        import paramiko

        command = f"cd -- {shlex.quote(self.root)} && " + " ".join(shlex.quote(a) for a in argv)
        try:
            _stdin, stdout, stderr = self.client.exec_command(command, timeout=timeout_s)
            out = stdout.read().decode("utf-8", "replace")
            err = stderr.read().decode("utf-8", "replace")
            status = stdout.channel.recv_exit_status()
        except (TimeoutError, EOFError, OSError, paramiko.SSHException) as exc:
            raise LinkDownError(
                f"remote command {argv[0]} on {self.endpoint.label} failed: {one_line(exc)}"
            ) from exc
        return status, out, err


def open_session(
    target: SshTarget,
    options: ConnectOptions,
    *,
    create_root: bool = False,
    deadline_s: float | None = None,
) -> SshSession:
    """Connect to ``target``, open SFTP and resolve (optionally create) the target directory.

    Args:
        deadline_s: hard limit on the whole call; the connection is closed when it passes.

    Raises:
        LinkDownError, HostNotFoundError: transient, retry later.
        HostKeyUnknownError, HostKeyMismatchError, AuthError: the user must act.
        RemoteIOError, RemotePermissionError: the target directory is missing or not writable.
    """
    endpoint = resolve(target, options)
    clients: list[paramiko.SSHClient] = []  # every client made, so the deadline can close them
    fired = threading.Event()

    def fire() -> None:
        fired.set()
        for made in list(clients):
            made.close()

    timer = threading.Timer(deadline_s, fire) if deadline_s else None
    if timer:
        timer.daemon = True
        timer.start()
    try:
        client, new_host_key, closers = connect_chain(endpoint, options, clients.append)
        try:
            session = SshSession(client, endpoint, options.op_timeout_s)
            session.new_host_key = new_host_key
            session.closers = closers
        except Exception as exc:  # noqa: BLE001
            client.close()
            for closer in reversed(closers):
                closer.close()
            raise LinkDownError(
                f"cannot open SFTP on {endpoint.label}: {one_line(exc)}",
                hint="the remote sshd must enable the sftp subsystem",
            ) from exc
        try:
            session.set_root(target.sftp_path, create=create_root)
        except BaseException:
            session.close()
            raise
    except (SyncError, OSError, EOFError):
        if fired.is_set():
            raise LinkDownError(
                f"connecting to {endpoint.label} exceeded the {deadline_s:g} s deadline"
            ) from None
        raise
    finally:
        if timer:
            timer.cancel()
    return session
