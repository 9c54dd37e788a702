"""The Ray executor: each run becomes a Ray actor that holds its slot on some node of a cluster.

Imports ray; only the CLI imports this package, and only when a plan says ``executor: ray``.
"""

from orchestrator.ray_executor.executor import RayLauncher

__all__ = ["RayLauncher"]
