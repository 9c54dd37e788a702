"""The shared epoch loop's schedule (the loop itself is exercised end to end, resume included,
by tests/test_persistence_worker.py and tests/test_persistence_baseline.py)."""

from __future__ import annotations

import itertools
import math

import pytest

from workers.training_loop import warmup_cosine


def test_warmup_cosine_ramps_up_then_decays_to_the_floor():
    f = warmup_cosine(warmup_steps=4, total_steps=20, floor=0.1)

    def cosine(s: int) -> float:
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * s / 20))

    assert [f(s) for s in range(4)] == pytest.approx([(s + 1) / 4 * cosine(s) for s in range(4)])
    assert f(10) == pytest.approx(0.1 + 0.9 * 0.5)  # halfway down the cosine
    assert f(20) == pytest.approx(0.1) and f(100) == pytest.approx(0.1)  # held at the floor
    values = [f(s) for s in range(3, 21)]
    assert all(a >= b for a, b in itertools.pairwise(values))  # monotone after the warm-up


def test_warmup_cosine_survives_empty_schedules():
    f = warmup_cosine(warmup_steps=0, total_steps=0)  # no division by zero
    assert f(0) == pytest.approx(1.0) and f(1) == pytest.approx(0.1)
