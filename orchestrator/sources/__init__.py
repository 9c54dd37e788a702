"""Metric sources: reading what workers write (jsonl, stdout regex, CSV, TensorBoard)."""
