"""GPU detection and the slots runs occupy.

A slot is a GPU index (shared by ``workers_per_gpu`` runs) or, on a machine without GPUs, a CPU
slot. Detection uses NVML (nvidia-ml-py) when installed, else ``nvidia-smi``, else no GPUs, and
keeps to the GPUs of the controller's own CUDA_VISIBLE_DEVICES (indices or UUIDs) when it is
set. GPU numbers are NVML indices (PCI bus order); workers get CUDA_DEVICE_ORDER=PCI_BUS_ID so
that CUDA numbers them the same way. Tests fake GPUs with a plan's explicit ``gpus: [0, 1]``, with
ORCH_FAKE_GPUS=N for ``auto``, or with the fake pynvml in tests/fake_nvml/.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Slot:
    """One place a run can occupy.

    Attributes:
        index: slot number (stable, used in the dashboard).
        gpu: GPU index, or None for a CPU slot.
        share: which share of the GPU (0..workers_per_gpu-1).
    """

    index: int
    gpu: int | None
    share: int = 0

    @property
    def cuda_visible_devices(self) -> str:
        return "" if self.gpu is None else str(self.gpu)

    def label(self) -> str:
        if self.gpu is None:
            return f"cpu{self.index}"
        return f"gpu{self.gpu}" + (f".{self.share}" if self.share else "")


@dataclass(frozen=True)
class Gpu:
    """One NVIDIA GPU of this machine, as NVML lists it.

    Attributes:
        index: NVML index: PCI bus order, which is CUDA's order when CUDA_DEVICE_ORDER=PCI_BUS_ID.
        uuid: ``GPU-...`` (what CUDA_VISIBLE_DEVICES may name instead of an index).
        name: the model ("NVIDIA A100-SXM4-80GB").
    """

    index: int
    uuid: str
    name: str


def list_gpus() -> list[Gpu]:
    """Every NVIDIA GPU of this machine, ignoring CUDA_VISIBLE_DEVICES ([] when none).

    NVML (nvidia-ml-py) when installed, else ``nvidia-smi``; ORCH_FAKE_GPUS=N fakes N GPUs.
    """
    fake = os.environ.get("ORCH_FAKE_GPUS")
    if fake is not None:
        return [Gpu(i, f"GPU-fake-{i:04d}", "fake") for i in range(int(fake))]
    try:
        import pynvml  # nvidia-ml-py

        pynvml.nvmlInit()
        try:
            out = []
            for i in range(pynvml.nvmlDeviceGetCount()):
                handle = pynvml.nvmlDeviceGetHandleByIndex(i)
                uuid, name = pynvml.nvmlDeviceGetUUID(handle), pynvml.nvmlDeviceGetName(handle)
                out.append(Gpu(i, _text(uuid), _text(name)))
            return out
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # not installed, no driver, no device: fall through to nvidia-smi
        pass
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        text = subprocess.run(
            [smi, "--query-gpu=index,uuid,name", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
    except (subprocess.SubprocessError, OSError):
        return []
    gpus = []
    for line in text.splitlines():
        fields = [f.strip() for f in line.split(",", 2)]
        if len(fields) == 3 and fields[0].isdigit():
            gpus.append(Gpu(int(fields[0]), fields[1], fields[2]))
    return gpus


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def visible_gpus(
    gpus: list[Gpu], cuda_visible_devices: str | None, cuda_device_order: str | None = None
) -> tuple[list[Gpu], list[str]]:
    """The GPUs a process started with ``CUDA_VISIBLE_DEVICES`` may use, read as CUDA reads it.

    Entries are comma-separated indices or ``GPU-`` UUIDs (a unique prefix is enough); the first
    entry that names no GPU (out of range, unknown, repeated, a MIG instance) ends the list, as
    it does for CUDA. Indices are taken in PCI bus order (NVML's, and the order the workers get
    with CUDA_DEVICE_ORDER=PCI_BUS_ID).

    Args:
        gpus: every GPU of the machine (``list_gpus``).
        cuda_visible_devices: the controller's CUDA_VISIBLE_DEVICES; None (unset): all GPUs.
        cuda_device_order: the controller's CUDA_DEVICE_ORDER (only used for a warning).

    Returns:
        (the visible GPUs in the listed order, notes worth telling the user: an entry that
        ended the list, indices that CUDA's default order could read differently).
    """
    if cuda_visible_devices is None:
        return list(gpus), []
    notes: list[str] = []
    chosen: list[Gpu] = []
    entries = [e.strip() for e in cuda_visible_devices.split(",")]
    if entries == [""]:
        return [], ["CUDA_VISIBLE_DEVICES is empty: no GPU is visible"]
    used_index = False
    for i, entry in enumerate(entries):
        match: Gpu | None = None
        if entry.lstrip("+").isdigit():
            match = next((g for g in gpus if g.index == int(entry)), None)
            used_index = True
        elif entry.startswith("GPU-"):
            found = [g for g in gpus if g.uuid.startswith(entry)]
            match = found[0] if len(found) == 1 else None
        if match is None or match in chosen:
            why = "MIG instances are not supported" if entry.startswith("MIG-") else (
                "repeated" if match in chosen else "no such GPU")
            notes.append(f"CUDA_VISIBLE_DEVICES entry {entry!r} ({why}) ends the list: "
                         f"{', '.join(entries[i:])} ignored")
            break
        chosen.append(match)
    if used_index and cuda_device_order != "PCI_BUS_ID" and len({g.name for g in gpus}) > 1:
        notes.append(
            "CUDA_VISIBLE_DEVICES lists indices and CUDA_DEVICE_ORDER is not PCI_BUS_ID on a "
            "machine with different GPU models: the indices are read in PCI bus order (NVML's); "
            "CUDA's default order (fastest first) may number them differently. Use GPU UUIDs, "
            "or export CUDA_DEVICE_ORDER=PCI_BUS_ID"
        )
    return chosen, notes


def detect_gpus() -> list[int]:
    """NVML indices of the GPUs this controller may use: those of its own CUDA_VISIBLE_DEVICES
    when set (indices or UUIDs, see ``visible_gpus``), else every GPU ([] when none)."""
    chosen, _ = visible_gpus(list_gpus(), os.environ.get("CUDA_VISIBLE_DEVICES"),
                             os.environ.get("CUDA_DEVICE_ORDER"))
    return [g.index for g in chosen]


def describe_slots(
    gpus: str | list[int],
    *,
    workers_per_gpu: int,
    max_parallel: int | None,
    cpu_slots: int | None,
    executor: str = "local",
) -> list[str]:
    """Lines saying which slots a controller would use for a plan (``validate`` prints them).

    Args: as ``make_slots``; ``executor`` "ray" means Ray assigns GPUs on its nodes.
    """
    if executor == "ray":
        n = len(make_slots("none", workers_per_gpu=workers_per_gpu, max_parallel=max_parallel,
                           cpu_slots=cpu_slots))
        return [f"slots: {n} concurrent runs (executor: ray; Ray picks each run's node and "
                "GPUs, and sets its CUDA_VISIBLE_DEVICES)"]
    slots = make_slots(gpus, workers_per_gpu=workers_per_gpu, max_parallel=max_parallel,
                       cpu_slots=cpu_slots)
    lines = [f"slots: {', '.join(s.label() for s in slots)}"]
    if gpus == "auto":
        every = list_gpus()
        env = os.environ.get("CUDA_VISIBLE_DEVICES")
        chosen, notes = visible_gpus(every, env, os.environ.get("CUDA_DEVICE_ORDER"))
        source = "all GPUs NVML lists" if env is None else f"CUDA_VISIBLE_DEVICES={env!r}"
        lines.append(f"gpus: auto: {len(chosen)} of {len(every)} GPUs ({source})")
        lines += [f"  gpu{g.index}: {g.name} {g.uuid}" for g in chosen]
        lines += [f"warning: {note}" for note in notes]
    if any(s.gpu is not None for s in slots):
        lines.append("workers get CUDA_VISIBLE_DEVICES=<gpu index> with "
                     "CUDA_DEVICE_ORDER=PCI_BUS_ID (NVML's numbering)")
    return lines


def make_slots(
    gpus: str | list[int],
    *,
    workers_per_gpu: int,
    max_parallel: int | None,
    cpu_slots: int | None = None,
) -> list[Slot]:
    """The slots of this machine for a plan.

    Args:
        gpus: "auto" (detect), "none" (CPU slots only) or explicit GPU indices.
        workers_per_gpu: runs sharing one GPU.
        max_parallel: cap on concurrent runs (None: one per slot; on CPU, one per worker).
        cpu_slots: number of CPU slots when there is no GPU (default: max_parallel or 1 per
            core).

    Returns:
        Slots in scheduling order (GPU-major, so runs spread over GPUs first).
    """
    indices: list[int] = (
        detect_gpus() if gpus == "auto" else ([] if gpus == "none" else [int(g) for g in gpus])
    )
    slots: list[Slot] = []
    if indices:
        for share in range(workers_per_gpu):
            for gpu in indices:
                slots.append(Slot(len(slots), gpu, share))
    else:
        n = max_parallel or cpu_slots or os.cpu_count() or 1
        slots = [Slot(i, None) for i in range(n)]
    if max_parallel is not None:
        slots = slots[:max_parallel]
    return slots


def gpu_memory_holders(gpu: int) -> dict[int, int] | None:
    """pid -> bytes of GPU memory used, for the compute processes NVML lists on GPU ``gpu``.

    Args:
        gpu: NVML device index (the physical index; equals the CUDA index when
            CUDA_DEVICE_ORDER=PCI_BUS_ID).

    Returns:
        The map (possibly empty), or None when NVML is unavailable (pynvml from nvidia-ml-py not
        installed, no driver, no such device): the caller then has nothing to wait for.
    """
    try:
        import pynvml  # nvidia-ml-py
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except Exception:  # pynvml.NVMLError: no driver / library
        return None
    try:
        handle = pynvml.nvmlDeviceGetHandleByIndex(gpu)
        procs = pynvml.nvmlDeviceGetComputeRunningProcesses(handle)
        return {int(p.pid): int(p.usedGpuMemory or 0) for p in procs}
    except Exception:
        return None
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass


def wait_gpu_memory_released(
    gpu: int,
    pids: set[int],
    *,
    timeout_s: float,
    poll_s: float = 0.25,
    cancel: threading.Event | None = None,
) -> tuple[list[int], float]:
    """Wait until none of ``pids`` holds memory on GPU ``gpu`` (bounded).

    The driver frees a process's memory shortly after the process is reaped, occasionally much
    later (a stuck context, a zombie holding the device file). Handing the slot to the next
    run before that happens gives it an out-of-memory error at start. Uses
    ``nvmlDeviceGetComputeRunningProcesses``; NVML reports pids of the host's pid namespace, so
    inside a container with its own pid namespace nothing matches and this returns at once.

    Args:
        gpu: NVML device index.
        pids: the stopped run's processes (see RunHandle.pids).
        timeout_s: give up after this many seconds.
        poll_s: NVML polling interval.
        cancel: set to give up early (controller shutdown).

    Returns:
        (pids still holding memory at the end ([] once released or when NVML is unavailable),
        seconds waited).
    """
    start = time.monotonic()
    while True:
        holders = gpu_memory_holders(gpu)
        held = sorted(pids & set(holders)) if holders is not None else []
        waited = time.monotonic() - start
        if not held or waited >= timeout_s or (cancel is not None and cancel.is_set()):
            return held, waited
        if cancel is not None:
            cancel.wait(min(poll_s, max(0.0, timeout_s - waited)))
        else:
            time.sleep(min(poll_s, max(0.0, timeout_s - waited)))


class SlotHolds:
    """GPU slots kept from the next run until the last run's memory is released.

    ``hold`` starts a bounded wait (``wait_gpu_memory_released``, on a small thread pool) for a
    stopped run's pids; the slot counts as busy (``held``) until ``finished`` has handed the
    wait's outcome back. ``wake`` is set whenever a wait ends, so the controller's loop acts at
    once. ``owner`` is whatever the caller wants back with the outcome (the run).
    """

    def __init__(self, wake: threading.Event, timeout_s: float = 30.0) -> None:
        self.timeout_s = timeout_s
        self._wake = wake
        self._holds: dict[int, tuple[Any, Future[tuple[list[int], float]]]] = {}
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="gpu-release")
        self._cancel = threading.Event()

    def hold(self, slot: Slot, pids: set[int], owner: Any) -> None:
        """Keep ``slot`` (a GPU slot) until none of ``pids`` holds memory on its GPU, at most
        ``timeout_s`` seconds (no wait where NVML is unavailable)."""
        assert slot.gpu is not None
        if not pids:
            return
        future = self._pool.submit(
            wait_gpu_memory_released, slot.gpu, set(pids),
            timeout_s=self.timeout_s, cancel=self._cancel,
        )
        future.add_done_callback(lambda _f: self._wake.set())
        self._holds[slot.index] = (owner, future)

    def held(self) -> set[int]:
        """Indices of the slots still held."""
        return set(self._holds)

    def finished(self) -> list[tuple[int, Any, tuple[list[int], float] | BaseException]]:
        """The waits that ended since the last call, as (slot index, owner, (pids still
        holding memory, seconds waited) or the exception the NVML query raised); their slots
        are free again."""
        out: list[tuple[int, Any, tuple[list[int], float] | BaseException]] = []
        for index, (owner, future) in list(self._holds.items()):
            if not future.done():
                continue
            del self._holds[index]
            error = future.exception()
            out.append((index, owner, error if error is not None else future.result()))
        return out

    def close(self) -> None:
        """Give up every wait and join the pool."""
        self._cancel.set()
        self._pool.shutdown(wait=True)
