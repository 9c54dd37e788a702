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

paramiko is imported inside functions so that ``import orchestrator.sync`` stays cheap.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import posixpath
import shlex
import socket
import stat
import subprocess
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import SyncError

if TYPE_CHECKING:
    import paramiko

log = logging.getLogger(__name__)

DEFAULT_SSH_CONFIG = Path("~/.ssh/config")
DEFAULT_KNOWN_HOSTS = Path("~/.ssh/known_hosts")


# --------------------------------------------------------------------------- errors


class LinkDownError(SyncError):
    """The network path is down or slow (refused, timed out, reset): retry with backoff."""


class HostNotFoundError(LinkDownError):
    """The host name does not resolve (typo, or DNS down while the laptop roams)."""


class HostKeyUnknownError(SyncError):
    """The host is not in known_hosts; ``fingerprint`` is the key it presented (SHA256:...)."""

    def __init__(self, message: str, fingerprint: str, hint: str | None = None) -> None:
        super().__init__(message, hint)
        self.fingerprint = fingerprint


class HostKeyMismatchError(SyncError):
    """The host presented a different key than known_hosts records: refused, never retried."""

    def __init__(self, message: str, fingerprint: str, expected_fingerprint: str, hint: str):
        super().__init__(message, hint)
        self.fingerprint = fingerprint
        self.expected_fingerprint = expected_fingerprint


class AuthError(SyncError):
    """No offered key was accepted (or the only key needs a passphrase): never retried."""


class RemotePathError(SyncError):
    """A remote path is malformed or would leave the target directory."""


class RemotePermissionError(SyncError):
    """The remote account may not create or write a path under the target directory."""


class RemoteDiskFullError(SyncError):
    """The remote file system has no space left for the upload."""


class RemoteIOError(SyncError):
    """Any other failed SFTP operation (missing directory, read-only file system, ...)."""


# --------------------------------------------------------------------------- targets


@dataclass(frozen=True)
class SshTarget:
    """A parsed ``[user@]host:path``; ``host`` may be an ssh-config alias, ``path`` as written."""

    host: str
    user: str | None
    path: str

    def __str__(self) -> str:
        user = f"{self.user}@" if self.user else ""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{user}{host}:{self.path}"

    @property
    def sftp_path(self) -> str:
        """The path as SFTP and a login shell see it: ``~/x`` and ``x`` are relative to home."""
        if self.path in ("", "~", "~/"):
            return "."
        if self.path.startswith("~/"):
            return self.path[2:]
        return self.path


def parse_target(text: str) -> SshTarget:
    """Split ``user@host:path``, ``host:path``, ``alias:path`` or ``user@[::1]:path``.

    Raises:
        ValueError: with a sentence naming the expected form (pydantic turns it into a
            config error; the watch CLI into a RemotePathError).
    """
    form = "expected user@host:path or ssh-config-alias:path"
    if any(ch in text for ch in "\0\n\r"):
        raise ValueError(f"target {text!r} contains a control character; {form}")
    user: str | None = None
    rest = text
    at, colon = text.find("@"), text.find(":")
    if at != -1 and (colon == -1 or at < colon):
        user, rest = text[:at], text[at + 1 :]
        if not user:
            raise ValueError(f"target {text!r} has an empty user name; {form}")
    if rest.startswith("["):
        host, sep, tail = rest[1:].partition("]")
        if not sep or not tail.startswith(":"):
            raise ValueError(f"target {text!r} has an unterminated [ipv6] host; {form}")
        path = tail[1:]
    else:
        host, sep, path = rest.partition(":")
        if not sep:
            raise ValueError(f"target {text!r} has no ':path' part; {form}")
    if not host or host.startswith("-") or any(c.isspace() for c in host):
        raise ValueError(f"target {text!r} has no valid host; {form}")
    if path.startswith("~") and not (path == "~" or path.startswith("~/")):
        raise ValueError(f"target {text!r}: ~user paths are not supported; use ~/path or /abs")
    return SshTarget(host=host, user=user, path=path)


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


