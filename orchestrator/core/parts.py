"""What the parts of ``Controller`` share, declared once.

The controller is one class assembled from mixins (``resume``, ``scheduling``, ``controls``,
``pruner``) that share its state. Each mixin derives from ``ControllerParts``, which declares
the Controller's attributes and the methods one part calls on another, for type checkers and
readers; nothing here runs.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from orchestrator.core.config import Plan
from orchestrator.core.runs import LiveRun
from orchestrator.core.state import ExperimentRecord, PlanState, RunState
from orchestrator.paths import ResultsPaths
from orchestrator.running.gpus import Slot, SlotHolds
from orchestrator.running.launchers import Launcher, RunHandle


class ControllerParts:
    """The Controller's attributes and cross-part methods (see controller.py for each)."""

    plan: Plan
    state: PlanState
    paths: ResultsPaths
    runs: dict[str, LiveRun]
    launcher: Launcher
    clock: Callable[[], float]
    slots: list[Slot]
    slot_holds: SlotHolds
    fresh: bool
    interrupted: str | None
    wake: threading.Event
    _dirty: bool
    _replay: dict[str, list[dict[str, Any]]]
    _retired: list[RunHandle]
    _stopper: ThreadPoolExecutor
    event: Callable[[str], None]

    if TYPE_CHECKING:
        def _selected(self, live: LiveRun) -> bool: ...
        def _save_state(self) -> None: ...
        def _watch(self, live: LiveRun) -> None: ...
        def _read_source(self, live: LiveRun) -> list[dict[str, Any]]: ...
        def _accept(self, live: LiveRun, record: dict[str, Any], *, decide: bool) -> None: ...
        def _ingest(self, lives: list[LiveRun]) -> None: ...
        def _handle_exit(self, live: LiveRun, code: int) -> None: ...
        def _release(self, live: LiveRun, now: float) -> None: ...
        def _stop(
            self, lives: list[LiveRun], final: RunState, *, reason: str,
            decided_from: float | None = None, experiment: ExperimentRecord | None = None,
        ) -> None: ...
