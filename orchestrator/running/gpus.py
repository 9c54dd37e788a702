"""GPU detection and the slots runs occupy.

A slot is a GPU index (shared by ``workers_per_gpu`` runs) or, on a machine without GPUs, a CPU
slot. Detection uses NVML (nvidia-ml-py) when installed, else ``nvidia-smi``, else no GPUs.
Tests fake GPUs with a plan's explicit ``gpus: [0, 1]`` (or ORCH_FAKE_GPUS=N for ``auto``).
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


def detect_gpus() -> list[int]:
    """Indices of the NVIDIA GPUs on this machine ([] when there are none)."""
    fake = os.environ.get("ORCH_FAKE_GPUS")
    if fake is not None:
        return list(range(int(fake)))
    try:
        import pynvml  # nvidia-ml-py

        pynvml.nvmlInit()
        try:
            return list(range(pynvml.nvmlDeviceGetCount()))
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # not installed, no driver, no device: fall through to nvidia-smi
        pass
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        out = subprocess.run(
            [smi, "--query-gpu=index", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
    except (subprocess.SubprocessError, OSError):
        return []
    return [int(line) for line in out.split() if line.strip().isdigit()]


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
