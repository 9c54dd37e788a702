"""The pull side (orchestrator.remote.watch): real subprocesses against a real sshd on 127.0.0.1."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import sshd_fixture
from sshd_fixture import SshServer

from orchestrator.remote.ssh import open_session, parse_target
from orchestrator.remote.sync import image_references
from orchestrator.remote.watch import DashboardFetcher, local_image_links

sshd = sshd_fixture.sshd  # the fixture: a started SshServer

DASHBOARD = """# Parallel progress

| worker | epoch | val_accuracy |
|---|---|---|
| attention-supervised | 7/50 | 0.812 |

![progress](progress.png)
<img src="results/p/race/success_viz/fig%201.png" width=400>
![outside](../secret.png) ![web](https://example.com/x.png) ![gone](not-yet.png)
"""


def wait_for(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.05)


def make_remote(root: Path) -> Path:
    """The GPU box's plan folder, as the controller leaves it."""
    viz = root / "results" / "p" / "race" / "success_viz"
    viz.mkdir(parents=True)
    (root / "PARALLEL_PROGRESS.md").write_text(DASHBOARD)
    (root / "progress.png").write_bytes(os.urandom(30_000))
    (viz / "fig 1.png").write_bytes(os.urandom(20_000))
    (root.parent / "secret.png").write_bytes(b"outside the target")
    return root


def watch_argv(server: SshServer, remote: Path, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "orchestrator.remote.watch",
        server.target(remote),
        "--out",
        str(out),
        "--port",
        str(server.port),
        "--key-file",
        str(server.client_key),
        "--known-hosts",
        str(server.known_hosts),
        "--ssh-config",
        str(server.empty_ssh_config),
        "--connect-timeout-s",
        "3",
        *extra,
    ]


def run_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "SSH_AUTH_SOCK"}
    env["COLUMNS"] = "120"
    return env