# --------------------------------------------------------------------------- connecting


@dataclass(frozen=True)
class ConnectOptions:
    """How to reach a target. ``None`` means: take it from ~/.ssh/config, then the default."""

    port: int | None = None
    key_file: Path | None = None
    known_hosts: Path | None = None
    accept_new_host_key: bool = False
    ssh_config: Path | None = None
    connect_timeout_s: float = 10.0
    op_timeout_s: float = 30.0
    keepalive_s: float = 15.0
    allow_agent: bool = True


@dataclass(frozen=True)
class Endpoint:
    """A target after ssh-config resolution: what paramiko actually connects to."""

    hostname: str
    port: int
    user: str
    key_files: tuple[str, ...]
    known_hosts: Path
    label: str = field(default="")  # user@host:port for messages (no secrets)
    proxy_jump: str | None = None  # ProxyJump from ssh config: "[user@]host[:port],..."
    proxy_command: str | None = None  # ProxyCommand from ssh config, tokens expanded


def resolve(target: SshTarget, options: ConnectOptions) -> Endpoint:
    """Apply ~/.ssh/config (``Host`` alias: HostName, User, Port, IdentityFile, UserKnownHostsFile).

    Explicit options win over ssh config, ssh config wins over defaults.

    Raises:
        SyncError: if the ssh config cannot be read.
    """
    import getpass

    import paramiko

    config_path = (options.ssh_config or DEFAULT_SSH_CONFIG).expanduser()
    host_config: dict[str, Any] = {}
    if config_path.is_file():
        try:
            host_config = dict(paramiko.SSHConfig.from_path(str(config_path)).lookup(target.host))
        except (OSError, paramiko.ConfigParseError) as exc:
            raise SyncError(f"cannot read ssh config {config_path}: {exc}") from exc
    elif options.ssh_config is not None:
        raise SyncError(f"ssh config {config_path} does not exist")
    proxy_jump = str(host_config.get("proxyjump") or "") or None
    proxy_command = str(host_config.get("proxycommand") or "") or None
    if proxy_jump and proxy_jump.lower() == "none":
        proxy_jump = None
    if proxy_command and proxy_command.lower() == "none":
        proxy_command = None
    hostname = str(host_config.get("hostname", target.host))
    port = options.port or int(host_config.get("port", 22))
    user = target.user or str(host_config.get("user") or getpass.getuser())
    key_files: list[str] = []
    if options.key_file is not None:
        key_file = options.key_file.expanduser()
        if not key_file.is_file():
            raise AuthError(f"key file {key_file} does not exist")
        key_files.append(str(key_file))
    key_files += [os.path.expanduser(p) for p in host_config.get("identityfile", [])]
    if options.known_hosts is not None:
        known_hosts = options.known_hosts.expanduser()
    elif host_config.get("userknownhostsfile"):
        known_hosts = Path(str(host_config["userknownhostsfile"]).split()[0]).expanduser()
    else:
        known_hosts = DEFAULT_KNOWN_HOSTS.expanduser()
    return Endpoint(
        hostname=hostname,
        port=port,
        user=user,
        key_files=tuple(k for k in key_files if os.path.isfile(k)),
        known_hosts=known_hosts,
        label=f"{user}@{hostname}:{port}",
        proxy_jump=proxy_jump,
        proxy_command=None if proxy_jump else proxy_command,
    )


def parse_jump(hop: str) -> tuple[SshTarget, int | None]:
    """Split one ProxyJump hop, ``[user@]host[:port]`` (``[v6]:port`` for IPv6).

    Raises:
        SyncError: if the hop is malformed.
    """
    text = hop.strip().removeprefix("ssh://")
    user, _, rest = text.rpartition("@")
    if rest.startswith("["):
        host, _, tail = rest[1:].partition("]")
        port_text = tail.removeprefix(":")
    else:
        host, _, port_text = rest.partition(":")
    if not host or (port_text and not port_text.isdigit()):
        raise SyncError(f"cannot parse ProxyJump hop {hop!r}; expected [user@]host[:port]")
    return SshTarget(host=host, user=user or None, path=""), int(port_text) if port_text else None


