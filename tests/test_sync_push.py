"""The push side (orchestrator.remote.sync) against a real OpenSSH sshd on 127.0.0.1."""

from __future__ import annotations

import dataclasses
import fnmatch
import os
import random
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest
import sshd_fixture
from hypothesis import given
from hypothesis import strategies as st
from sshd_fixture import SshServer

from orchestrator.remote.ssh import LinkDownError, open_session, parse_target
from orchestrator.remote.sync import (
    NullSyncer,
    SftpSyncer,
    SyncStatus,
    backoff_delay_s,
    connect_options,
    glob_regex,
    make_syncer,
    push_order,
    scan_files,
    upload_atomic,
)
from orchestrator.remote.sync_config import SyncConfig

sshd = sshd_fixture.sshd  # the fixture: a started SshServer


def wait_for(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.02)


def syncer_thread_alive(syncer: SftpSyncer) -> bool:
    thread = syncer._thread  # the push thread (private: what close() must end)
    return thread is not None and thread.is_alive()


def make_plan_dir(root: Path) -> Path:
    """A plan folder with what a controller writes: dashboard, plots, a report, checkpoints."""
    viz = root / "results" / "plan" / "race" / "success_viz"
    viz.mkdir(parents=True)
    (root / "PARALLEL_PROGRESS.md").write_text("# race\n\n| w | acc |\n|---|---|\n| a | 0.8 |\n")
    (root / "progress.png").write_bytes(os.urandom(50_000))
    (viz / "figure.png").write_bytes(os.urandom(10_000))
    (viz / "race_REPORT.md").write_text("winner: a\n")
    ckpt = root / "results" / "plan" / "race" / "a" / "checkpoints"
    ckpt.mkdir(parents=True)
    (ckpt / "latest.pt").write_bytes(b"weights")
    (root / "notes.txt").write_text("not pushed")
    (root / ".worktrees" / "x" / "results" / "success_viz").mkdir(parents=True)
    (root / ".worktrees" / "x" / "results" / "success_viz" / "hidden.png").write_bytes(b"h")
    return root


def syncer_for(server: SshServer, plan: Path, remote: Path, **config: object) -> SftpSyncer:
    values: dict[str, object] = dict(target=server.target(remote), interval_s=0.2)
    values.update(config)
    return SftpSyncer(
        SyncConfig(**values),  # type: ignore[arg-type]
        local_root=plan,
        rng=random.Random(0),
        options=server.options(connect_timeout_s=2.0, op_timeout_s=2.0),
    )


def test_scan_selects_default_files_only(tmp_path: Path) -> None:
    plan = make_plan_dir(tmp_path / "plan")
    config = SyncConfig(target="h:p")
    found = sorted(scan_files(plan, config.patterns))
    assert found == [
        "PARALLEL_PROGRESS.md",
        "progress.png",
        "results/plan/race/success_viz/figure.png",
        "results/plan/race/success_viz/race_REPORT.md",
    ]
    with_ckpt = SyncConfig(target="h:p", include_checkpoints=True)
    assert "results/plan/race/a/checkpoints/latest.pt" in scan_files(
        plan, with_ckpt.patterns, include_checkpoints=True
    )


@pytest.mark.parametrize(
    ("pattern", "rel", "expected"),
    [
        ("**/success_viz/*.png", "results/p/e/success_viz/SUCCESS_VISUALIZATION.png", True),
        ("**/success_viz/*.png", "success_viz/x.png", True),
        ("**/success_viz/*.png", "success_viz/deeper/x.png", False),
        ("**/success_viz/*_REPORT.md", "r/e/success_viz/SUCCESS_REPORT.md", True),
        ("progress*.png", "progress.png", True),
        ("progress*.png", "sub/progress.png", False),
        ("a/[!b]?.md", "a/cx.md", True),
        ("a/[!b]?.md", "a/bx.md", False),
        ("PARALLEL_PROGRESS.md", "PARALLEL_PROGRESS.mdx", False),
        ("**/checkpoints/*", "r/e/w/checkpoints/latest.pt", True),
    ],
)
def test_glob_regex(pattern: str, rel: str, expected: bool) -> None:
    assert bool(glob_regex(pattern).match(rel)) is expected


def test_scan_skips_symlinks_leading_outside(tmp_path: Path) -> None:
    plan = tmp_path / "plan"
    plan.mkdir()
    secret = tmp_path / "id_ed25519"
    secret.write_text("PRIVATE")
    (plan / "progress_secret.png").symlink_to(secret)
    assert scan_files(plan, ("progress*.png",)) == {}


