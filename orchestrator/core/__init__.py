"""The race itself: the plan, criteria, state, the controller loop and what it owns."""