def host_key_name(hostname: str, port: int) -> str:
    """The name known_hosts stores a key under (OpenSSH's ``[host]:port`` for non-22 ports)."""
    return hostname if port == 22 else f"[{hostname}]:{port}"


class _HostKeyPolicy:
    """paramiko MissingHostKeyPolicy: refuse unknown keys, or append them when told to.

    Duck-typed (paramiko calls ``missing_host_key`` without an isinstance check) so that this
    module does not import paramiko at import time.
    """

    def __init__(self, known_hosts: Path, accept_new: bool) -> None:
        self.known_hosts = known_hosts
        self.accept_new = accept_new
        self.accepted_fingerprint: str | None = None

    def missing_host_key(self, client: paramiko.SSHClient, hostname: str, key: Any) -> None:
        fingerprint = key.fingerprint
        if not self.accept_new:
            raise HostKeyUnknownError(
                f"host {hostname} is not in {self.known_hosts}; it presented the "
                f"{key.get_name()} key {fingerprint}",
                fingerprint=fingerprint,
                hint="compare that fingerprint with the server's (ssh-keygen -lf "
                "/etc/ssh/ssh_host_ed25519_key.pub on it), then connect once with "
                "--accept-new-host-key (or accept_unknown_host: true in the plan's sync section)",
            )
        client.get_host_keys().add(hostname, key.get_name(), key)
        self.known_hosts.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        with open(self.known_hosts, "a+b") as fh:
            fh.seek(0, os.SEEK_END)
            if fh.tell() > 0:
                fh.seek(-1, os.SEEK_END)
                if fh.read(1) != b"\n":
                    fh.write(b"\n")  # never glue our line onto an unterminated last line
            fh.write(f"{hostname} {key.get_name()} {key.get_base64()}\n".encode("ascii"))
        self.accepted_fingerprint = fingerprint
        log.warning(
            "added host %s (%s %s) to %s", hostname, key.get_name(), fingerprint, self.known_hosts
        )