def test_push_order_puts_markdown_last() -> None:
    assert push_order(["b.md", "a.png", "c/d.png", "a.md"]) == ["a.png", "c/d.png", "a.md", "b.md"]


def test_backoff_grows_with_jitter_and_cap() -> None:
    rng = random.Random(1)
    delays = [backoff_delay_s(n, base_s=1.0, cap_s=8.0, rng=rng) for n in range(1, 8)]
    for n, delay in enumerate(delays, start=1):
        ceiling = min(8.0, 2 ** (n - 1))
        assert ceiling / 2 <= delay <= ceiling
    assert len(set(delays)) == len(delays)  # jittered


def test_null_syncer_and_factory(tmp_path: Path) -> None:
    null = make_syncer(None, local_root=tmp_path)
    assert isinstance(null, NullSyncer)
    null.start()
    null.notify_changed()
    null.push_now()
    assert null.status() == SyncStatus(last_success_s=None, error=None, pushes=0)
    null.close()
    assert isinstance(make_syncer(SyncConfig(target="h:p"), local_root=tmp_path), SftpSyncer)


def test_pushes_dashboard_plots_and_report_only_changed(sshd: SshServer, tmp_path: Path) -> None:
    plan = make_plan_dir(tmp_path / "plan with space")
    remote = tmp_path / "laptop copy"
    syncer = syncer_for(sshd, plan, remote)
    syncer.start()
    try:
        wait_for(lambda: syncer.status().pushes >= 1, 10, "the first push")
        for rel in [
            "PARALLEL_PROGRESS.md",
            "progress.png",
            "results/plan/race/success_viz/figure.png",
            "results/plan/race/success_viz/race_REPORT.md",
        ]:
            assert (remote / rel).read_bytes() == (plan / rel).read_bytes()
            assert int((remote / rel).stat().st_mtime) == int((plan / rel).stat().st_mtime)
        assert not (remote / "results/plan/race/a/checkpoints").exists()
        assert not (remote / "notes.txt").exists() and not (remote / ".worktrees").exists()
        assert syncer.files_uploaded == 4
        assert syncer.status().error is None

        pushes = syncer.status().pushes
        wait_for(lambda: syncer.status().pushes >= pushes + 2, 10, "two idle rounds")
        assert syncer.files_uploaded == 4  # nothing changed: nothing uploaded

        (plan / "PARALLEL_PROGRESS.md").write_text("# race\n\nwinner: a\n")
        syncer.push_now()
        wait_for(
            lambda: (remote / "PARALLEL_PROGRESS.md").read_text() == "# race\n\nwinner: a\n",
            5,
            "the changed dashboard",
        )
        assert syncer.files_uploaded == 5
        assert [p.name for p in remote.iterdir() if p.name.endswith(".part")] == []
    finally:
        syncer.close()


def test_pushes_images_the_dashboard_references(sshd: SshServer, tmp_path: Path) -> None:
    plan = tmp_path / "plan"
    (plan / "dash" / "figs").mkdir(parents=True)
    (plan / "dash" / "PARALLEL_PROGRESS.md").write_text(
        "![curve](figs/curve%201.png) ![up](../outside.png) ![gone](figs/later.png)\n"
    )
    (plan / "dash" / "figs" / "curve 1.png").write_bytes(b"curve")
    (plan / "dash" / "figs" / "unreferenced.png").write_bytes(b"no")
    (tmp_path / "outside.png").write_bytes(b"secret")
    remote = tmp_path / "remote"
    syncer = syncer_for(sshd, plan, remote)
    syncer.start()
    try:
        wait_for(lambda: syncer.status().pushes >= 1, 10, "the first push")
        assert (remote / "dash" / "figs" / "curve 1.png").read_bytes() == b"curve"
        assert not (remote / "dash" / "figs" / "unreferenced.png").exists()
        (plan / "dash" / "figs" / "later.png").write_bytes(b"later")  # referenced, now written
        syncer.push_now()
        wait_for(lambda: (remote / "dash" / "figs" / "later.png").exists(), 5, "the late image")
    finally:
        syncer.close()
    assert sorted(p.name for p in remote.rglob("*") if p.is_file()) == [
        "PARALLEL_PROGRESS.md",
        "curve 1.png",
        "later.png",
    ]


