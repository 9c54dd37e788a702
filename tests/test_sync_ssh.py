"""orchestrator.remote.ssh against a real OpenSSH sshd on 127.0.0.1: targets, host keys, auth, errors."""

from __future__ import annotations

import os
import posixpath
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pydantic
import pytest
import sshd_fixture
from hypothesis import given
from hypothesis import strategies as st
from sshd_fixture import SshServer, free_port, keygen, require_sshd

from orchestrator.remote.ssh import (
    AuthError,
    HostKeyMismatchError,
    HostKeyUnknownError,
    LinkDownError,
    RemoteDiskFullError,
    RemoteIOError,
    RemotePathError,
    RemotePermissionError,
    SshTarget,
    check_relative,
    open_session,
    parse_target,
)
from orchestrator.remote.sync import upload_atomic
from orchestrator.remote.sync_config import SyncConfig

sshd = sshd_fixture.sshd  # the fixture: a started SshServer


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("me@gpu:~/project", SshTarget("gpu", "me", "~/project")),
        ("gpu-alias:/abs/dir", SshTarget("gpu-alias", None, "/abs/dir")),
        ("me@[::1]:x", SshTarget("::1", "me", "x")),
        ("box:", SshTarget("box", None, "")),
        ("me@box:dir with space", SshTarget("box", "me", "dir with space")),
    ],
)
def test_parse_target(text: str, expected: SshTarget) -> None:
    assert parse_target(text) == expected


@pytest.mark.parametrize("text", ["no-colon", ":path", "@box:p", "-oProxyCommand=x:p", "b:~bob/x"])
def test_parse_target_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="target"):
        parse_target(text)


def test_sftp_path_of_home_relative_targets() -> None:
    assert parse_target("h:~/p/q").sftp_path == "p/q"
    assert parse_target("h:~").sftp_path == "."
    assert parse_target("h:/abs").sftp_path == "/abs"


@pytest.mark.parametrize("rel", ["../x", "a/../../x", "/etc/passwd", "~/x", "", "a\0b", "a/.."])
def test_check_relative_rejects_escapes(rel: str) -> None:
    with pytest.raises(RemotePathError):
        check_relative(rel)


def test_check_relative_normalizes() -> None:
    assert check_relative("./a//b/./c.png") == "a/b/c.png"


def test_sync_config_rejects_bad_target_and_globs() -> None:
    with pytest.raises(pydantic.ValidationError, match="target"):
        SyncConfig(target="nocolon")
    with pytest.raises(pydantic.ValidationError, match="relative glob"):
        SyncConfig(target="h:p", files=("../secrets/*",))
    with pytest.raises(pydantic.ValidationError, match="extra"):
        SyncConfig(target="h:p", password="hunter2")  # type: ignore[call-arg]


def test_connects_creates_root_and_quotes_commands(sshd: SshServer, tmp_path: Path) -> None:
    root = tmp_path / "remote dir; rm -rf x"
    session = open_session(parse_target(sshd.target(root)), sshd.options(), create_root=True)
    try:
        assert session.root == str(root)
        assert root.is_dir()
        code, out, _ = session.run(["pwd"], timeout_s=5)
        assert (code, out.strip()) == (0, str(root))
        code, out, _ = session.run(["echo", "$HOME; `id`"], timeout_s=5)
        assert out.strip() == "$HOME; `id`"  # quoted: no expansion, no injection
    finally:
        session.close()


def test_ssh_config_alias(sshd: SshServer, tmp_path: Path) -> None:
    config = sshd.write_ssh_config("gpubox")
    options = sshd.options(port=None, key_file=None, known_hosts=None, ssh_config=config)
    session = open_session(parse_target(f"gpubox:{tmp_path}"), options)
    try:
        assert session.endpoint.port == sshd.port and session.endpoint.hostname == "127.0.0.1"
    finally:
        session.close()


def test_missing_remote_dir_is_clear(sshd: SshServer, tmp_path: Path) -> None:
    with pytest.raises(RemoteIOError, match="does not exist"):
        open_session(parse_target(sshd.target(tmp_path / "nope")), sshd.options())


def test_unknown_host_refused_with_fingerprint_unless_accepted(
    sshd: SshServer, tmp_path: Path
) -> None:
    known = tmp_path / "kh" / "known_hosts"
    target = parse_target(sshd.target(tmp_path))
    with pytest.raises(HostKeyUnknownError) as info:
        open_session(target, sshd.options(known_hosts=known))
    assert info.value.fingerprint == sshd.host_fingerprint
    assert sshd.host_fingerprint in str(info.value)
    assert not known.exists()  # refusing writes nothing

    known.parent.mkdir()
    known.write_text("# other hosts, no final newline")
    open_session(target, sshd.options(known_hosts=known, accept_new_host_key=True)).close()
    lines = known.read_text().splitlines()
    assert lines[0] == "# other hosts, no final newline"
    assert lines[1].startswith(f"[127.0.0.1]:{sshd.port} ssh-ed25519 ")
    open_session(target, sshd.options(known_hosts=known)).close()  # now known


def test_host_key_mismatch_refused_with_both_fingerprints(sshd: SshServer, tmp_path: Path) -> None:
    other = keygen(tmp_path / "other_host")
    kind, blob = (tmp_path / "other_host.pub").read_text().split()[:2]
    known = tmp_path / "known_hosts"
    known.write_text(f"[127.0.0.1]:{sshd.port} {kind} {blob}\n")
    with pytest.raises(HostKeyMismatchError) as info:
        open_session(
            parse_target(sshd.target(tmp_path)),
            sshd.options(known_hosts=known, accept_new_host_key=True),  # never overrides a change
        )
    assert info.value.fingerprint == sshd.host_fingerprint
    other_fp = subprocess.run(
        ["ssh-keygen", "-lf", f"{other}.pub"], capture_output=True, text=True, check=True
    ).stdout.split()[1]
    assert info.value.expected_fingerprint == other_fp
    assert "ssh-keygen -R" in (info.value.hint or "")
    assert known.read_text().count("\n") == 1


