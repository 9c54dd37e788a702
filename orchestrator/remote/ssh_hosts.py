"""Where an SSH connection goes: targets, connect options, ~/.ssh/config resolution, host keys.

- ``parse_target("user@host:~/project")`` splits a target; the host may be an ~/.ssh/config alias.
- ``resolve(target, options)`` applies ~/.ssh/config (``paramiko.SSHConfig``) to an ``Endpoint``.
- ``HostKeyPolicy`` refuses hosts missing from known_hosts, or appends them when told to.

paramiko is imported inside functions so that ``import orchestrator.remote.sync`` stays cheap.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orchestrator.errors import SyncError
from orchestrator.remote.ssh_errors import AuthError, HostKeyUnknownError

if TYPE_CHECKING:
    import paramiko

log = logging.getLogger("orchestrator.remote.ssh")  # the session module's logger name

DEFAULT_SSH_CONFIG = Path("~/.ssh/config")
DEFAULT_KNOWN_HOSTS = Path("~/.ssh/known_hosts")


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


class HostKeyPolicy:
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
