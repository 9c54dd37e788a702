"""Synthetic video generators shared by the research jobs (deterministic from a seed)."""
