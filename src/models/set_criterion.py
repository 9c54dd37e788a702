"""Box/mask ops, Hungarian matching, DETR set losses, and per-frame segmentation scores.

References: DETR (Carion et al. 2020; facebookresearch/detr ``util/box_ops.py``,
``models/matcher.py``, ``models/detr.py`` SetCriterion, ``models/segmentation.py`` dice and
focal losses), Mask2Former's batched mask costs (``batch_dice_loss``,
``batch_sigmoid_ce_loss``), generalized IoU (Rezatofighi et al. 2019), and the DAVIS
boundary measure (Perazzi et al. 2016; davis2017-evaluation ``db_eval_boundary``, tolerance
0.008 of the image diagonal).

Conventions: boxes are (cx, cy, w, h) normalised to [0, 1] in predictions and targets;
generalized_box_iou takes xyxy. The model predicts mask LOGITS; ground-truth masks are binary
{0, 1} and are used as they are (never passed through a sigmoid, the original's bug).
A target is a dict {"masks": float/bool [n, H, W], "boxes": float [n, 4] cxcywh}; one class.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy.ndimage import binary_dilation
from scipy.optimize import linear_sum_assignment
from torch import nn
from torch.nn import functional as F

# -- boxes -------------------------------------------------------------------------------------


def box_cxcywh_to_xyxy(b: torch.Tensor) -> torch.Tensor:
    """[..., 4] (cx, cy, w, h) -> [..., 4] (x1, y1, x2, y2)."""
    cx, cy, w, h = b.unbind(-1)
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1)


def box_xyxy_to_cxcywh(b: torch.Tensor) -> torch.Tensor:
    """[..., 4] (x1, y1, x2, y2) -> [..., 4] (cx, cy, w, h)."""
    x1, y1, x2, y2 = b.unbind(-1)
    return torch.stack([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1], -1)


def box_area(b: torch.Tensor) -> torch.Tensor:
    """[N, 4] xyxy -> [N] areas."""
    return (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])


def box_iou(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pairwise IoU of xyxy boxes a [N, 4], b [M, 4] -> (iou [N, M], union [N, M])."""
    lt = torch.max(a[:, None, :2], b[None, :, :2])
    rb = torch.min(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    union = box_area(a)[:, None] + box_area(b)[None, :] - inter
    return inter / union, union


def generalized_box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise generalized IoU (Rezatofighi et al. 2019) of xyxy boxes: [N, 4], [M, 4] -> [N, M].

    GIoU = IoU - (|C| - |A u B|) / |C|, C the smallest enclosing box; in [-1, 1].

    Raises:
        ValueError: if a box has x2 < x1 or y2 < y1 (degenerate boxes give inf/nan).
    """
    if not ((a[:, 2:] >= a[:, :2]).all() and (b[:, 2:] >= b[:, :2]).all()):
        raise ValueError("generalized_box_iou needs xyxy boxes with x2 >= x1 and y2 >= y1")
    iou, union = box_iou(a, b)
    lt = torch.min(a[:, None, :2], b[None, :, :2])
    rb = torch.max(a[:, None, 2:], b[None, :, 2:])
    enclosing = (rb - lt).clamp(min=0).prod(-1)
    return iou - (enclosing - union) / enclosing


# -- masks (losses and costs on logits vs binary targets) --------------------------------------


def dice_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-mask soft Dice loss 1 - (2|p t| + 1) / (|p| + |t| + 1).

    logits [n, P], binary targets [n, P] -> [n].
    """
    p = logits.sigmoid()
    return 1 - (2 * (p * targets).sum(-1) + 1) / (p.sum(-1) + targets.sum(-1) + 1)


def sigmoid_focal_loss(
    logits: torch.Tensor, targets: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0
) -> torch.Tensor:
    """Per-mask focal loss (Lin et al. 2017) averaged over pixels: [n, P], [n, P] -> [n]."""
    p = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = p * targets + (1 - p) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return loss.mean(-1)


def batch_dice_cost(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Pairwise Dice loss: logits [Q, P], binary targets [n, P] -> [Q, n]."""
    p = logits.sigmoid()
    return 1 - (2 * p @ targets.T + 1) / (p.sum(-1)[:, None] + targets.sum(-1)[None, :] + 1)


def batch_bce_cost(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Pairwise mean pixel BCE: logits [Q, P], binary targets [n, P] -> [Q, n]."""
    pos = F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits), reduction="none")
    neg = F.binary_cross_entropy_with_logits(logits, torch.zeros_like(logits), reduction="none")
    return (pos @ targets.T + neg @ (1 - targets).T) / logits.shape[-1]


