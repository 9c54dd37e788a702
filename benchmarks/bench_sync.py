"""Benchmark the SFTP push on loopback against a real OpenSSH sshd, and its cost to the controller.

    python benchmarks/bench_sync.py      # needs /usr/sbin/sshd: apt-get install openssh-server
    python benchmarks/bench_sync.py --repeats 50

Prints three tables:

1. one sync of a 20 KB dashboard + three 200 KB PNGs (atomic upload of each), on a new
   connection (connect + auth + SFTP + 4 files + close) versus a reused one;
2. push latency through SftpSyncer: push_now() until the remote copy holds the new bytes;
3. the controller's side: a simulated decision (parse a metrics record, evaluate criteria, call
   notify_changed() and push_now()) with sync off (NullSyncer), on with the link up while the
   thread keeps pushing, and on with the link down (sshd stopped, thread backing off).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from sshd_fixture import SSHD, SshServer  # noqa: E402

from orchestrator.remote.ssh import open_session, parse_target  # noqa: E402
from orchestrator.remote.sync import NullSyncer, SftpSyncer, Syncer, upload_atomic  # noqa: E402
from orchestrator.remote.sync_config import SyncConfig  # noqa: E402

FILES = {
    "PARALLEL_PROGRESS.md": 20_000,
    "progress.png": 200_000,
    "results/p/race/success_viz/figure.png": 200_000,
    "results/p/race/success_viz/curves.png": 200_000,
}


def write_files(root: Path) -> None:
    for rel, size in FILES.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(os.urandom(size))


def percentiles(samples: list[float]) -> tuple[float, float, float]:
    ordered = sorted(samples)
    p90 = ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))]
    return statistics.median(ordered), p90, ordered[-1]


def row(name: str, samples_s: list[float], unit: float, unit_name: str) -> str:
    med, p90, worst = (x / unit for x in percentiles(samples_s))
    cells = f"{len(samples_s):>5} | {med:>9.2f} | {p90:>9.2f} | {worst:>9.2f}"
    return f"| {name:<46} | {cells} | {unit_name:<4} |"


def median_difference_ci(a: list[float], b: list[float]) -> tuple[float, float, float]:
    """Median(b) - median(a) with a 95% bootstrap CI (scipy.stats.bootstrap, BCa)."""
    from scipy.stats import bootstrap

    def stat(x: list[float], y: list[float], axis: int = -1) -> float:
        import numpy as np

        return np.median(y, axis=axis) - np.median(x, axis=axis)  # type: ignore[no-any-return]

    res = bootstrap((a, b), stat, n_resamples=2000, random_state=0, vectorized=True)
    return (
        statistics.median(b) - statistics.median(a),
        float(res.confidence_interval.low),
        float(res.confidence_interval.high),
    )


def header(title: str) -> None:
    print(f"\n{title}\n")
    print(f"| {'case':<46} | {'n':>5} | {'median':>9} | {'p90':>9} | {'max':>9} | unit |")
    print(f"|{'-' * 48}|{'-' * 7}|{'-' * 11}|{'-' * 11}|{'-' * 11}|------|")


def bench_one_sync(server: SshServer, local: Path, remote: Path, repeats: int) -> None:
    target = parse_target(server.target(remote))
    options = server.options()

    new_s: list[float] = []
    for _ in range(repeats):
        started = time.perf_counter()
        session = open_session(target, options, create_root=True)
        for rel in FILES:
            upload_atomic(session, local / rel, rel)
        session.close()
        new_s.append(time.perf_counter() - started)
    session = open_session(target, options, create_root=True)
    reused_s: list[float] = []
    per_file: dict[str, list[float]] = {rel: [] for rel in FILES}
    for _ in range(repeats):
        started = time.perf_counter()
        for rel in FILES:
            t0 = time.perf_counter()
            upload_atomic(session, local / rel, rel)
            per_file[rel].append(time.perf_counter() - t0)
        reused_s.append(time.perf_counter() - started)
    session.close()
    header("1. one sync: 20 KB dashboard + three 200 KB PNGs, atomic (temp + posix_rename)")
    print(row("new connection (connect, auth, 4 files, close)", new_s, 1e-3, "ms"))
    print(row("reused connection (4 files)", reused_s, 1e-3, "ms"))
    print(row("  reused: the 20 KB dashboard alone", per_file["PARALLEL_PROGRESS.md"], 1e-3, "ms"))
    print(row("  reused: one 200 KB PNG", per_file["progress.png"], 1e-3, "ms"))


def make_syncer(server: SshServer, local: Path, remote: Path) -> SftpSyncer:
    return SftpSyncer(
        SyncConfig(target=server.target(remote), interval_s=0.05, max_backoff_s=1.0),
        local_root=local,
        rng=random.Random(0),
        options=server.options(connect_timeout_s=2.0, op_timeout_s=2.0),
    )


def bench_push_latency(server: SshServer, local: Path, remote: Path, repeats: int) -> None:
    syncer = make_syncer(server, local, remote)
    syncer.config = syncer.config.model_copy(update={"interval_s": 3600.0})  # only push_now
    syncer.start()
    deadline = time.monotonic() + 10
    while syncer.status().pushes < 1 and time.monotonic() < deadline:
        time.sleep(0.005)
    latency_s: list[float] = []
    page = local / "PARALLEL_PROGRESS.md"
    for i in range(repeats):
        body = f"# round {i}\n".encode() + os.urandom(20_000)
        tmp = page.with_name(".page.tmp")
        tmp.write_bytes(body)
        os.replace(tmp, page)
        started = time.perf_counter()
        syncer.push_now()
        while (remote / "PARALLEL_PROGRESS.md").read_bytes() != body:
            time.sleep(0.0005)
        latency_s.append(time.perf_counter() - started)
    syncer.close()
    header("2. SftpSyncer: push_now() until the laptop's copy is new (20 KB dashboard)")
    print(row("push latency, reused connection", latency_s, 1e-3, "ms"))


def decision(record: str, syncer: Syncer) -> bool:
    """What the controller does per metrics record, minus the dashboard rendering."""
    metrics = json.loads(record)
    won = metrics["val_accuracy"] >= 0.75 and metrics["separation_p"] < 0.01
    syncer.notify_changed()
    if won:
        syncer.push_now()
    return won


def decision_latencies(syncer: Syncer, local: Path, count: int) -> list[float]:
    rng = random.Random(0)
    samples: list[float] = []
    page = local / "PARALLEL_PROGRESS.md"
    for i in range(count):
        if i % 20 == 0:  # the dashboard changes: keep the push thread busy
            tmp = page.with_name(".page.tmp")
            tmp.write_bytes(os.urandom(20_000))
            os.replace(tmp, page)
        record = json.dumps(
            {"epoch": i, "val_accuracy": rng.random(), "separation_p": rng.random() / 50}
        )
        started = time.perf_counter()
        decision(record, syncer)
        samples.append(time.perf_counter() - started)
        time.sleep(0.001)
    return samples


def bench_decisions(server: SshServer, local: Path, remote: Path, count: int) -> None:
    off = decision_latencies(NullSyncer(), local, count)
    syncer = make_syncer(server, local, remote)
    syncer.start()
    on_up = decision_latencies(syncer, local, count)
    server.stop()
    on_down = decision_latencies(syncer, local, count)
    error = syncer.status().error
    syncer.close(timeout_s=1.0)
    server.start()
    header("3. controller decision (parse record, criteria, notify_changed, push_now)")
    print(row("sync off (NullSyncer)", off, 1e-6, "us"))
    print(row("sync on, link up, thread pushing", on_up, 1e-6, "us"))
    print(row("sync on, link down (sshd stopped)", on_down, 1e-6, "us"))
    for name, samples in (("link up", on_up), ("link down", on_down)):
        diff, low, high = median_difference_ci(off, samples)
        print(
            f"\nmedian(sync on, {name}) - median(sync off) = {diff * 1e6:+.2f} us "
            f"(95% bootstrap CI {low * 1e6:+.2f} .. {high * 1e6:+.2f} us)"
        )
    print(f"status while down: {error}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=30, help="syncs per case")
    parser.add_argument("--decisions", type=int, default=2000, help="decisions per case")
    args = parser.parse_args()
    if not SSHD.exists():
        print("error: needs /usr/sbin/sshd (apt-get install -y openssh-server)", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        local, remote = base / "gpu box", base / "laptop copy"
        write_files(local)
        server = SshServer(base / "sshd")
        server.start()
        try:
            print(f"loopback OpenSSH sshd on 127.0.0.1:{server.port}, {os.cpu_count()} CPUs")
            bench_one_sync(server, local, remote, args.repeats)
            bench_push_latency(server, local, remote, args.repeats)
            bench_decisions(server, local, remote, args.decisions)
        finally:
            server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
