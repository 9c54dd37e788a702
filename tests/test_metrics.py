"""Incremental metric reading: partial lines, truncation, replacement, corruption, sources."""

from __future__ import annotations

import json
import os
from pathlib import Path

from orchestrator.sources.metrics import (
    CsvSource,
    JsonlSource,
    MetricHistory,
    RegexSource,
    make_source,
)


def append(path: Path, text: str) -> None:
    with open(path, "a") as f:
        f.write(text)


def test_jsonl_reads_only_new_complete_lines(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    src = JsonlSource(path)
    assert src.read_new() == []  # file not there yet
    append(path, '{"epoch": 1, "acc": 0.5}\n{"epoch": 2, "ac')
    assert src.read_new() == [{"epoch": 1, "acc": 0.5}]
    assert src.read_new() == []
    append(path, 'c": 0.6}\n')
    assert src.read_new() == [{"epoch": 2, "acc": 0.6}]


def test_jsonl_counts_corrupt_lines_and_cleans_values(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    append(path, "not json\n[1,2]\n{\"acc\": 1}\n")
    append(path, '{"epoch": 3, "acc": NaN, "loss": Infinity, "name": "x", "n": "7", "ok": true}\n')
    src = JsonlSource(path)
    records = src.read_new()
    assert records == [{"epoch": 3, "acc": None, "loss": None, "n": 7.0, "ok": 1}]
    assert src.stats.bad_lines == 3


def test_jsonl_rereads_a_truncated_or_replaced_file(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    append(path, '{"epoch": 1, "acc": 0.1}\n{"epoch": 2, "acc": 0.2}\n')
    src = JsonlSource(path)
    assert len(src.read_new()) == 2
    path.write_text('{"epoch": 1, "acc": 0.3}\n')  # truncated in place
    assert src.read_new() == [{"epoch": 1, "acc": 0.3}]
    assert src.stats.truncations == 1
    tmp = tmp_path / "new.jsonl"
    tmp.write_text('{"epoch": 1, "acc": 0.4}\n{"epoch": 2, "acc": 0.5}\n')
    os.replace(tmp, path)  # replaced by another file (new inode)
    assert [r["acc"] for r in src.read_new()] == [0.4, 0.5]
    assert src.stats.replacements == 1


def test_history_replaces_epochs_reported_again_after_resume() -> None:
    h = MetricHistory()
    h.add([{"epoch": e, "acc": e / 10} for e in (1, 2, 3, 4)])
    # attempt 2 resumed from the epoch-2 checkpoint and reports epoch 3 again
    h.add([{"epoch": 3, "acc": 0.33}, {"epoch": 4, "acc": 0.44}, {"epoch": 5, "acc": 0.55}])
    assert [r["epoch"] for r in h.records] == [1, 2, 3, 4, 5]
    assert h.series("acc")[1] == [0.1, 0.2, 0.33, 0.44, 0.55]


def test_regex_source_matches_named_groups(tmp_path: Path) -> None:
    log = tmp_path / "stdout.log"
    append(log, "starting\nstep 100 train loss: 2.5 test loss: 2.7\nnoise\n")
    src = RegexSource(log, r"step (?P<step>\d+) train loss: (?P<train_loss>\S+) test loss: (?P<test_loss>\S+)")
    assert src.read_new() == [{"step": 100, "train_loss": 2.5, "test_loss": 2.7}]
    append(log, "step 200 train loss: nan test loss: 2.1\n")
    assert src.read_new() == [{"step": 200, "train_loss": None, "test_loss": 2.1}]


def test_csv_source_reads_lightning_csvlogger_rows(tmp_path: Path) -> None:
    path = tmp_path / "metrics.csv"
    path.write_text("epoch,step,train_loss\n0,10,2.0\n")
    src = CsvSource(path)
    assert src.read_new() == [{"epoch": 0, "step": 10, "train_loss": 2.0}]
    # CSVLogger rewrites the file with a wider header when a new metric appears
    path.write_text("epoch,step,train_loss,val_acc\n0,10,2.0,\n0,10,,0.6\n1,20,1.5,\n")
    assert src.read_new() == [{"epoch": 0, "step": 10, "val_acc": 0.6}, {"epoch": 1, "step": 20, "train_loss": 1.5}]


def test_make_source_defaults(tmp_path: Path) -> None:
    src = make_source("jsonl", run_dir=tmp_path, path=None, pattern=None)
    assert isinstance(src, JsonlSource) and src.tailer.path == tmp_path / "metrics.jsonl"
    src = make_source("regex", run_dir=tmp_path, path=None, pattern=r"(?P<step>\d+)")
    assert isinstance(src, RegexSource) and src.tailer.path == tmp_path / "stdout.log"


def test_reporter_writes_what_the_tailer_reads(tmp_path: Path) -> None:
    from orchestrator.reporting import Reporter

    rep = Reporter(tmp_path, handle_signals=False)
    rep.log(epoch=1, acc=0.5, loss=float("nan"))
    rec = JsonlSource(tmp_path / "metrics.jsonl").read_new()[0]
    assert rec["epoch"] == 1 and rec["acc"] == 0.5 and rec["loss"] is None
    ckpt = rep.save_checkpoint(lambda p: p.write_bytes(b"x"), epoch=1, metrics={"acc": 0.5})
    assert rep.latest_checkpoint().read_bytes() == b"x"
    assert json.loads((tmp_path / "checkpoints" / "latest.json").read_text())["epoch"] == 1
    assert ckpt.name == "epoch_000001.pt"


LATE_SIGTERM_WORKER = """
import os, signal, sys, time
from orchestrator.reporting import Reporter
rep = Reporter(sys.argv[1])
class LateSignal:
    def __del__(self):  # runs while the interpreter tears __main__ down, after atexit
        os.kill(os.getpid(), signal.SIGTERM)  # the process group's SIGTERM, arriving late
        time.sleep(0.2)
late = LateSignal()
os.kill(os.getpid(), signal.SIGTERM)  # the stop request (the launch wrapper's forward)
assert rep.should_stop
"""


def test_a_second_sigterm_while_the_worker_exits_does_not_kill_it(tmp_path: Path) -> None:
    """Python resets signal handlers to SIG_DFL during shutdown: without the Reporter's atexit
    guard, this worker (stopped cleanly, exit 0) would die of the second SIGTERM (-15)."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [sys.executable, "-c", LATE_SIGTERM_WORKER, str(tmp_path / "run")],
        env={**os.environ, "PYTHONPATH": str(root)}, capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 0, (out.returncode, out.stderr[-2000:])


BUSY_WORKER = """
import sys, time
from orchestrator.reporting import Reporter
rep = Reporter(sys.argv[1])
print("ready", flush=True)
end = time.monotonic() + 1.0
while time.monotonic() < end:
    pass
print("ok", rep.should_stop, flush=True)
"""


def test_the_stop_handler_survives_a_burst_of_sigterms(tmp_path: Path) -> None:
    """The controller sends a stopped run SIGTERM more than once; a handler that takes a lock
    (threading.Event.set) deadlocks when the next signal lands inside it. A burst of signals
    hangs such a worker every time; the Reporter's handler must take none."""
    import signal
    import subprocess
    import sys
    import time

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen(
        [sys.executable, "-c", BUSY_WORKER, str(tmp_path / "run")],
        env={**os.environ, "PYTHONPATH": str(root)}, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        end = time.monotonic() + 0.5
        while time.monotonic() < end:
            os.kill(proc.pid, signal.SIGTERM)
        out, _ = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0 and out.strip() == "ok True", (proc.returncode, out)
