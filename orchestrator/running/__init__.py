"""Running attempts: git worktrees, process trees, launchers, GPU slots."""