def terminal_sigint() -> None:
    """In the child before exec: SIGINT as a terminal's foreground job has it. A suite started
    in the background (``cmd &`` in a script, as a CI harness may do) inherits SIGINT ignored,
    and Python then leaves it ignored, so the Ctrl-C these tests send would never arrive."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_image_references() -> None:
    assert image_references(DASHBOARD) == [
        "progress.png",
        "not-yet.png",
        "results/p/race/success_viz/fig 1.png",
    ]


def test_watch_once_pulls_dashboard_and_images(sshd: SshServer, tmp_path: Path) -> None:
    remote = make_remote(tmp_path / "gpu box" / "project")
    out = tmp_path / "laptop" / "dash"
    done = subprocess.run(
        watch_argv(sshd, remote, out, "--once"),
        capture_output=True,
        text=True,
        env=run_env(),
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert (out / "PARALLEL_PROGRESS.md").read_text() == DASHBOARD
    assert (out / "progress.png").read_bytes() == (remote / "progress.png").read_bytes()
    fig = "results/p/race/success_viz/fig 1.png"
    assert (out / fig).read_bytes() == (remote / fig).read_bytes()
    assert not (tmp_path / "laptop" / "secret.png").exists()
    assert sorted(p.name for p in out.rglob("*") if p.is_file()) == [
        "PARALLEL_PROGRESS.md",
        "fig 1.png",
        "progress.png",
    ]
    assert "attention-supervised" in done.stdout and "0.812" in done.stdout  # the table
    assert "not-yet.png" in done.stdout  # reported as missing


def test_watch_once_via_ssh_config_alias(sshd: SshServer, tmp_path: Path) -> None:
    remote = make_remote(tmp_path / "project")
    config = sshd.write_ssh_config("gpubox")
    out = tmp_path / "dash"
    argv = [
        sys.executable,
        "-m",
        "orchestrator.remote.watch",
        f"gpubox:{remote}",
        "--once",
        "--out",
        str(out),
        "--ssh-config",
        str(config),
    ]
    done = subprocess.run(argv, capture_output=True, text=True, env=run_env(), timeout=60)
    assert done.returncode == 0, done.stderr
    assert (out / "PARALLEL_PROGRESS.md").read_text() == DASHBOARD


def test_watch_unknown_host_is_one_error_line_then_accepted(
    sshd: SshServer, tmp_path: Path
) -> None:
    remote = make_remote(tmp_path / "project")
    known = tmp_path / "empty_known_hosts"
    argv = watch_argv(sshd, remote, tmp_path / "dash", "--once")
    argv[argv.index("--known-hosts") + 1] = str(known)
    refused = subprocess.run(argv, capture_output=True, text=True, env=run_env(), timeout=60)
    assert refused.returncode == 1
    assert refused.stderr.startswith("error: host [127.0.0.1]:")
    assert sshd.host_fingerprint in refused.stderr and "Traceback" not in refused.stderr
    assert "--accept-new-host-key" in refused.stderr  # the hint

    accepted = subprocess.run(
        [*argv, "--accept-new-host-key"], capture_output=True, text=True, env=run_env(), timeout=60
    )
    assert accepted.returncode == 0, accepted.stderr
    assert sshd.host_fingerprint in accepted.stdout
    assert known.read_text().startswith(f"[127.0.0.1]:{sshd.port} ssh-ed25519 ")


def test_watch_bad_input_exits_with_error_line(tmp_path: Path) -> None:
    argv = [sys.executable, "-m", "orchestrator.remote.watch", "no-colon-target", "--once"]
    done = subprocess.run(argv, capture_output=True, text=True, env=run_env(), timeout=60)
    assert (done.returncode, done.stderr.splitlines()[0][:6]) == (1, "error:")
    argv = [sys.executable, "-m", "orchestrator.remote.watch", "h:p", "--interval-s", "0"]
    done = subprocess.run(argv, capture_output=True, text=True, env=run_env(), timeout=60)
    assert done.returncode == 2 and "must be > 0" in done.stderr


def test_watch_remote_status_runs_in_target_dir(sshd: SshServer, tmp_path: Path) -> None:
    remote = make_remote(tmp_path / "project")
    fake = remote / "orchestrator"  # stands in for the installed CLI (python -m orchestrator)
    fake.mkdir()
    (fake / "__init__.py").write_text("")
    (fake / "__main__.py").write_text(
        "import json, os, sys\n"
        "print(json.dumps({'argv': sys.argv[1:], 'cwd': os.getcwd(), 'experiments': []}))\n"
    )
    out = tmp_path / "dash"
    argv = watch_argv(sshd, remote, out, "--once", "--remote-status")
    argv += ["--remote-python", sys.executable]
    done = subprocess.run(argv, capture_output=True, text=True, env=run_env(), timeout=60)
    assert done.returncode == 0, done.stderr
    assert '"status"' in done.stdout and '"--json"' in done.stdout
    assert str(remote) in done.stdout


def test_watch_live_survives_link_drop_and_exits_on_ctrl_c(sshd: SshServer, tmp_path: Path) -> None:
    remote = make_remote(tmp_path / "project")
    out = tmp_path / "dash"
    page = out / "PARALLEL_PROGRESS.md"
    proc = subprocess.Popen(
        watch_argv(sshd, remote, out, "--interval-s", "0.2"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=run_env(),
        preexec_fn=terminal_sigint,
    )
    try:
        wait_for(lambda: page.exists() and page.read_text() == DASHBOARD, 20, "the first fetch")
        sshd.stop()
        (remote / "PARALLEL_PROGRESS.md").write_text(DASHBOARD.replace("7/50", "9/50"))
        time.sleep(1.0)  # a few failed rounds while the link is down
        assert proc.poll() is None, proc.communicate()
        sshd.start()
        # a read on the dead session can hang until the op timeout (10 s), then backoff
        try:
            wait_for(lambda: "9/50" in page.read_text(), 60, "the fetch after the link came back")
        except AssertionError as e:
            proc.kill()
            out, err = proc.communicate()
            detail = f"watch stdout:\n{out[-3000:]}\nstderr:\n{err[-3000:]}"
            raise AssertionError(f"{e}\n{detail}") from None
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, stderr
    assert "watch stopped" in stdout and "Traceback" not in stderr


def test_local_image_links_point_at_fetched_copies(tmp_path: Path) -> None:
    page_dir = tmp_path / "dash board"
    (page_dir / "figs").mkdir(parents=True)
    (page_dir / "figs" / "p 1.png").write_bytes(b"png")
    text = "![p](figs/p%201.png) ![m](missing.png) ![w](https://x.org/a.png)"
    out = local_image_links(text, page_dir)
    uri = (page_dir / "figs" / "p 1.png").resolve().as_uri()
    assert out == f"![p]({uri}) ![m](missing.png) ![w](https://x.org/a.png)"
    assert "%20" in uri  # spaces quoted


def test_a_same_second_same_size_rewrite_is_still_fetched(
    sshd: SshServer, tmp_path: Path
) -> None:
    """SFTP mtimes are whole seconds: a page or image rewritten within the second it was
    fetched, with the same size, has the same (size, mtime). The page is compared by content;
    an image is downloaded once more once its key is RACY_S old."""
    remote = make_remote(tmp_path / "project")
    out = tmp_path / "dash"
    fetcher = DashboardFetcher(out)
    session = open_session(parse_target(sshd.target(remote)), sshd.options())
    try:
        first = fetcher.fetch(session)
        assert {"PARALLEL_PROGRESS.md", "progress.png"} <= set(first.fetched)
        page, image = remote / "PARALLEL_PROGRESS.md", remote / "progress.png"
        stamps = {p: p.stat().st_mtime_ns for p in (page, image)}
        page.write_text(DASHBOARD.replace("7/50", "9/50"))  # same size
        new_image = os.urandom(30_000)
        image.write_bytes(new_image)
        for p, ns in stamps.items():
            os.utime(p, ns=(ns, ns))  # and the same mtime, as within one second
        second = fetcher.fetch(session)
        assert "9/50" in (out / "PARALLEL_PROGRESS.md").read_text()  # by content, at once
        assert "progress.png" not in second.fetched  # its key is too fresh to trust or redo yet
        time.sleep(DashboardFetcher.RACY_S)
        third = fetcher.fetch(session)
        assert "progress.png" in third.fetched
        assert (out / "progress.png").read_bytes() == new_image
        assert fetcher.fetch(session).fetched == []  # verified: nothing more to fetch
    finally:
        session.close()


ROWS = [
    "| worker | branch | slot | epoch/max | attention_ratio | val_accuracy | separation_p "
    "| status | trend | ETA |",
    "|---|---|---|---|---|---|---|---|---|---|",
    "| attention-supervised | `early-persistence/attention-supervised` | gpu0 | 10/50 | 1.62 ✓ "
    "| 0.81 ✓ | 0.004 ✓ | 🏆 succeeded | ↗ |  |",
    "| contrastive-persistence | `early-persistence/contrastive-persistence` | — | 10/50 "
    "| 0.98 ✗ | 0.66 ✗ | 0.3 ✗ | ⏹ stopped: lost to attention-supervised | ↘ (worse) |  |",
]
DECIDED_DASHBOARD = (
    "# Parallel progress\n\n## early-persistence: {status}\n\n" + "\n".join(ROWS) + """