def _connect_client(
    endpoint: Endpoint,
    options: ConnectOptions,
    on_client: Callable[[paramiko.SSHClient], None] | None = None,
    sock: Any = None,
) -> tuple[paramiko.SSHClient, str | None]:
    """Connect and authenticate; returns the client and the fingerprint of a newly accepted
    host key (None when the key was already known). Every failure is a SyncError subclass.

    ``on_client`` receives the client before connecting (so a deadline timer can close it).
    """
    import paramiko

    client = paramiko.SSHClient()
    if on_client is not None:
        on_client(client)
    if endpoint.known_hosts.is_file():
        try:
            client.load_host_keys(str(endpoint.known_hosts))
        except (OSError, paramiko.SSHException) as exc:
            raise SyncError(f"cannot read known_hosts {endpoint.known_hosts}: {exc}") from exc
    policy = _HostKeyPolicy(endpoint.known_hosts, options.accept_new_host_key)
    client.set_missing_host_key_policy(policy)  # type: ignore[arg-type]
    where = endpoint.label
    try:
        client.connect(
            endpoint.hostname,
            port=endpoint.port,
            username=endpoint.user,
            password=None,
            key_filename=list(endpoint.key_files) or None,
            allow_agent=options.allow_agent,
            look_for_keys=True,
            timeout=options.connect_timeout_s,
            banner_timeout=options.connect_timeout_s,
            auth_timeout=options.connect_timeout_s,
            channel_timeout=options.op_timeout_s,
            sock=sock,
        )
    except SyncError:  # raised by _HostKeyPolicy
        client.close()
        raise
    except paramiko.BadHostKeyException as exc:
        client.close()
        name = host_key_name(endpoint.hostname, endpoint.port)
        raise HostKeyMismatchError(
            f"HOST KEY MISMATCH for {name}: it presented {exc.key.get_name()} "
            f"{exc.key.fingerprint}, but {endpoint.known_hosts} records "
            f"{exc.expected_key.fingerprint}; refusing to connect (possible man-in-the-middle)",
            fingerprint=exc.key.fingerprint,
            expected_fingerprint=exc.expected_key.fingerprint,
            hint=f"if the server was reinstalled, verify the new key, then run "
            f"ssh-keygen -R '{name}' -f {endpoint.known_hosts}",
        ) from exc
    except paramiko.PasswordRequiredException as exc:
        client.close()
        raise AuthError(
            f"authentication to {where} failed: the key needs a passphrase",
            hint="load the key into ssh-agent (ssh-add); passphrases and passwords are never "
            "read from the plan",
        ) from exc
    except paramiko.AuthenticationException as exc:
        client.close()
        raise AuthError(
            f"authentication to {where} failed: no offered key was accepted ({exc})",
            hint="load your key into ssh-agent, pass --key-file (key_file: in the plan), or set "
            "IdentityFile in ~/.ssh/config; passwords are not used",
        ) from exc
    except socket.gaierror as exc:
        client.close()
        raise HostNotFoundError(f"unknown host {endpoint.hostname!r}: {exc.strerror}") from exc
    except paramiko.ssh_exception.NoValidConnectionsError as exc:
        client.close()
        raise LinkDownError(
            f"connection to {where} refused", hint="is sshd running there, and is the port right?"
        ) from exc
    except TimeoutError as exc:
        client.close()
        raise LinkDownError(
            f"connection to {where} timed out after {options.connect_timeout_s:g} s"
        ) from exc
    except (OSError, EOFError, paramiko.SSHException) as exc:
        client.close()
        if "No authentication methods available" in str(exc):
            raise AuthError(
                f"authentication to {where} failed: no key to offer",
                hint="pass --key-file, set IdentityFile in ~/.ssh/config or start ssh-agent",
            ) from exc
        raise LinkDownError(f"connection to {where} failed: {_one_line(exc)}") from exc
    transport = client.get_transport()
    assert transport is not None
    transport.set_keepalive(max(1, int(options.keepalive_s)))
    return client, policy.accepted_fingerprint


class _ProxyProcess:
    """Owns a ProxyCommand's process: ``close()`` ends it, reaps it and closes its pipes.

    paramiko's ProxyCommand.close() only sends SIGTERM (and raises if the process was already
    reaped), so the socket handed to paramiko is a subclass whose close() is idempotent; the
    session calls this ``close()`` after the transport thread has finished reading.
    """

    def __init__(self, command: str) -> None:
        import paramiko

        class _IdempotentProxyCommand(paramiko.ProxyCommand):  # type: ignore[misc]
            def close(self) -> None:
                if self.process.poll() is None:
                    self.process.terminate()

        self.sock = _IdempotentProxyCommand(command)

    def close(self) -> None:
        process = self.sock.process
        if process.poll() is None:
            process.terminate()
        try:
            process.wait(timeout=2)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        for pipe in (process.stdin, process.stdout, process.stderr):
            if pipe is not None:
                pipe.close()


def _connect_chain(
    endpoint: Endpoint,
    options: ConnectOptions,
    on_client: Callable[[paramiko.SSHClient], None],
) -> tuple[paramiko.SSHClient, str | None, list[paramiko.SSHClient]]:
    """Connect to ``endpoint`` directly, through its ProxyCommand, or hop by hop through its
    ProxyJump hosts (each a direct-tcpip channel of the previous one, as OpenSSH's -J does).

    Returns:
        (client, newly accepted host key fingerprint or None, what to close after the client:
        the jump hosts' clients and ProxyCommand processes).
    """

    if not endpoint.proxy_jump and not endpoint.proxy_command:
        client, new_key = _connect_client(endpoint, options, on_client)
        return client, new_key, []
    closers: list[Any] = []
    try:
        if endpoint.proxy_command:
            proxy = _start_proxy(endpoint)
            closers.append(proxy)
            client, new_key = _connect_client(endpoint, options, on_client, sock=proxy.sock)
            return client, new_key, closers
        client, new_key = _connect_jumps(endpoint, options, on_client, closers)
    except BaseException:
        for closer in reversed(closers):
            closer.close()
        raise
    return client, new_key, closers


