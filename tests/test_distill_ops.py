"""Box ops, mask losses and scores, and the Hungarian matcher of the video distillation job."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from models.set_criterion import (
    HungarianMatcher,
    SetCriterion,
    batch_dice_cost,
    boundary_f_measure,
    box_cxcywh_to_xyxy,
    box_xyxy_to_cxcywh,
    dice_loss,
    generalized_box_iou,
    mask_iou_matrix,
    score_frame,
)


def test_generalized_box_iou_hand_computed():
    a = torch.tensor([[0.0, 0, 2, 2]])
    b = torch.tensor([[1.0, 1, 3, 3], [0, 0, 2, 2], [3, 3, 4, 4]])
    g = generalized_box_iou(a, b)[0]
    # overlap 1, union 7, enclosing 9: 1/7 - 2/9; identical: 1; disjoint: 0 - (16 - 5) / 16
    assert g[0].item() == pytest.approx(1 / 7 - 2 / 9)
    assert g[1].item() == pytest.approx(1.0)
    assert g[2].item() == pytest.approx(-11 / 16)


def test_generalized_box_iou_rejects_degenerate_boxes():
    with pytest.raises(ValueError, match="x2 >= x1"):
        generalized_box_iou(torch.tensor([[2.0, 0, 1, 1]]), torch.tensor([[0.0, 0, 1, 1]]))


def test_box_format_round_trip():
    b = torch.tensor([[0.5, 0.4, 0.2, 0.3]])
    assert torch.allclose(box_cxcywh_to_xyxy(b), torch.tensor([[0.4, 0.25, 0.6, 0.55]]))
    assert torch.allclose(box_xyxy_to_cxcywh(box_cxcywh_to_xyxy(b)), b)


def test_dice_loss_hand_computed():
    logits = torch.zeros(1, 4)  # p = 0.5 everywhere
    target = torch.tensor([[1.0, 1, 0, 0]])
    # 1 - (2 * 1 + 1) / (2 + 2 + 1)
    assert dice_loss(logits, target).item() == pytest.approx(0.4)
    assert batch_dice_cost(logits, target).item() == pytest.approx(0.4)


def test_mask_iou_and_empty_masks():
    a = np.array([[[1, 1, 0, 0]], [[0, 0, 0, 0]]], bool)
    b = np.array([[[0, 1, 1, 0]], [[0, 0, 0, 0]]], bool)
    iou = mask_iou_matrix(a, b)
    assert iou[0, 0] == pytest.approx(1 / 3)
    assert iou[1, 1] == 1.0  # empty vs empty
    assert iou[0, 1] == 0.0 and iou[1, 0] == 0.0


def square(size: int, x: int, y: int, side: int) -> np.ndarray:
    m = np.zeros((size, size), bool)
    m[y : y + side, x : x + side] = True
    return m


def test_boundary_f_measure_tolerance():
    gt = square(64, 20, 20, 16)
    empty = np.zeros_like(gt)
    assert boundary_f_measure(gt, gt) == 1.0
    assert boundary_f_measure(empty, empty) == 1.0
    assert boundary_f_measure(empty, gt) == 0.0 and boundary_f_measure(gt, empty) == 0.0
    # DAVIS tolerance at 64x64: ceil(0.008 * 90.5) = 1 pixel: a 1-pixel shift is free, 4 is not
    assert boundary_f_measure(square(64, 21, 20, 16), gt) == 1.0
    assert boundary_f_measure(square(64, 24, 20, 16), gt) < 0.7


def test_score_frame_cases():
    gt = np.stack([square(32, 2, 2, 8), square(32, 18, 18, 8)])
    empty = np.zeros((0, 32, 32), bool)
    assert score_frame(empty, empty)["jf"] == 1.0  # negative frame, correctly rejected
    miss = score_frame(empty, gt)
    assert miss["jf"] == 0.0 and miss["fn"] == 2 and miss["tp"] == 0
    perfect = score_frame(gt[::-1].copy(), gt)  # order does not matter: Hungarian matching
    assert perfect["jf"] == 1.0 and perfect["tp"] == 2 and perfect["fp"] == 0
    extra = score_frame(np.concatenate([gt, square(32, 10, 24, 4)[None]]), gt)
    assert (
        extra["fp"] == 1
        and extra["jf"] == pytest.approx(2 / 3)
        and extra["iou"] == pytest.approx(2 / 3)
    )
    false_alarm = score_frame(gt[:1], empty)
    assert false_alarm["jf"] == 0.0 and false_alarm["fp"] == 1


def random_case(rng: torch.Generator, Q: int, n: int, size: int = 12):
    outputs = {
        "pred_logits": torch.randn(1, Q, 2, generator=rng),
        "pred_boxes": torch.rand(1, Q, 2, generator=rng).repeat(1, 1, 2) * 0.5
        + torch.tensor([0.25, 0.25, 0.05, 0.05]),
        "pred_masks": torch.randn(1, Q, size, size, generator=rng) * 3,
    }
    masks = torch.rand(n, size, size, generator=rng) > 0.6
    boxes = torch.rand(n, 4, generator=rng) * torch.tensor([0.5, 0.5, 0.3, 0.3]) + 0.25
    return outputs, [{"masks": masks, "boxes": boxes}]


@pytest.mark.parametrize("seed", range(8))
def test_hungarian_matcher_is_optimal_vs_brute_force(seed):
    g = torch.Generator().manual_seed(seed)
    Q, n = 5, 3
    outputs, targets = random_case(g, Q, n)
    matcher = HungarianMatcher()
    ((rows, cols),) = matcher(outputs, targets)
    cost = matcher.cost_matrix(
        outputs["pred_logits"][0], outputs["pred_boxes"][0], outputs["pred_masks"][0], targets[0]
    ).numpy()
    found = cost[rows, cols].sum()
    best = min(
        sum(cost[q, j] for j, q in enumerate(perm)) for perm in itertools.permutations(range(Q), n)
    )
    assert len(rows) == n and sorted(cols.tolist()) == list(range(n))
    assert found == pytest.approx(best, abs=1e-5)


def test_matcher_with_no_targets():
    g = torch.Generator().manual_seed(0)
    outputs, _ = random_case(g, 4, 1)
    empty = [{"masks": torch.zeros(0, 12, 12, dtype=torch.bool), "boxes": torch.zeros(0, 4)}]
    ((rows, cols),) = HungarianMatcher()(outputs, empty)
    assert len(rows) == 0 and len(cols) == 0


def test_set_criterion_binary_targets_are_not_sigmoided():
    """Perfect logits on binary masks give ~0 mask losses (a sigmoid on the targets would not)."""
    masks = torch.zeros(2, 16, 16)
    masks[0, 2:8, 2:8] = 1
    masks[1, 9:14, 4:12] = 1
    boxes = torch.tensor([[5 / 16, 5 / 16, 6 / 16, 6 / 16], [8 / 16, 11.5 / 16, 8 / 16, 5 / 16]])
    Q = 4
    logits = torch.tensor([[10.0, -10.0]] * 2 + [[-10.0, 10.0]] * 2)[None]  # 2 objects, 2 absent
    pred_masks = torch.full((1, Q, 16, 16), -30.0)
    pred_masks[0, :2] = masks * 60 - 30
    pred_boxes = torch.cat([boxes, torch.full((2, 4), 0.5)])[None]
    crit = SetCriterion(HungarianMatcher())
    losses = crit(
        {"pred_logits": logits, "pred_boxes": pred_boxes, "pred_masks": pred_masks},
        [{"masks": masks.bool(), "boxes": boxes}],
    )
    for k in ("loss_mask", "loss_dice", "loss_bbox", "loss_giou", "loss_ce"):
        assert losses[k].item() < 1e-3, k


def test_set_criterion_no_object_weight():
    """With no targets every query is "no object": CE is the plain CE of class 1."""
    logits = torch.randn(2, 5, 2)
    out = {
        "pred_logits": logits,
        "pred_boxes": torch.rand(2, 5, 4) * 0.2 + 0.4,
        "pred_masks": torch.randn(2, 5, 8, 8),
    }
    empty = {"masks": torch.zeros(0, 8, 8, dtype=torch.bool), "boxes": torch.zeros(0, 4)}
    losses = SetCriterion(HungarianMatcher(), eos_coef=0.1)(out, [empty, empty])
    expected = torch.nn.functional.cross_entropy(
        logits.reshape(-1, 2), torch.ones(10, dtype=torch.long)
    )
    assert losses["loss_ce"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert losses["loss_mask"].item() == 0.0
    # one matched target: the unmatched queries' CE terms are down-weighted by 0.1
    one = {
        "masks": torch.ones(1, 8, 8, dtype=torch.bool),
        "boxes": torch.tensor([[0.5, 0.5, 1.0, 1.0]]),
    }
    crit = SetCriterion(HungarianMatcher(), eos_coef=0.1)
    l1 = crit(out, [one, empty])["loss_ce"]
    assert torch.isfinite(l1) and l1.item() > 0
