"""Synthetic SA-V-layout videos, the loader, the split manifest and the feature cache script."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from synthvid.segmentation import (
    VideoSpec,
    generate_video,
    list_sav_videos,
    load_sav_video,
    masks_to_boxes,
    split_manifest,
    write_sav_video,
)

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=120
    )


def test_generated_video_properties():
    spec = VideoSpec(num_frames=24, max_objects=4)
    left_and_came_back = 0
    for i in range(12):
        v = generate_video(np.random.default_rng([7, i]), spec, f"v{i}")
        assert v.frames.shape == (24, 64, 64, 3) and v.frames.dtype == np.uint8
        assert v.masks.dtype == bool and v.masks.shape[0] == 24
        assert (v.masks.sum(1) <= 1).all(), "visible masks of one frame overlap (occlusion broken)"
        present = v.masks.reshape(24, v.masks.shape[1], -1).any(-1)  # [T, K]
        for k in range(present.shape[1]):
            runs = np.flatnonzero(np.diff(present[:, k].astype(int)) == 1)  # absent -> present
            left_and_came_back += int(present[0, k] and len(runs) > 0)
    assert left_and_came_back > 0, "no object ever left the frame and re-entered"


def test_sav_layout_round_trip(tmp_path):
    v = generate_video(np.random.default_rng(3), VideoSpec(num_frames=5), "syn_x")
    write_sav_video(tmp_path, v)
    ann = json.loads((tmp_path / "syn_x_manual.json").read_text())
    assert len(ann["masklet"]) == 5 and ann["masklet_num"] == v.masks.shape[1]
    assert isinstance(ann["masklet"][0][0]["counts"], str)  # COCO RLE as in SA-V
    back = load_sav_video(tmp_path, "syn_x")
    assert np.array_equal(back.frames, v.frames)  # PNG is lossless
    assert np.array_equal(back.masks, v.masks)
    assert np.array_equal(back.degraded, v.degraded)
    assert list_sav_videos(tmp_path) == ["syn_x"]


def test_loader_maps_annotated_frames_with_a_stride(tmp_path):
    """SA-V: masks at 6 fps over 24 fps JPEGs -> annotated frame i is frame file 4 i."""
    v = generate_video(np.random.default_rng(4), VideoSpec(num_frames=3), "sav_1")
    write_sav_video(tmp_path, v)
    d = tmp_path / "JPEGImages_24fps" / "sav_1"
    for f in sorted(d.iterdir(), reverse=True):  # re-number 0,1,2 -> 0,4,8 and pad with others
        i = int(f.stem)
        f.rename(d / f"{4 * i:05d}.png")
    for i in range(12):
        if not (d / f"{i:05d}.png").exists():
            (d / f"{i:05d}.png").write_bytes((d / "00000.png").read_bytes())
    back = load_sav_video(tmp_path, "sav_1")  # stride inferred: 12 files / 3 annotations
    assert np.array_equal(back.frames, v.frames)


def test_masks_to_boxes():
    m = np.zeros((2, 10, 10), bool)
    m[0, 2:5, 3:9] = True
    assert masks_to_boxes(m).tolist() == [[3, 2, 9, 5], [0, 0, 0, 0]]


def test_split_manifest_is_disjoint_and_seeded():
    ids = [f"v{i}" for i in range(50)]
    s = split_manifest(ids, seed=1, val_frac=0.2, test_frac=0.2)
    parts = [set(s[k]) for k in ("train", "val", "test")]
    assert sum(map(len, parts)) == 50 and set().union(*parts) == set(ids)
    assert not (parts[0] & parts[1]) and not (parts[0] & parts[2]) and not (parts[1] & parts[2])
    assert split_manifest(ids, seed=1, val_frac=0.2, test_frac=0.2) == s
    assert split_manifest(ids, seed=2, val_frac=0.2, test_frac=0.2) != s


def test_make_and_cache_scripts(tmp_path):
    data = tmp_path / "data dir"  # a path with a space
    args = [
        "scripts/make_segmentation_videos.py",
        "--out",
        str(data),
        "--num-videos",
        "4",
        "--num-frames",
        "3",
    ]
    r = run(*args)
    assert r.returncode == 0, r.stderr
    assert len(list_sav_videos(data)) == 4
    assert "up to date" in run(*args).stdout  # idempotent setup step
    bad = run("scripts/make_segmentation_videos.py", "--out", str(data), "--num-videos", "1")
    assert bad.returncode == 2 and bad.stderr.startswith("error:") and "Traceback" not in bad.stderr

    feats = data / "features"
    r = run(
        "scripts/cache_context_features.py",
        "--data-dir",
        str(data),
        "--out",
        str(feats),
        "--batch-size",
        "2",
    )
    assert r.returncode == 0, r.stderr
    f = torch.load(feats / "syn_000000.pt", weights_only=True)["features"]
    assert f.shape == (3, 256, 18, 18) and f.dtype == torch.float16 and torch.isfinite(f).all()
    assert (
        run(
            "scripts/cache_context_features.py",
            "--data-dir",
            str(data),
            "--out",
            str(feats),
            "--verify",
        ).returncode
        == 0
    )
    # a corrupted file fails the check and is recomputed (identically: frozen seeded extractor)
    (feats / "syn_000001.pt").write_bytes(b"not a tensor")
    torch.save(
        {"features": torch.full((3, 256, 18, 18), float("nan")).half()}, feats / "syn_000002.pt"
    )
    v = run(
        "scripts/cache_context_features.py",
        "--data-dir",
        str(data),
        "--out",
        str(feats),
        "--verify",
    )
    assert (
        v.returncode == 1
        and "syn_000001: unreadable" in v.stdout
        and "syn_000002: non-finite" in v.stdout
    )
    r = run("scripts/cache_context_features.py", "--data-dir", str(data), "--out", str(feats))
    assert r.returncode == 0 and "cached 2 videos, 2 already cached" in r.stdout
    again = torch.load(feats / "syn_000000.pt", weights_only=True)["features"]
    assert torch.equal(again, f)
    missing = run(
        "scripts/cache_context_features.py",
        "--data-dir",
        str(tmp_path / "nope"),
        "--out",
        str(feats),
    )
    assert missing.returncode == 2 and missing.stderr.startswith("error:")


def test_hf_teacher_extractor_through_from_pretrained(tmp_path):
    """The documented SAM 2 path: a tiny random Sam2VisionModel saved and re-loaded offline."""
    import importlib.util

    from transformers import Sam2HieraDetConfig, Sam2VisionConfig, Sam2VisionModel

    backbone = Sam2HieraDetConfig(
        hidden_size=16,
        num_attention_heads=1,
        image_size=[64, 64],
        blocks_per_stage=[1, 1, 2, 1],
        embed_dim_per_stage=[16, 32, 64, 128],
        num_attention_heads_per_stage=[1, 1, 1, 1],
        window_size_per_stage=[4, 4, 4, 4],
        global_attention_blocks=[3],
        window_positional_embedding_background_size=[2, 2],
    )
    cfg = Sam2VisionConfig(
        backbone_config=backbone,
        backbone_channel_list=[128, 64, 32, 16],
        backbone_feature_sizes=[[16, 16], [8, 8], [4, 4]],
        fpn_hidden_size=256,
    )
    Sam2VisionModel(cfg).save_pretrained(tmp_path / "teacher")
    data = tmp_path / "data"
    write_sav_video(
        data, generate_video(np.random.default_rng(0), VideoSpec(num_frames=3), "syn_a")
    )
    spec = importlib.util.spec_from_file_location(
        "cache_ctx", ROOT / "scripts/cache_context_features.py"
    )
    cache = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cache)
    rc = cache.main(
        [
            "--data-dir",
            str(data),
            "--out",
            str(data / "features"),
            "--extractor",
            "hf",
            "--hf-model",
            str(tmp_path / "teacher"),
            "--hf-class",
            "Sam2VisionModel",
            "--image-size",
            "64",
            "--fpn-level",
            "0",
            "--local-files-only",
            "--threads",
            "1",
        ]
    )
    assert rc == 0
    assert cache.check_cache_file(data / "features" / "syn_a.pt", 3) is None
    info = json.loads((data / "features" / "cache_info.json").read_text())
    assert info["extractor"].startswith("hf:") and "Sam2VisionModel" in info["extractor"]