# -- matching ----------------------------------------------------------------------------------


class HungarianMatcher(nn.Module):
    """Optimal one-to-one assignment of queries to targets (DETR's HungarianMatcher).

    Cost = w_class * (-p_object) + w_bbox * L1(cxcywh) + w_giou * (-GIoU(xyxy))
           + w_mask * BCE(mask logits, binary masks) + w_dice * Dice; solved exactly with
    scipy.optimize.linear_sum_assignment (the original used a greedy matcher).
    """

    def __init__(
        self,
        w_class: float = 1.0,
        w_bbox: float = 5.0,
        w_giou: float = 2.0,
        w_mask: float = 5.0,
        w_dice: float = 5.0,
    ) -> None:
        super().__init__()
        self.w = (w_class, w_bbox, w_giou, w_mask, w_dice)

    def cost_matrix(
        self, logits: torch.Tensor, boxes: torch.Tensor, masks: torch.Tensor, target: dict
    ) -> torch.Tensor:
        """One image: logits [Q, 2], boxes [Q, 4], mask logits [Q, H, W] -> cost [Q, n]."""
        w_class, w_bbox, w_giou, w_mask, w_dice = self.w
        t_masks = target["masks"].float().flatten(1)  # (n, H*W), binary, used as is
        m = masks.flatten(1)  # (Q, H*W) logits
        cost = -w_class * logits.softmax(-1)[:, :1]  # (Q, 1) broadcast over targets
        cost = cost + w_bbox * torch.cdist(boxes, target["boxes"], p=1)
        cost = cost - w_giou * generalized_box_iou(
            box_cxcywh_to_xyxy(boxes), box_cxcywh_to_xyxy(target["boxes"])
        )
        cost = cost + w_mask * batch_bce_cost(m, t_masks) + w_dice * batch_dice_cost(m, t_masks)
        return cost

    @torch.no_grad()
    def forward(self, outputs: dict, targets: list[dict]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Match each image's queries to its targets.

        Args:
            outputs: pred_logits [B, Q, 2], pred_boxes [B, Q, 4], pred_masks [B, Q, H, W]
                (mask logits already at the targets' resolution).
            targets: B dicts with masks [n_b, H, W] and boxes [n_b, 4].

        Returns:
            B pairs (query indices, target indices), int64 arrays of length min(Q, n_b).
        """
        out = []
        for b, target in enumerate(targets):
            if len(target["boxes"]) == 0:
                out.append((np.zeros(0, np.int64), np.zeros(0, np.int64)))
                continue
            c = self.cost_matrix(
                outputs["pred_logits"][b].float(),
                outputs["pred_boxes"][b].float(),
                outputs["pred_masks"][b].float(),
                target,
            )
            rows, cols = linear_sum_assignment(c.cpu().numpy())
            out.append((rows.astype(np.int64), cols.astype(np.int64)))
        return out


# -- losses ------------------------------------------------------------------------------------


class SetCriterion(nn.Module):
    """DETR set loss: Hungarian matching, then presence CE (no-object weight ``eos_coef``),
    L1 + GIoU on matched boxes, BCE (or focal) + Dice on matched masks.

    Args:
        matcher: a HungarianMatcher.
        eos_coef: weight of the no-object class in the CE (DETR: 0.1), so the many unmatched
            queries learn "absent" without swamping the matched ones.
        weights: loss weights, keys ce, bbox, giou, mask, dice.
        mask_loss: "bce" or "focal".

    forward returns a dict of scalar losses plus "loss" (weighted sum); mask terms are
    normalised by the number of target objects in the batch (at least 1).
    """

    def __init__(
        self,
        matcher: HungarianMatcher,
        eos_coef: float = 0.1,
        weights: dict[str, float] | None = None,
        mask_loss: str = "bce",
    ) -> None:
        super().__init__()
        if mask_loss not in ("bce", "focal"):
            raise ValueError(f"mask_loss must be 'bce' or 'focal', got {mask_loss!r}")
        self.matcher = matcher
        self.weights = weights or {"ce": 1.0, "bbox": 5.0, "giou": 2.0, "mask": 5.0, "dice": 5.0}
        self.mask_loss = mask_loss
        self.register_buffer("class_weight", torch.tensor([1.0, eos_coef]))

    def forward(self, outputs: dict, targets: list[dict]) -> dict[str, torch.Tensor]:
        logits = outputs["pred_logits"].float()  # (B, Q, 2)
        B, Q, _ = logits.shape
        size = targets[0]["masks"].shape[-2:]
        pred_masks = F.interpolate(
            outputs["pred_masks"].float(), size=size, mode="bilinear", align_corners=False
        )  # (B, Q, H, W)
        matched = {**outputs, "pred_masks": pred_masks}
        indices = self.matcher(matched, targets)
        num = max(sum(len(t["boxes"]) for t in targets), 1)

        target_classes = torch.ones(B, Q, dtype=torch.long, device=logits.device)  # 1 = no object
        for b, (qi, _) in enumerate(indices):
            target_classes[b, torch.as_tensor(qi, device=logits.device)] = 0
        loss_ce = F.cross_entropy(logits.transpose(1, 2), target_classes, self.class_weight)

        bi = torch.cat(
            [torch.full((len(qi),), b, dtype=torch.long) for b, (qi, _) in enumerate(indices)]
        )
        qi = torch.cat([torch.as_tensor(q) for q, _ in indices]).long()
        src_boxes = outputs["pred_boxes"].float()[bi, qi]  # (n, 4)
        tgt_boxes = torch.cat(
            [t["boxes"][torch.as_tensor(ti)] for t, (_, ti) in zip(targets, indices, strict=False)]
        )
        src_masks = pred_masks[bi, qi].flatten(1)  # (n, H*W) logits
        tgt_masks = torch.cat(
            [t["masks"][torch.as_tensor(ti)] for t, (_, ti) in zip(targets, indices, strict=False)]
        )
        tgt_masks = tgt_masks.float().flatten(1)  # binary, never through a sigmoid
        if len(src_boxes):
            loss_bbox = F.l1_loss(src_boxes, tgt_boxes, reduction="none").sum() / num
            giou = torch.diag(
                generalized_box_iou(box_cxcywh_to_xyxy(src_boxes), box_cxcywh_to_xyxy(tgt_boxes))
            )
            loss_giou = (1 - giou).sum() / num
            if self.mask_loss == "bce":
                per_mask = F.binary_cross_entropy_with_logits(
                    src_masks, tgt_masks, reduction="none"
                ).mean(-1)
            else:
                per_mask = sigmoid_focal_loss(src_masks, tgt_masks)
            loss_mask = per_mask.sum() / num
            loss_dice = dice_loss(src_masks, tgt_masks).sum() / num
        else:
            zero = logits.sum() * 0
            loss_bbox = loss_giou = loss_mask = loss_dice = zero
        losses = {
            "loss_ce": loss_ce,
            "loss_bbox": loss_bbox,
            "loss_giou": loss_giou,
            "loss_mask": loss_mask,
            "loss_dice": loss_dice,
        }
        w = self.weights
        losses["loss"] = (
            w["ce"] * loss_ce
            + w["bbox"] * loss_bbox
            + w["giou"] * loss_giou
            + w["mask"] * loss_mask
            + w["dice"] * loss_dice
        )
        return losses


# -- evaluation on binary masks (numpy) --------------------------------------------------------


def mask_iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU of bool masks a [N, H, W], b [M, H, W] -> [N, M]; empty vs empty = 1."""
    a2 = a.reshape(len(a), -1).astype(np.float64)
    b2 = b.reshape(len(b), -1).astype(np.float64)
    inter = a2 @ b2.T
    union = a2.sum(1)[:, None] + b2.sum(1)[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


def seg2bmap(mask: np.ndarray) -> np.ndarray:
    """One-pixel boundary of a bool [H, W] mask, as DAVIS's seg2bmap (same-size case)."""
    m = mask.astype(bool)
    e, s, se = np.zeros_like(m), np.zeros_like(m), np.zeros_like(m)
    e[:, :-1], s[:-1, :], se[:-1, :-1] = m[:, 1:], m[1:, :], m[1:, 1:]
    b = (m ^ e) | (m ^ s) | (m ^ se)
    b[-1, :] = m[-1, :] ^ e[-1, :]
    b[:, -1] = m[:, -1] ^ s[:, -1]
    b[-1, -1] = False
    return b


def boundary_f_measure(pred: np.ndarray, gt: np.ndarray, bound_th: float = 0.008) -> float:
    """DAVIS boundary F (db_eval_boundary): boundaries matched within a tolerance.

    Args:
        pred, gt: bool [H, W] masks.
        bound_th: tolerance; < 1 is a fraction of the image diagonal (DAVIS/SA-V: 0.008),
            >= 1 is pixels.

    Returns:
        F in [0, 1]; both empty = 1; one empty = 0.
    """
    r = bound_th if bound_th >= 1 else math.ceil(bound_th * math.hypot(*gt.shape))
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    disk = xx**2 + yy**2 <= r**2
    fg, gb = seg2bmap(pred), seg2bmap(gt)
    n_fg, n_gt = fg.sum(), gb.sum()
    if n_fg == 0 and n_gt == 0:
        return 1.0
    if n_fg == 0 or n_gt == 0:
        return 0.0
    precision = (fg & binary_dilation(gb, disk)).sum() / n_fg
    recall = (gb & binary_dilation(fg, disk)).sum() / n_gt
    return 0.0 if precision + recall == 0 else float(2 * precision * recall / (precision + recall))


def score_frame(pred: np.ndarray, gt: np.ndarray, iou_threshold: float = 0.5) -> dict:
    """Per-frame scores of predicted object masks against ground-truth object masks.

    Predictions and ground truth are matched one-to-one by maximum total IoU (Hungarian).
    Every matched pair, unmatched ground truth (vs an empty mask) and unmatched prediction
    (vs an empty ground truth) is one item scoring J (IoU) and F (boundary F); a frame with no
    ground truth and no prediction is a correct rejection and scores 1.

    Args:
        pred: bool [P, H, W] masks of the queries predicted present (P may be 0).
        gt: bool [G, H, W] non-empty ground-truth masks (G may be 0: a negative frame).
        iou_threshold: a matched pair with IoU >= this is a true positive detection.

    Returns:
        dict: iou (sum of matched IoU / max(P, G)), j, f, jf (means over items),
        tp, fp, fn (detections at iou_threshold), n_gt, n_pred.
    """
    P, G = len(pred), len(gt)
    if P == 0 and G == 0:
        return {
            "iou": 1.0,
            "j": 1.0,
            "f": 1.0,
            "jf": 1.0,
            "tp": 0,
            "fp": 0,
            "fn": 0,
            "n_gt": 0,
            "n_pred": 0,
        }
    ious = mask_iou_matrix(pred, gt) if P and G else np.zeros((P, G))
    rows, cols = linear_sum_assignment(-ious) if P and G else (np.zeros(0, int), np.zeros(0, int))
    js = [ious[r, c] for r, c in zip(rows, cols, strict=False)]
    fs = [boundary_f_measure(pred[r], gt[c]) for r, c in zip(rows, cols, strict=False)]
    n_unmatched = (P - len(rows)) + (G - len(rows))
    js += [0.0] * n_unmatched
    fs += [0.0] * n_unmatched
    tp = int(sum(ious[r, c] >= iou_threshold for r, c in zip(rows, cols, strict=False)))
    j, f = float(np.mean(js)), float(np.mean(fs))
    return {
        "iou": float(sum(ious[r, c] for r, c in zip(rows, cols, strict=False)) / max(P, G)),
        "j": j,
        "f": f,
        "jf": (j + f) / 2,
        "tp": tp,
        "fp": P - tp,
        "fn": G - tp,
        "n_gt": G,
        "n_pred": P,
    }
