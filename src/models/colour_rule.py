"""A segmenter with no learning: plane background, residual threshold, colour-linked components.

The trivial baseline of the video-distillation job. The synthetic segmentation videos
(synthvid/segmentation.py) draw flat-coloured shapes over a background that is a LINEAR colour
ramp in (x, y), so per frame and channel the background is a plane: fit it robustly, call a pixel
foreground when its residual exceeds ``residual_k`` robust noise standard deviations, and join
4-neighbouring foreground pixels whose colours differ by less than ``colour_tol`` into one
instance (connected components of that graph, scipy.sparse.csgraph); drop instances smaller than
``min_area_px``. On noisy (degraded) frames a box blur of radius ``blur_px`` comes first and the
colour tolerance grows with the residual noise. The
few thresholds are chosen on TRAIN frames (scripts/distill_baselines.py), never on held-out ones.

Shape legend: H, W frame size in pixels; P predicted instances.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.ndimage import uniform_filter
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components


@dataclass(frozen=True)
class ColourRuleConfig:
    """Thresholds of the rule (colours on a 0-1 scale).

    The defaults of residual_k, colour_tol and blur_px are the values that
    ``scripts/distill_baselines.py --data-dir data/segvid --context-frames 4`` chose on the 72
    train videos of the default synthetic set (its grid search); the rest were fixed by hand.
    """

    residual_k: float = 3.0  # foreground: residual > residual_k x robust sigma of the residual
    colour_tol: float = 0.1  # max colour distance (L2 over RGB) between linked neighbours
    min_area_px: int = 12  # smaller instances are dropped
    blur_px: int = 2  # box-filter radius applied to noisy frames (0 = never)
    noisy_sigma: float = 0.05  # a frame whose robust residual sigma exceeds this is "noisy"
    tol_sigma_k: float = 1.0  # the colour tolerance grows by this x the (blurred) residual sigma
    plane_iters: int = 3  # robust refits of the background plane


def fit_background_plane(img: np.ndarray, iters: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Robust least-squares plane a + b x + c y per channel.

    Each refit uses only the pixels whose residual norm is within 2.5 robust sigmas (median
    absolute deviation x 1.4826) of the previous fit, so objects stop pulling the plane.

    Args:
        img: float [H, W, 3] in [0, 1].
        iters: number of fits (>= 1).

    Returns:
        (background float [H, W, 3], residual norm float [H, W]).
    """
    H, W, _ = img.shape
    yy, xx = np.mgrid[0:H, 0:W]
    A = np.stack([np.ones(H * W), xx.ravel() / W, yy.ravel() / H], 1)  # (HW, 3)
    Y = img.reshape(-1, 3)
    keep = np.ones(H * W, bool)
    for _ in range(max(1, iters)):
        coef, *_ = np.linalg.lstsq(A[keep], Y[keep], rcond=None)  # (3, 3)
        res = np.linalg.norm(Y - A @ coef, axis=1)  # (HW,)
        sigma = 1.4826 * np.median(np.abs(res - np.median(res))) + 1e-6
        keep = res < np.median(res) + 2.5 * sigma
        if keep.sum() < 3:
            break
    return (A @ coef).reshape(H, W, 3), res.reshape(H, W)


def segment_frame(frame: np.ndarray, cfg: ColourRuleConfig = ColourRuleConfig()) -> np.ndarray:
    """Instance masks of one frame by the colour rule.

    Args:
        frame: uint8 [H, W, 3] RGB.
        cfg: thresholds.

    Returns:
        bool [P, H, W], non-overlapping instance masks (P may be 0), largest first.
    """
    img = frame.astype(np.float64) / 255.0
    H, W, _ = img.shape
    _, res = fit_background_plane(img, cfg.plane_iters)
    sigma = 1.4826 * np.median(np.abs(res - np.median(res))) + 1e-6
    if cfg.blur_px > 0 and sigma > cfg.noisy_sigma:  # degraded frame: smooth, then refit
        size = (2 * cfg.blur_px + 1, 2 * cfg.blur_px + 1, 1)
        img = uniform_filter(img, size=size, mode="nearest")
        _, res = fit_background_plane(img, cfg.plane_iters)
        sigma = 1.4826 * np.median(np.abs(res - np.median(res))) + 1e-6
    fg = res > np.median(res) + cfg.residual_k * sigma  # (H, W)
    tol = cfg.colour_tol + cfg.tol_sigma_k * sigma
    if not fg.any():
        return np.zeros((0, H, W), bool)
    idx = np.arange(H * W).reshape(H, W)
    src, dst = [], []
    for a, b, ia, ib in (
        (img[:, :-1], img[:, 1:], idx[:, :-1], idx[:, 1:]),  # right neighbours
        (img[:-1], img[1:], idx[:-1], idx[1:]),  # down neighbours
    ):
        fa = fg.ravel()[ia]
        fb = fg.ravel()[ib]
        link = fa & fb & (np.linalg.norm(a - b, axis=-1) < tol)
        src.append(ia[link])
        dst.append(ib[link])
    s, d = np.concatenate(src), np.concatenate(dst)
    graph = coo_matrix((np.ones(len(s)), (s, d)), shape=(H * W, H * W))
    _, labels = connected_components(graph, directed=False)
    labels = np.where(fg.ravel(), labels, -1).reshape(H, W)
    ids, counts = np.unique(labels[labels >= 0], return_counts=True)
    order = np.argsort(-counts)
    masks = [labels == ids[i] for i in order if counts[i] >= cfg.min_area_px]
    return np.stack(masks) if masks else np.zeros((0, H, W), bool)