def test_restarted_syncer_does_not_reupload_unchanged_files(
    sshd: SshServer, tmp_path: Path
) -> None:
    plan = make_plan_dir(tmp_path / "plan")
    remote = tmp_path / "remote"
    first = syncer_for(sshd, plan, remote)
    first.start()
    wait_for(lambda: first.status().pushes >= 1, 10, "the first push")
    first.close()
    second = syncer_for(sshd, plan, remote)  # a controller restart
    second.start()
    try:
        wait_for(lambda: second.status().pushes >= 1, 10, "the second syncer's push")
        assert second.files_uploaded == 0
    finally:
        second.close()


def test_atomic_replacement_reader_never_sees_partial_file(sshd: SshServer, tmp_path: Path) -> None:
    """200 pushes of a 20 KB dashboard while a reader polls the remote copy."""
    local = tmp_path / "PARALLEL_PROGRESS.md"
    remote_root = tmp_path / "remote"
    remote_root.mkdir()
    remote_file = remote_root / "PARALLEL_PROGRESS.md"

    def version(i: int) -> bytes:
        body = f"version {i:04d}\n".encode() * 1400  # ~20 KB, every line names the version
        return body + f"END {i:04d}\n".encode()

    local.write_bytes(version(0))
    session = open_session(parse_target(sshd.target(remote_root)), sshd.options())
    upload_atomic(session, local, "PARALLEL_PROGRESS.md")
    stop = threading.Event()
    seen: set[int] = set()
    torn: list[int] = []
    reads = 0

    def reader() -> None:
        nonlocal reads
        while not stop.is_set():
            data = remote_file.read_bytes()
            reads += 1
            try:
                number = int(data[-5:-1])
            except ValueError:  # empty or cut before the END line
                torn.append(len(data))
                continue
            if data != version(number):
                torn.append(len(data))
            seen.add(number)

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for i in range(1, 201):
            local.write_bytes(version(i))
            upload_atomic(session, local, "PARALLEL_PROGRESS.md")
    finally:
        stop.set()
        thread.join()
        session.close()
    assert torn == []
    assert remote_file.read_bytes() == version(200)
    assert reads > 200 and len(seen) > 20  # the reader really overlapped with the pushes


def test_link_killed_and_restored_syncer_catches_up(sshd: SshServer, tmp_path: Path) -> None:
    plan = make_plan_dir(tmp_path / "plan")
    remote = tmp_path / "remote"
    syncer = syncer_for(sshd, plan, remote, max_backoff_s=0.5)
    syncer.start()
    try:
        wait_for(lambda: syncer.status().pushes >= 1, 10, "the first push")
        sshd.stop()  # the link dies mid-race
        for i in range(20):
            (plan / "PARALLEL_PROGRESS.md").write_text(f"# race\n\nepoch {i}\n")
            syncer.notify_changed()
            syncer.push_now()  # e.g. a decision
            time.sleep(0.02)
        wait_for(lambda: syncer.status().error is not None, 10, "the error to show")
        error = syncer.status().error or ""
        assert "refused" in error or "connection" in error
        assert (remote / "PARALLEL_PROGRESS.md").read_text().startswith("# race\n\n| w")
        last_success = syncer.status().last_success_s
        sshd.start()  # the link comes back on the same port
        for _ in range(10):
            syncer.push_now()
        wait_for(
            lambda: (remote / "PARALLEL_PROGRESS.md").read_text() == "# race\n\nepoch 19\n",
            15,
            "the syncer to catch up",
        )
        wait_for(lambda: syncer.status().error is None, 5, "the error to clear")
        assert (syncer.status().last_success_s or 0) > (last_success or 0)
    finally:
        syncer.close()


def test_push_calls_return_while_the_syncer_is_stuck_connecting(tmp_path: Path) -> None:
    """A server that accepts TCP and never answers: the push thread is stuck in the SSH
    handshake (its banner is read below), yet notify_changed and push_now return, and the
    attempt is still unfinished when they do. (Their cost is in benchmarks/bench_sync.py.)"""
    sshd_fixture.require_sshd()
    server = SshServer(tmp_path / "unused")
    plan = make_plan_dir(tmp_path / "plan")
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        silent.settimeout(30)
        syncer = SftpSyncer(
            SyncConfig(target=server.target(tmp_path / "remote"), interval_s=0.1,
                       attempt_deadline_s=120, max_backoff_s=0.5),
            local_root=plan,
            options=server.options(port=silent.getsockname()[1], connect_timeout_s=120.0,
                                   op_timeout_s=120.0),
        )
        syncer.start()
        conn, _ = silent.accept()
        try:
            conn.settimeout(30)
            assert conn.recv(256).startswith(b"SSH-2.0-")  # the client is mid-handshake
            for i in range(20):
                (plan / "PARALLEL_PROGRESS.md").write_text(f"# race\n\nepoch {i}\n")
                syncer.notify_changed()
                syncer.push_now()
            # every call returned, and the one attempt in flight has no outcome yet
            assert syncer.status() == SyncStatus(last_success_s=None, error=None, pushes=0)
        finally:
            conn.close()  # the server hangs up: the attempt fails and the thread moves on
        wait_for(lambda: syncer.status().error is not None, 30, "the hang-up to be reported")
        syncer.close(timeout_s=2.0)
    assert syncer.status().pushes == 0 and not (tmp_path / "remote").exists()


