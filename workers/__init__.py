"""Training entry points, one module per job: ``python -m workers.NAME``."""
