"""Connecting and authenticating a paramiko client: directly, through a ProxyCommand, or hop by
hop through ProxyJump hosts. Every failure becomes a SyncError subclass (see ``ssh_errors``).

paramiko is imported inside functions so that ``import orchestrator.remote.sync`` stays cheap.
"""

from __future__ import annotations

import dataclasses
import socket
import subprocess
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from orchestrator.errors import SyncError
from orchestrator.remote.ssh_errors import (
    AuthError,
    HostKeyMismatchError,
    HostNotFoundError,
    LinkDownError,
    one_line,
)
from orchestrator.remote.ssh_hosts import (
    ConnectOptions,
    Endpoint,
    HostKeyPolicy,
    host_key_name,
    parse_jump,
    resolve,
)

if TYPE_CHECKING:
    import paramiko


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
    policy = HostKeyPolicy(endpoint.known_hosts, options.accept_new_host_key)
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
    except SyncError:  # raised by HostKeyPolicy
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
        raise LinkDownError(f"connection to {where} failed: {one_line(exc)}") from exc
    transport = client.get_transport()
    assert transport is not None
    transport.set_keepalive(max(1, int(options.keepalive_s)))
    return client, policy.accepted_fingerprint


class ProxyProcess:
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


def connect_chain(
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


def _start_proxy(endpoint: Endpoint) -> ProxyProcess:
    import paramiko

    assert endpoint.proxy_command
    try:
        return ProxyProcess(endpoint.proxy_command)
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
                f"{one_line(exc)}"
            ) from exc
    return _connect_client(endpoint, options, on_client, sock=sock)