def test_host_key_mismatch_stops_syncer_with_clear_status(sshd: SshServer, tmp_path: Path) -> None:
    plan = make_plan_dir(tmp_path / "plan")
    sshd_fixture.keygen(tmp_path / "other_host")
    kind, blob = (tmp_path / "other_host.pub").read_text().split()[:2]
    known = tmp_path / "known_hosts"
    known.write_text(f"[127.0.0.1]:{sshd.port} {kind} {blob}\n")
    syncer = SftpSyncer(
        SyncConfig(target=sshd.target(tmp_path / "remote"), interval_s=0.1),
        local_root=plan,
        options=sshd.options(known_hosts=known),
    )
    syncer.start()
    try:
        wait_for(lambda: syncer.status().error is not None, 10, "the error")
        error = syncer.status().error or ""
        assert "HOST KEY MISMATCH" in error and sshd.host_fingerprint in error
        assert "sync stopped" in error
        syncer.push_now()
        time.sleep(0.3)
        assert syncer.status().pushes == 0 and not (tmp_path / "remote").exists()
    finally:
        syncer.close(timeout_s=2.0)
    assert not syncer_thread_alive(syncer)  # a fatal error ends the push thread; close joins it


def test_close_is_bounded_when_link_is_down(tmp_path: Path) -> None:
    sshd_fixture.require_sshd()
    server = SshServer(tmp_path / "never started")
    plan = make_plan_dir(tmp_path / "plan")
    syncer = syncer_for(server, plan, tmp_path / "remote")
    syncer.start()
    wait_for(lambda: syncer.status().error is not None, 10, "the refused connection")
    syncer.close(timeout_s=1.0)
    assert not syncer_thread_alive(syncer)  # the last flush failed fast and the thread ended


@pytest.mark.parametrize("bad", ["PARALLEL_PROGRESS.md", "progress.png"])
def test_changed_file_is_pushed_even_if_size_is_equal(
    sshd: SshServer, tmp_path: Path, bad: str
) -> None:
    plan = make_plan_dir(tmp_path / "plan")
    remote = tmp_path / "remote"
    syncer = syncer_for(sshd, plan, remote)
    syncer.start()
    try:
        wait_for(lambda: syncer.status().pushes >= 1, 10, "the first push")
        data = bytearray((plan / bad).read_bytes())
        data[0] ^= 0xFF  # same size, new content, new inode (atomic local rewrite)
        tmp = plan / f".{bad}.tmp"
        tmp.write_bytes(bytes(data))
        os.replace(tmp, plan / bad)
        syncer.push_now()
        wait_for(lambda: (remote / bad).read_bytes() == bytes(data), 5, "the new content")
    finally:
        syncer.close()


def test_connect_deadline_against_a_silent_server(tmp_path: Path) -> None:
    """A server that accepts TCP but never speaks SSH: the hard deadline ends the attempt."""
    sshd_fixture.require_sshd()
    server = SshServer(tmp_path / "unused")
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        port = silent.getsockname()[1]
        # the 30 s connect timeout would end it too, later: the error names the one that fired
        with pytest.raises(LinkDownError, match=r"exceeded the 0\.5 s deadline"):
            open_session(
                parse_target(server.target(tmp_path)),
                server.options(port=port, connect_timeout_s=30.0),
                deadline_s=0.5,
            )