def _start_proxy(endpoint: Endpoint) -> _ProxyProcess:
    import paramiko

    assert endpoint.proxy_command
    try:
        return _ProxyProcess(endpoint.proxy_command)
    except (OSError, paramiko.SSHException) as exc:
        raise LinkDownError(f"ProxyCommand for {endpoint.label} failed: {exc}") from exc


def _connect_jumps(
    endpoint: Endpoint,
    options: ConnectOptions,
    on_client: Callable[[paramiko.SSHClient], None],
    closers: list[Any],
) -> tuple[paramiko.SSHClient, str | None]:
    """Connect through ``endpoint.proxy_jump``; appends every hop's client to ``closers``."""
    import paramiko

    assert endpoint.proxy_jump
    hop_options = dataclasses.replace(options, port=None)
    hops: list[Endpoint] = []
    for hop in endpoint.proxy_jump.split(","):
        hop_target, hop_port = parse_jump(hop)
        hop_endpoint = resolve(hop_target, dataclasses.replace(hop_options, port=hop_port))
        if hop_endpoint.proxy_jump and hops:
            raise SyncError(f"ProxyJump host {hop_target.host} has its own ProxyJump: unsupported")
        hops.append(dataclasses.replace(hop_endpoint, proxy_jump=None))
    sock: Any = None
    for hop_endpoint, next_endpoint in zip(hops, [*hops[1:], endpoint], strict=True):
        if sock is None and hop_endpoint.proxy_command:
            proxy = _start_proxy(hop_endpoint)
            closers.append(proxy)
            sock = proxy.sock
        client, _ = _connect_client(hop_endpoint, hop_options, on_client, sock=sock)
        closers.append(client)
        transport = client.get_transport()
        assert transport is not None
        try:
            sock = transport.open_channel(
                "direct-tcpip",
                (next_endpoint.hostname, next_endpoint.port),
                ("127.0.0.1", 0),
                timeout=options.connect_timeout_s,
            )
        except (OSError, EOFError, paramiko.SSHException) as exc:
            raise LinkDownError(
                f"jump host {hop_endpoint.label} cannot reach {next_endpoint.label}: "
                f"{_one_line(exc)}"
            ) from exc
    return _connect_client(endpoint, options, on_client, sock=sock)


def _one_line(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return " ".join(text.split())


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
        return LinkDownError(f"{op} {path} on {where} timed out")
    if isinstance(exc, (EOFError, paramiko.SSHException)):
        return LinkDownError(f"{op} {path} on {where}: connection lost ({_one_line(exc)})")
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
            return LinkDownError(f"{op} {path} on {where}: connection lost ({_one_line(exc)})")
        free_bytes = session.free_bytes(posixpath.dirname(path) or ".")
        if free_bytes is not None and free_bytes < 64 * 1024:
            return RemoteDiskFullError(
                f"remote disk full: cannot {op} {path} on {where} ({free_bytes} bytes free)",
                hint="free space on the remote machine; the push resumes by itself",
            )
        return RemoteIOError(f"cannot {op} {path} on {where}: {_one_line(exc)}")
    return RemoteIOError(f"cannot {op} {path} on {where}: {_one_line(exc)}")


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
                if not isinstance(closer, _ProxyProcess):  # no waiting in a timer thread
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
                f"remote command {argv[0]} on {self.endpoint.label} failed: {_one_line(exc)}"
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
        client, new_host_key, closers = _connect_chain(endpoint, options, clients.append)
        try:
            session = SshSession(client, endpoint, options.op_timeout_s)
            session.new_host_key = new_host_key
            session.closers = closers
        except Exception as exc:  # noqa: BLE001
            client.close()
            for closer in reversed(closers):
                closer.close()
            raise LinkDownError(
                f"cannot open SFTP on {endpoint.label}: {_one_line(exc)}",
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
