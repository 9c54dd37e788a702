"""GPU conventions of the local executor, with the fake NVML (tests/fake_nvml/pynvml.py).

The controller keeps to the GPUs of its own CUDA_VISIBLE_DEVICES (indices or UUIDs, read as CUDA
reads them), numbers GPUs as NVML does (PCI bus order), starts workers with
CUDA_DEVICE_ORDER=PCI_BUS_ID, and ``validate`` prints the slots it would use.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest
from conftest import run_cli, write_plan

from orchestrator.core.config import load_plan
from orchestrator.core.state import PlanState, RunState
from orchestrator.running.gpus import Gpu, detect_gpus, list_gpus, make_slots, visible_gpus
from orchestrator.session import build_controller

FAKE_NVML = Path(__file__).resolve().parent / "fake_nvml"
# A mixed machine, in PCI bus order: two A100s around a T4 and an L4.
MACHINE = [
    ["GPU-0a0a0a0a-1111-2222-3333-444444444444", "NVIDIA A100-SXM4-80GB"],
    ["GPU-1b1b1b1b-1111-2222-3333-444444444444", "NVIDIA T4"],
    ["GPU-2c2c2c2c-1111-2222-3333-444444444444", "NVIDIA A100-SXM4-80GB"],
    ["GPU-3d3d3d3d-1111-2222-3333-444444444444", "NVIDIA L4"],
]
GPUS = [Gpu(i, uuid, name) for i, (uuid, name) in enumerate(MACHINE)]


@pytest.fixture
def fake_nvml(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fake pynvml in place of the real one, listing MACHINE."""
    spec = importlib.util.spec_from_file_location("pynvml", FAKE_NVML / "pynvml.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setitem(sys.modules, "pynvml", module)
    monkeypatch.setenv("ORCH_TEST_NVML", json.dumps(MACHINE))
    monkeypatch.delenv("ORCH_FAKE_GPUS", raising=False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv("CUDA_DEVICE_ORDER", raising=False)


def indices(selection: tuple[list[Gpu], list[str]]) -> list[int]:
    return [g.index for g in selection[0]]


def test_visible_gpus_reads_cuda_visible_devices_like_cuda() -> None:
    assert indices(visible_gpus(GPUS, None)) == [0, 1, 2, 3]  # unset: every GPU
    assert visible_gpus(GPUS, "") == ([], ["CUDA_VISIBLE_DEVICES is empty: no GPU is visible"])
    assert indices(visible_gpus(GPUS, "2,0", "PCI_BUS_ID")) == [2, 0]  # listed order kept
    assert indices(visible_gpus(GPUS, f" {MACHINE[3][0]} , 1", "PCI_BUS_ID")) == [3, 1]
    assert indices(visible_gpus(GPUS, "GPU-2c2c,GPU-0a", "PCI_BUS_ID")) == [2, 0]  # prefixes
    # The first entry that names no GPU ends the list, as it does for CUDA.
    chosen, notes = visible_gpus(GPUS, "1,7,2", "PCI_BUS_ID")
    assert [g.index for g in chosen] == [1] and "'7' (no such GPU)" in notes[0]
    chosen, notes = visible_gpus(GPUS, "GPU-,3", "PCI_BUS_ID")  # ambiguous prefix
    assert chosen == [] and "no such GPU" in notes[0]
    chosen, notes = visible_gpus(GPUS, "0,0", "PCI_BUS_ID")
    assert [g.index for g in chosen] == [0] and "repeated" in notes[0]
    chosen, notes = visible_gpus(GPUS, "MIG-abc", "PCI_BUS_ID")
    assert chosen == [] and "MIG" in notes[0]
    # Indices on a mixed machine without PCI_BUS_ID: still PCI order, with a warning.
    chosen, notes = visible_gpus(GPUS, "1", None)
    assert [g.index for g in chosen] == [1] and "CUDA_DEVICE_ORDER" in notes[-1]
    assert visible_gpus(GPUS, MACHINE[1][0], None)[1] == []  # UUIDs are unambiguous
    same = [Gpu(i, f"GPU-{i}", "NVIDIA H100") for i in range(2)]
    assert visible_gpus(same, "1", None)[1] == []  # one model: both orders agree


def test_detect_gpus_keeps_to_the_controllers_own_gpus(
    fake_nvml: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert [g.uuid for g in list_gpus()] == [uuid for uuid, _ in MACHINE]
    assert list_gpus()[1].name == "NVIDIA T4"  # bytes from older pynvml decoded
    assert detect_gpus() == [0, 1, 2, 3]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", f"{MACHINE[2][0]},{MACHINE[0][0]}")
    assert detect_gpus() == [2, 0]
    slots = make_slots("auto", workers_per_gpu=2, max_parallel=None)
    assert [s.label() for s in slots] == ["gpu2", "gpu0", "gpu2.1", "gpu0.1"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert detect_gpus() == []
    assert make_slots("auto", workers_per_gpu=1, max_parallel=2)[0].gpu is None  # CPU slots


@pytest.mark.slow
def test_local_race_uses_only_visible_gpus_in_pci_order(
    fake_nvml: None, repo: Path, monkeypatch: pytest.MonkeyPatch, leak_check: str
) -> None:
    """gpus: auto under CUDA_VISIBLE_DEVICES=<uuid of 3>,1: the two workers get GPUs 3 and 1
    (NVML numbers) and CUDA_DEVICE_ORDER=PCI_BUS_ID, so CUDA means the same devices."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", f"{MACHINE[3][0]},1")
    monkeypatch.setenv("CUDA_DEVICE_ORDER", "FASTEST_FIRST")  # the controller's own: not passed
    probe = ("import os; print('GPU', os.environ['CUDA_VISIBLE_DEVICES'], "
             "os.environ['CUDA_DEVICE_ORDER'], flush=True)")
    workers = [{"name": n, "branch": f"g/{n}", "command": [sys.executable, "-c", probe]}
               for n in ("a", "b")]
    plan = load_plan(write_plan(repo, workers, gpus="auto"))
    controller = build_controller(plan)
    assert [s.label() for s in controller.slots] == ["gpu3", "gpu1"]
    controller.run()
    controller.wait_for_views()
    state = PlanState.load(plan.results_dir / "state.json")
    seen = set()
    for name in ("a", "b"):
        assert state.runs[f"race/{name}"].state == RunState.exhausted
        line = next(x for x in (plan.results_dir / "race" / name / "stdout.log").read_text()
                    .splitlines() if x.startswith("GPU "))
        _, gpu, order = line.split()
        assert order == "PCI_BUS_ID"
        seen.add(gpu)
    assert seen == {"3", "1"}


def test_validate_prints_the_slots(repo: Path) -> None:
    plan = write_plan(repo, [{"name": "a", "branch": "g/a", "command": ["true"]},
                             {"name": "b", "branch": "g/b", "command": ["true"]}], gpus="auto")
    env = {**os.environ, "ORCH_TEST_NVML": json.dumps(MACHINE),
           "PYTHONPATH": os.pathsep.join([str(FAKE_NVML), os.environ.get("PYTHONPATH", "")]),
           "CUDA_VISIBLE_DEVICES": "2,3"}
    env.pop("CUDA_DEVICE_ORDER", None)
    env.pop("ORCH_FAKE_GPUS", None)
    out = run_cli("validate", str(plan), cwd=repo, env=env)
    assert out.returncode == 0, out.stderr
    assert "slots: gpu2, gpu3" in out.stdout
    assert "gpus: auto: 2 of 4 GPUs (CUDA_VISIBLE_DEVICES='2,3')" in out.stdout
    assert f"gpu3: NVIDIA L4 {MACHINE[3][0]}" in out.stdout
    assert "warning: CUDA_VISIBLE_DEVICES lists indices" in out.stdout  # mixed models
    assert "CUDA_DEVICE_ORDER=PCI_BUS_ID" in out.stdout
    env["CUDA_VISIBLE_DEVICES"] = ""
    out = run_cli("validate", str(plan), cwd=repo, env=env)
    assert out.returncode == 0, out.stderr
    assert "slots: cpu0, cpu1" in out.stdout and "0 of 4 GPUs" in out.stdout