def test_stalled_link_hits_the_round_deadline_and_recovers(
    sshd: SshServer, tmp_path: Path
) -> None:
    """SIGSTOP the server's session processes: the push ends at the round's deadline instead of
    hanging, and the error names that deadline (not what paramiko raised once the connection
    was closed under it). The op timeout is longer than the deadline, so only the deadline can
    fire."""
    plan = make_plan_dir(tmp_path / "plan")
    remote = tmp_path / "remote"
    syncer = SftpSyncer(
        SyncConfig(
            target=sshd.target(remote), interval_s=0.1, attempt_deadline_s=1.5, max_backoff_s=0.3
        ),
        local_root=plan,
        options=sshd.options(connect_timeout_s=1.0, op_timeout_s=60.0),
    )
    syncer.start()
    assert sshd.process is not None
    try:
        wait_for(lambda: syncer.status().pushes >= 1, 10, "the first push")
        sessions = psutil.Process(sshd.process.pid).children(recursive=True)
        assert sessions, "the syncer's connection has a server-side session process"
        for proc in sessions:
            proc.suspend()
        (plan / "progress.png").write_bytes(os.urandom(300_000))
        syncer.push_now()
        wait_for(lambda: syncer.status().error is not None, 30, "the stalled push to fail")
        error = syncer.status().error or ""
        assert error.startswith("push to ") and "exceeded its 1.5 s deadline" in error, error
        assert "SSHException" not in error and "internal error" not in error, error
        for proc in sessions:
            proc.kill()
        wait_for(
            lambda: (remote / "progress.png").read_bytes() == (plan / "progress.png").read_bytes(),
            15,
            "a new connection to finish the push",
        )
        wait_for(lambda: syncer.status().error is None, 5, "the error to clear")
    finally:
        syncer.close(timeout_s=2.0)


def test_relative_key_paths_are_under_the_plan_dir(tmp_path: Path) -> None:
    config = SyncConfig(target="h:p", key_file=Path("keys/id"), known_hosts=Path("/etc/kh"))
    options = connect_options(config, local_root=tmp_path)
    assert options.key_file == tmp_path / "keys" / "id"
    assert options.known_hosts == Path("/etc/kh")


def syncer_has_news(syncer: SftpSyncer) -> Callable[[], bool]:
    return lambda: syncer.status() != SyncStatus(last_success_s=None, error=None, pushes=0)


def test_unknown_host_key_refused_unless_plan_accepts_it(sshd: SshServer, tmp_path: Path) -> None:
    plan = make_plan_dir(tmp_path / "plan")
    known = tmp_path / "known_hosts"  # missing: the host is unknown
    for accept in (False, True):
        config = SyncConfig(
            target=sshd.target(tmp_path / "remote"),
            port=sshd.port,
            key_file=sshd.client_key,
            known_hosts=known,
            ssh_config=sshd.empty_ssh_config,
            interval_s=0.1,
            accept_unknown_host=accept,
        )
        options = dataclasses.replace(connect_options(config, local_root=plan), allow_agent=False)
        syncer = SftpSyncer(config, local_root=plan, options=options)
        syncer.start()
        try:
            wait_for(syncer_has_news(syncer), 10, "the first round")
            status = syncer.status()
        finally:
            syncer.close()
        if accept:
            assert status.error is None and (tmp_path / "remote" / "progress.png").exists()
            assert known.read_text().startswith(f"[127.0.0.1]:{sshd.port} ssh-ed25519 ")
        else:
            error = status.error or ""
            assert status.pushes == 0 and not known.exists()
            assert "not in" in error and sshd.host_fingerprint in error


def _reference_match(parts: list[str], pats: list[str]) -> bool:
    """Component-wise glob match with fnmatch; ``**`` = zero or more whole components, but a
    trailing ``**`` (``dir/**``) means everything below: at least one component."""
    if not pats:
        return not parts
    if pats == ["**"]:
        return len(parts) >= 1
    if pats[0] == "**":
        return any(_reference_match(parts[i:], pats[1:]) for i in range(len(parts) + 1))
    return (
        bool(parts)
        and fnmatch.fnmatchcase(parts[0], pats[0])
        and _reference_match(parts[1:], pats[1:])
    )


PATTERN_PARTS = ["**", "*", "a*", "?b", "a", "x.png", "*.png", "[ab]", "[!a]*"]
PATH_PARTS = ["a", "ab", "bb", "x.png", "a.png", "b", "aa"]


@given(
    st.lists(st.sampled_from(PATTERN_PARTS), min_size=1, max_size=4),
    st.lists(st.sampled_from(PATH_PARTS), min_size=1, max_size=5),
)
def test_glob_regex_matches_componentwise_fnmatch(pats: list[str], parts: list[str]) -> None:
    expected = _reference_match(parts, pats)
    assert bool(glob_regex("/".join(pats)).match("/".join(parts))) is expected
