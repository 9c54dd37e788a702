"""Wiring: the one place that puts a controller together with its launcher, views and sync.

The race core (``orchestrator.core``) imports no view and no Ray; the CLI, the tests and the
benchmarks call ``build_controller`` to get a controller with the usual parts.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from orchestrator.core.config import Plan
from orchestrator.core.controller import Controller
from orchestrator.core.snapshot import RaceView
from orchestrator.paths import ResultsPaths
from orchestrator.running.launchers import Launcher, LocalLauncher


def make_launcher(plan: Plan) -> Launcher:
    """Local processes, or Ray actors when the plan says ``executor: ray`` (imports ray then)."""
    if plan.executor == "ray":
        from orchestrator.ray_executor import RayLauncher

        return RayLauncher(plan)
    return LocalLauncher()


def default_views(plan: Plan, *, clock: Callable[[], float] | None = None) -> list[RaceView]:
    """The dashboard (with the plan's sync) and the race report writer."""
    import time

    from orchestrator.remote.sync import make_syncer
    from orchestrator.views.dashboard import Dashboard
    from orchestrator.views.race_report import RaceReportView

    clock = clock or time.time
    paths = ResultsPaths(plan.results_dir)
    syncer = make_syncer(plan.sync, local_root=plan.plan_dir)
    return [Dashboard(plan, paths, syncer, clock=clock), RaceReportView(plan)]


def build_controller(
    plan: Plan,
    *,
    launcher: Launcher | None = None,
    extra_views: list[RaceView] | None = None,
    **kwargs: Any,
) -> Controller:
    """A controller for ``plan`` with its launcher, dashboard, sync and race report.

    Args:
        plan: the validated plan.
        launcher: override the executor (tests); default from ``plan.executor``.
        extra_views: views added after the default ones (the CLI's live table).
        **kwargs: passed to ``Controller`` (only, fresh, subreaper, clock, echo).
    """
    clock = kwargs.get("clock")
    views = default_views(plan, clock=clock) + list(extra_views or [])
    return Controller(plan, launcher=launcher or make_launcher(plan), views=views, **kwargs)