def test_auth_failure_is_clear(sshd: SshServer, tmp_path: Path) -> None:
    stranger = keygen(tmp_path / "stranger")
    with pytest.raises(AuthError, match="authentication .* failed"):
        open_session(parse_target(sshd.target(tmp_path)), sshd.options(key_file=stranger))


def test_refused_connection_is_transient(tmp_path: Path) -> None:
    require_sshd()
    server = SshServer(tmp_path / "down")  # configured, never started
    with pytest.raises(LinkDownError, match="refused"):
        open_session(parse_target(server.target(tmp_path)), server.options(port=free_port()))


def test_permission_denied_on_remote_path(tmp_path: Path) -> None:
    require_sshd()
    server = SshServer(tmp_path / "ro", sftp_args=("-R",))  # read-only SFTP server
    server.start()
    try:
        session = open_session(parse_target(server.target(tmp_path)), server.options())
        try:
            (tmp_path / "f.md").write_text("x")
            with pytest.raises(RemotePermissionError, match="permission denied"):
                upload_atomic(session, tmp_path / "f.md", "sub/f.md")
        finally:
            session.close()
    finally:
        server.stop()


def test_remote_disk_full(sshd: SshServer, tmp_path: Path) -> None:
    small = tmp_path / "small fs"
    small.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(small)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip("needs permission to mount a tmpfs (root with CAP_SYS_ADMIN)")
    try:
        (tmp_path / "big.png").write_bytes(os.urandom(300_000))
        session = open_session(parse_target(sshd.target(small)), sshd.options())
        try:
            with pytest.raises(RemoteDiskFullError, match="disk full"):
                upload_atomic(session, tmp_path / "big.png", "big.png")
            assert [p.name for p in small.iterdir()] == []  # the temp file was removed
        finally:
            session.close()
    finally:
        subprocess.run(["umount", str(small)], check=True)


def test_symlink_escape_rejected(sshd: SshServer, tmp_path: Path) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (root / "evil").symlink_to(outside)
    (tmp_path / "x.png").write_bytes(b"png")
    session = open_session(parse_target(sshd.target(root)), sshd.options())
    try:
        with pytest.raises(RemotePathError, match="outside"):
            upload_atomic(session, tmp_path / "x.png", "evil/x.png")
        with pytest.raises(RemotePathError):
            session.remote_path("../outside/x.png")
    finally:
        session.close()
    assert list(outside.iterdir()) == []


def test_importing_sync_and_watch_does_not_import_paramiko_or_rich() -> None:
    code = (
        "import sys, orchestrator.remote.sync, orchestrator.remote.watch, orchestrator.remote.sync_config\n"
        "print(sorted(m for m in ('paramiko', 'rich') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


@given(st.lists(st.sampled_from(["a", "b c", ".", "..", "", "~", "x/", "/"]), max_size=8))
def test_check_relative_never_leaves_the_root(parts: list[str]) -> None:
    rel = "/".join(parts)
    try:
        clean = check_relative(rel)
    except RemotePathError:
        return
    joined = posixpath.normpath(posixpath.join("/root dir", clean))
    assert joined.startswith("/root dir/") and ".." not in clean.split("/")


def settles_at(server: SshServer, sessions: int, timeout_s: float = 5.0) -> bool:
    """Whether ``server`` serves exactly ``sessions`` connections (forked children) within
    ``timeout_s`` (the fixture's readiness probe leaves a short-lived one behind)."""
    assert server.process is not None
    deadline = time.monotonic() + timeout_s
    while len(psutil.Process(server.process.pid).children()) != sessions:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_proxy_jump_and_proxy_command_from_ssh_config(sshd: SshServer, tmp_path: Path) -> None:
    jump = SshServer(tmp_path / "jump")
    jump.start()
    try:
        common = (
            f"  HostName 127.0.0.1\n  User {sshd.user}\n  IdentityFile {sshd.client_key}\n"
            f"  UserKnownHostsFile {tmp_path / 'known_hosts'}\n"
        )
        (tmp_path / "known_hosts").write_text(
            sshd.known_hosts.read_text() + jump.known_hosts.read_text()
        )
        jump.authorized_keys.write_text((sshd.workdir / "client_ed25519.pub").read_text())
        proxy_command = (
            f"ssh -q -W %h:%p -p {jump.port} -i {sshd.client_key} -o BatchMode=yes "
            f"-o UserKnownHostsFile={tmp_path / 'known_hosts'} {sshd.user}@127.0.0.1"
        )
        config = tmp_path / "ssh_config"
        config.write_text(
            f"Host bastion\n  Port {jump.port}\n{common}"
            f"Host viajump\n  Port {sshd.port}\n  ProxyJump bastion\n{common}"
            f"Host viacommand\n  Port {sshd.port}\n  ProxyCommand {proxy_command}\n{common}"
        )
        options = sshd.options(port=None, key_file=None, known_hosts=None, ssh_config=config)
        for alias in ("viajump", "viacommand"):
            assert settles_at(jump, 0)
            session = open_session(parse_target(f"{alias}:{tmp_path}"), options)
            try:
                assert session.run(["pwd"], timeout_s=5)[1].strip() == str(tmp_path)
                assert settles_at(jump, 1), f"{alias}: the connection did not go through the hop"
            finally:
                session.close()
            assert settles_at(jump, 0), f"{alias}: the hop was not closed"
    finally:
        jump.stop()
