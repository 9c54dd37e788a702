"""The trivial baselines of the early-persistence race, on a small generated dataset."""

from __future__ import annotations

import numpy as np
import pytest

from synthvid.persistence import PersistenceConfig, extract_tokens, generate_dataset, load_split
from workers.persistence_baselines import colour_matching, prior_features, trivial_baselines


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("baselines") / "data"
    generate_dataset(out, PersistenceConfig(num_samples=300, seed=4), progress=False)
    return out


def test_baselines_are_scored_like_the_workers(data_dir):
    result = trivial_baselines(data_dir)
    assert set(result) == {"majority", "colour_matching", "frame_position_prior", "crowding"}
    for by_split in result.values():
        assert set(by_split) == {"val", "test"}
        for m in by_split.values():
            assert m["balanced_accuracy_ci_low"] <= m["balanced_accuracy"]
            assert m["balanced_accuracy"] <= m["balanced_accuracy_ci_high"]
    assert result["majority"]["val"]["balanced_accuracy"] == 0.5
    # no image content, no crowding: chance on the leak-free data (45 val clips: +-0.06)
    assert abs(result["frame_position_prior"]["val"]["balanced_accuracy"] - 0.5) < 0.08
    # hand-made association by colour nearly solves the task
    assert result["colour_matching"]["val"]["balanced_accuracy"] > 0.9


def test_prior_features_hold_no_pixel_and_colour_matching_counts_the_clip(data_dir):
    tok = extract_tokens(load_split(data_dir, "val"))
    x = prior_features(tok, crowding=True)
    assert x.shape == (len(tok.label), 16 + 64 + 12 + 16) and set(np.unique(x)) <= {0.0, 1.0}
    tok.crops[:] = 7  # every token the same colour: all clips have >= 8 matching tokens
    assert colour_matching(tok, 16).all()
