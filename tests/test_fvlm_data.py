"""Captioned-shapes generator, mp4 writer and DINOv2/VAE precompute (tiny encoders, offline)."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from synthvid.captioned_shapes import COLORS, DIRECTIONS, generate_clip, make_split

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_clip_is_deterministic_and_seed_dependent():
    a, b = generate_clip(3, 7), generate_clip(3, 7)
    assert np.array_equal(a.frames, b.frames) and a.caption == b.caption
    assert a.frames.shape == (8, 112, 112, 3) and a.frames.dtype == np.uint8
    assert not np.array_equal(generate_clip(4, 7).frames, a.frames)


@pytest.mark.parametrize("index", range(12))
def test_caption_matches_what_the_pixels_do(index):
    """Track each object's colour in the pixels: its centroid moves as the caption says."""
    clip = generate_clip(0, index, num_frames=8, image_size=112)
    assert clip.caption == " and ".join(o.describe() for o in clip.objects)
    half = 4
    for obj in clip.objects:
        mask = np.all(
            clip.frames == np.array(COLORS[obj.color], dtype=np.uint8), axis=-1
        )  # [T, H, W]
        ys, xs = np.nonzero(mask[0])
        assert len(xs) > 20, "object must be visible"
        cent = np.array(
            [[np.nonzero(m)[1].mean(), np.nonzero(m)[0].mean()] for m in mask]
        )  # [T, 2] (x, y)
        for d, (t0, t1) in zip(obj.directions, ((0, half), (half, 7)), strict=True):
            motion = cent[t1] - cent[t0]
            expect = np.array(DIRECTIONS[d])
            # the other object may occlude a little: require the right sign and dominance
            assert motion @ expect > 0.6 * np.abs(motion).sum(), (obj.describe(), motion)


def test_split_is_seeded_stratified_and_disjoint():
    s1, s2 = make_split(200, seed=1), make_split(200, seed=1)
    assert s1 == s2
    sets = [set(s1[k]) for k in ("train", "val", "test")]
    assert not (sets[0] & sets[1]) and not (sets[0] & sets[2]) and not (sets[1] & sets[2])
    assert sum(map(len, sets)) == 200
    assert make_split(200, seed=2) != s1
    with pytest.raises(ValueError):
        make_split(5, seed=0, fractions=(0.98, 0.01, 0.01))


def test_videos_then_precompute_tiny_resumable(tmp_path):
    writer, pre = load_script("make_captioned_videos"), load_script("precompute_dino")
    videos, feats = tmp_path / "videos set", tmp_path / "feats"
    args = ["--out", str(videos), "--num-samples", "12", "--num-frames", "6", "--image-size", "56"]
    assert writer.main(args) == 0
    lines = [json.loads(x) for x in (videos / "captions.jsonl").read_text().splitlines()]
    assert len(lines) == 12 and all((videos / x["video"]).exists() for x in lines)
    frames = pre.read_frames(videos / lines[0]["video"], 6)
    expected = generate_clip(0, 0, num_frames=6, image_size=56).frames
    assert frames.shape == (6, 56, 56, 3)
    assert np.abs(frames.astype(int) - expected).mean() < 6  # lossy H.264, near the source
    assert writer.main(args) == 0  # idempotent
    assert writer.main(args[:-1] + ["64"]) == 2  # other arguments into the same folder: refused

    run = [
        "--videos",
        str(videos),
        "--out",
        str(feats),
        "--tiny",
        "--image-size",
        "56",
        "--num-frames",
        "6",
        "--batch-frames",
        "24",
        "--threads",
        "1",
    ]
    assert pre.main(run) == 0
    rec = torch.load(feats / "clip_000000.pt", weights_only=True)
    N = pre.num_dino_tokens(56)
    assert N == 1 + 4 * 4 and pre.num_dino_tokens(256) == 325
    assert rec["dino_features"].shape == (6, N, 64) and rec["dino_features"].dtype == torch.bfloat16
    assert rec["latents"].shape == (6, 4, 7, 7) and rec["caption"] == lines[0]["caption"]
    meta = json.loads((feats / "meta.json").read_text())
    assert sum(map(len, meta["split"].values())) == 12 and meta["dino_features_shape"] == [6, N, 64]

    # resumable: finished files are kept, a missing one is re-made with the same encoders
    kept = feats / "clip_000001.pt"
    mtime = kept.stat().st_mtime_ns
    (feats / "clip_000000.pt").unlink()
    assert pre.main(run) == 0
    assert kept.stat().st_mtime_ns == mtime
    again = torch.load(feats / "clip_000000.pt", weights_only=True)
    torch.testing.assert_close(again["dino_features"], rec["dino_features"])
    torch.testing.assert_close(again["latents"], rec["latents"])


def test_encoders_load_offline_with_from_pretrained(tmp_path):
    """The tiny encoders go through save_pretrained -> from_pretrained(local_files_only=True)."""
    pre = load_script("precompute_dino")
    dino, vae, names = pre.load_encoders(True, 56, tmp_path, pre.DINO_NAME, pre.VAE_NAME, False)
    assert type(dino).__name__ == "Dinov2Model" and type(vae).__name__ == "AutoencoderKL"
    assert all(Path(n).is_relative_to(tmp_path) for n in names)
    ref_dino, ref_vae = pre.build_tiny_dino(56), pre.build_tiny_vae(56)
    frames = torch.from_numpy(generate_clip(0, 1, num_frames=4, image_size=56).frames)
    f1, l1 = pre.encode_frames(frames, dino, vae, 56, torch.device("cpu"))
    f2, l2 = pre.encode_frames(frames, ref_dino.eval(), ref_vae.eval(), 56, torch.device("cpu"))
    torch.testing.assert_close(f1, f2)
    torch.testing.assert_close(l1, l2)
    assert vae.config.scaling_factor == pytest.approx(0.18215)


def test_precompute_bad_input_is_one_error_line(tmp_path, capsys):
    pre = load_script("precompute_dino")
    assert (
        pre.main(["--videos", str(tmp_path / "nope"), "--out", str(tmp_path / "o"), "--tiny"]) == 2
    )
    err = capsys.readouterr().err
    assert err.startswith("error:") and "captions.jsonl" in err
    assert not os.path.exists(tmp_path / "o")
