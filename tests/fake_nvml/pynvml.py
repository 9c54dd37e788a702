"""A fake pynvml (nvidia-ml-py) for tests: the GPUs come from ORCH_TEST_NVML.

ORCH_TEST_NVML is a JSON list of ``[uuid, name]`` pairs, in NVML (PCI bus) order, e.g.
``[["GPU-aaaa-0", "NVIDIA A100"], ["GPU-bbbb-1", "NVIDIA T4"]]``. No process holds memory.
Put this folder first on sys.path (or PYTHONPATH for a subprocess) to use it.
"""

from __future__ import annotations

import json
import os
from types import SimpleNamespace


class NVMLError(Exception):
    """What the real pynvml raises."""


def _gpus() -> list[list[str]]:
    return [list(g) for g in json.loads(os.environ.get("ORCH_TEST_NVML", "[]"))]


def nvmlInit() -> None:
    if "ORCH_TEST_NVML" not in os.environ:
        raise NVMLError("fake NVML: ORCH_TEST_NVML is not set (no driver)")


def nvmlShutdown() -> None:
    pass


def nvmlDeviceGetCount() -> int:
    return len(_gpus())


def nvmlDeviceGetHandleByIndex(index: int) -> int:
    if not 0 <= index < len(_gpus()):
        raise NVMLError(f"fake NVML: no GPU {index}")
    return index


def nvmlDeviceGetUUID(handle: int) -> str:
    return _gpus()[handle][0]


def nvmlDeviceGetName(handle: int) -> bytes:
    return _gpus()[handle][1].encode()  # older pynvml returns bytes


def nvmlDeviceGetComputeRunningProcesses(handle: int) -> list[SimpleNamespace]:
    return []
