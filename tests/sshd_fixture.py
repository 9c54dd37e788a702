"""A real OpenSSH server on 127.0.0.1 for the sync/watch tests (import it explicitly).

``SshServer`` runs ``/usr/sbin/sshd -D`` on a free high port with a throwaway ed25519 host key
and user key made by ssh-keygen, key authentication only, and its own sshd_config, pid file and
log under a temporary folder. The test user is the current user (root in CI: PermitRootLogin
prohibit-password). ``stop()`` ends the listener and every session it forked, by pid; ``start()``
again reuses the same port and keys, which is how the tests cut and restore the link.

    from sshd_fixture import sshd  # noqa: F401  (the pytest fixture)

Missing /usr/sbin/sshd skips the test with the package to install.
"""

from __future__ import annotations

import getpass
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from orchestrator.remote.ssh import ConnectOptions

SSHD = Path("/usr/sbin/sshd")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def keygen(path: Path) -> Path:
    """Write an unencrypted ed25519 key pair at ``path`` and ``path.pub``."""
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "orchestrator-test", "-f", str(path)],
        check=True,
        stdin=subprocess.DEVNULL,
    )
    return path


def require_sshd() -> None:
    """Skip the calling test when OpenSSH's server or ssh-keygen is not installed."""
    if not SSHD.exists() or shutil.which("ssh-keygen") is None:
        pytest.skip("needs OpenSSH's server: apt-get install -y openssh-server")


class SshServer:
    """One sshd on 127.0.0.1:<port>; keys and config live in ``workdir``.

    Args:
        workdir: folder for keys, config, pid file and log (created).
        sftp_args: extra flags of internal-sftp, e.g. ``["-R"]`` for a read-only server.
    """

    def __init__(self, workdir: Path, *, sftp_args: tuple[str, ...] = ()) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.user = getpass.getuser()
        self.host_key = keygen(workdir / "host_ed25519")
        self.client_key = keygen(workdir / "client_ed25519")
        self.authorized_keys = workdir / "authorized_keys"
        self.authorized_keys.write_text((workdir / "client_ed25519.pub").read_text())
        self.pid_file = workdir / "sshd.pid"
        self.log_file = workdir / "sshd.log"
        self.config = workdir / "sshd_config"
        self.config.write_text(
            "\n".join(
                [
                    f"Port {self.port}",
                    "ListenAddress 127.0.0.1",
                    f"HostKey {self.host_key}",
                    f"PidFile {self.pid_file}",
                    f"AuthorizedKeysFile {self.authorized_keys}",
                    "StrictModes no",
                    "UsePAM no",
                    "PasswordAuthentication no",
                    "KbdInteractiveAuthentication no",
                    "PubkeyAuthentication yes",
                    "PermitRootLogin prohibit-password",
                    f"AllowUsers {self.user}",
                    "MaxStartups 50",
                    "LogLevel INFO",
                    "Subsystem sftp internal-sftp " + " ".join(sftp_args),
                    "",
                ]
            )
        )
        # The client's view: known_hosts holding this server's key, an empty ssh config.
        self.known_hosts = workdir / "known_hosts"
        host_pub = (workdir / "host_ed25519.pub").read_text().split()
        self.known_hosts.write_text(f"[127.0.0.1]:{self.port} {host_pub[0]} {host_pub[1]}\n")
        self.empty_ssh_config = workdir / "ssh_config_empty"
        self.empty_ssh_config.write_text("")
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def host_fingerprint(self) -> str:
        """SHA256:... of the host key, as ssh-keygen -l prints it."""
        out = subprocess.run(
            ["ssh-keygen", "-l", "-f", str(self.host_key) + ".pub"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        return out.split()[1]

    def target(self, path: Path | str) -> str:
        """``user@127.0.0.1:path`` (pass the port separately)."""
        return f"{self.user}@127.0.0.1:{path}"

    def options(self, **overrides: object) -> ConnectOptions:
        """ConnectOptions for this server: its port, the test key, no agent, no ~/.ssh/config."""
        values: dict[str, object] = dict(
            port=self.port,
            key_file=self.client_key,
            known_hosts=self.known_hosts,
            ssh_config=self.empty_ssh_config,
            allow_agent=False,
            connect_timeout_s=5.0,
            op_timeout_s=5.0,
        )
        values.update(overrides)
        return ConnectOptions(**values)  # type: ignore[arg-type]

    def write_ssh_config(self, alias: str) -> Path:
        """An ssh config with ``Host <alias>`` pointing at this server; returns its path."""
        path = self.workdir / f"ssh_config_{alias}"
        path.write_text(
            f"Host {alias}\n"
            "  HostName 127.0.0.1\n"
            f"  Port {self.port}\n"
            f"  User {self.user}\n"
            f"  IdentityFile {self.client_key}\n"
            f"  UserKnownHostsFile {self.known_hosts}\n"
        )
        return path

    def start(self, timeout_s: float = 10.0) -> None:
        """Start sshd and wait until it accepts TCP connections on its port."""
        if os.geteuid() == 0:
            Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # privilege separation dir
        log = open(self.log_file, "ab")
        self.process = subprocess.Popen(
            [str(SSHD), "-D", "-e", "-f", str(self.config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        log.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"sshd exited: {self.log_file.read_text()[-2000:]}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"sshd did not listen on {self.port}: {self.log_file.read_text()}")

    def stop(self) -> None:
        """End the listener and every session it forked (by pid), then reap the listener."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        try:
            children = psutil.Process(process.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            children = []
        # Deepest first, each while its parent is alive to reap it (no zombies left to pid 1).
        for child in reversed(children):
            try:
                child.kill()
            except psutil.NoSuchProcess:
                continue
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and child.is_running():
                time.sleep(0.002)
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture
def sshd(tmp_path: Path) -> Iterator[SshServer]:
    """A started SshServer, stopped at teardown."""
    require_sshd()
    server = SshServer(tmp_path / "sshd")
    server.start()
    try:
        yield server
    finally:
        server.stop()
