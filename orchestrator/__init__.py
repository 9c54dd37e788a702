"""Race experiment approaches in parallel git worktrees; stop the losers when one wins.

See README.md and shared/DESIGN.md. The worker-side helper is ``orchestrator.reporting``.
"""

__version__ = "0.1.0"