- [Race report](results/early-persistence/race_report/RACE_REPORT.md)
- [Success figure](results/early-persistence/success_viz/SUCCESS_VISUALIZATION.png)
- [Success report](results/early-persistence/success_viz/SUCCESS_REPORT.md)
- [elsewhere](https://example.com/r.md) [up](../secret.md)

![progress](progress.png)
"""
)
WON = "🏆 **attention-supervised** won at epoch 10"


def make_decided_remote(root: Path) -> Path:
    """A plan folder after the decision: the dashboard links the race report, the success
    figure and the success report; those pages embed or link more figures."""
    exp = root / "results" / "early-persistence"
    (exp / "race_report").mkdir(parents=True)
    (exp / "success_viz" / "checkpoints").mkdir(parents=True)
    (root / "PARALLEL_PROGRESS.md").write_text(DECIDED_DASHBOARD.format(status=WON))
    (root / "progress.png").write_bytes(os.urandom(10_000))
    (exp / "race_report" / "RACE_REPORT.md").write_text(
        "# Race report\n\n![criterion metrics per worker](race_report.png)\n"
    )
    (exp / "race_report" / "race_report.png").write_bytes(os.urandom(8_000))
    (exp / "success_viz" / "SUCCESS_VISUALIZATION.png").write_bytes(os.urandom(9_000))
    (exp / "success_viz" / "SUCCESS_REPORT.md").write_text(
        "![success figure](SUCCESS_VISUALIZATION.png)\n\n"
        "- [panel a](panel_a.png)\n- [checkpoint](checkpoints/best.pt)\n"
        "- [records](evals.jsonl)\n- [outside](../../../../secret.md)\n"
    )
    (exp / "success_viz" / "panel_a.png").write_bytes(os.urandom(7_000))
    (exp / "success_viz" / "checkpoints" / "best.pt").write_bytes(b"weights")
    (exp / "success_viz" / "evals.jsonl").write_text("{}\n")
    (root.parent / "secret.md").write_text("outside the target")
    return root


def test_watch_once_mirrors_linked_reports_and_figures(sshd: SshServer, tmp_path: Path) -> None:
    remote = make_decided_remote(tmp_path / "gpu box" / "project")
    out = tmp_path / "laptop" / "dash"
    env = {**run_env(), "COLUMNS": "80"}
    done = subprocess.run(
        watch_argv(sshd, remote, out, "--once"), capture_output=True, text=True, env=env,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    got = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    exp = "results/early-persistence"
    assert got == [
        "PARALLEL_PROGRESS.md",
        "progress.png",
        f"{exp}/race_report/RACE_REPORT.md",
        f"{exp}/race_report/race_report.png",
        f"{exp}/success_viz/SUCCESS_REPORT.md",
        f"{exp}/success_viz/SUCCESS_VISUALIZATION.png",
        f"{exp}/success_viz/panel_a.png",
    ]
    for rel in got:
        assert (out / rel).read_bytes() == (remote / rel).read_bytes(), rel
    assert not (tmp_path / "laptop" / "secret.md").exists()
    # the view lists the linked files with their local paths, and fits 80 columns
    flat = done.stdout.replace("\n", "")
    assert str(out / exp / "race_report" / "RACE_REPORT.md") in flat
    assert str(out / exp / "success_viz" / "SUCCESS_VISUALIZATION.png") in flat
    lines = done.stdout.splitlines()
    table = [line for line in lines if "✓" in line or "✗" in line]
    assert table and max(len(line) for line in table) <= 80
    assert "1.62 ✓" in done.stdout and "stopped (lost)" in done.stdout
    assert "early-persistence/attention-supervised" not in done.stdout  # branch dropped first


def test_linked_files_are_fetched_only_when_changed(sshd: SshServer, tmp_path: Path) -> None:
    remote = make_decided_remote(tmp_path / "project")
    fetcher = DashboardFetcher(tmp_path / "dash")
    session = open_session(parse_target(sshd.target(remote)), sshd.options())
    try:
        first = fetcher.fetch(session)
        assert len(first.fetched) == 7 and first.missing == []
        assert [label for label, _ in first.linked] == [
            "Race report", "Success figure", "Success report",
        ]
        time.sleep(DashboardFetcher.RACY_S)
        fetcher.fetch(session)  # the racy re-check of files fetched within the same second
        assert fetcher.fetch(session).fetched == []
        report = remote / "results/early-persistence/race_report/RACE_REPORT.md"
        report.write_text(report.read_text() + "\nupdated\n")
        changed = fetcher.fetch(session).fetched
        assert changed == ["results/early-persistence/race_report/RACE_REPORT.md"]
    finally:
        session.close()


def fake_notify_send(folder: Path, record: Path) -> dict[str, str]:
    """A `notify-send` first on PATH that appends its arguments to ``record``; the env to use."""
    folder.mkdir()
    script = folder / "notify-send"
    script.write_text(
        f"#!{sys.executable}\n"
        "import json, sys\n"
        f"with open({str(record)!r}, 'a') as fh:\n"
        "    fh.write(json.dumps(sys.argv[1:]) + '\\n')\n"
    )
    script.chmod(0o755)
    return {**run_env(), "PATH": f"{folder}{os.pathsep}{os.environ['PATH']}"}


def test_watch_notify_pings_once_per_decision(sshd: SshServer, tmp_path: Path) -> None:
    import json

    remote = make_decided_remote(tmp_path / "project")
    page = remote / "PARALLEL_PROGRESS.md"
    page.write_text(DECIDED_DASHBOARD.format(status="racing"))
    record = tmp_path / "notified.jsonl"
    env = fake_notify_send(tmp_path / "bin", record)
    out = tmp_path / "dash"
    local = out / "PARALLEL_PROGRESS.md"
    proc = subprocess.Popen(
        watch_argv(sshd, remote, out, "--interval-s", "0.2", "--notify"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        preexec_fn=terminal_sigint,
    )
    try:
        wait_for(lambda: local.exists() and "racing" in local.read_text(), 20, "the first fetch")
        page.write_text(DECIDED_DASHBOARD.format(status=WON))
        wait_for(lambda: record.exists() and record.read_text().strip() != "", 30, "the ping")
        # a few more rounds showing the same decision (and a change elsewhere on the page)
        page.write_text(DECIDED_DASHBOARD.format(status=WON) + "\nlater\n")
        wait_for(lambda: "later" in local.read_text(), 30, "the next fetch")
        page.write_text(DECIDED_DASHBOARD.format(status=WON) + "\nlater still\n")
        wait_for(lambda: "later still" in local.read_text(), 30, "the fetch after that")
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, stderr
    calls = [json.loads(line) for line in record.read_text().splitlines()]
    assert calls == [["early-persistence: decided", "attention-supervised won at epoch 10"]]
