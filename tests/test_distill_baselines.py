"""The non-learned colour rule of the video-distillation job: it recovers the instances of clean
synthetic frames, finds nothing on a bare background, and the baseline script picks its
thresholds on train frames and scores the held-out frames the worker scores."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from models.colour_rule import ColourRuleConfig, fit_background_plane, segment_frame
from models.set_criterion import score_frame
from synthvid.segmentation import VideoSpec, generate_video, split_manifest, write_sav_video

ROOT = Path(__file__).resolve().parents[1]


def _gt(video, t):
    m = video.masks[t]
    return m[m.reshape(len(m), -1).any(-1)]


def test_plane_fit_recovers_a_ramp_and_ignores_an_object():
    yy, xx = np.mgrid[0:32, 0:32] / 32
    img = np.stack([0.2 + 0.5 * xx, 0.7 - 0.3 * yy, 0.4 + 0.1 * xx + 0.2 * yy], -1)
    clean, _ = fit_background_plane(img)
    np.testing.assert_allclose(clean, img, atol=1e-9)
    obj = img.copy()
    obj[10:16, 10:16] = [1.0, 0.0, 0.0]
    bg, res = fit_background_plane(obj, iters=3)
    np.testing.assert_allclose(bg, img, atol=1e-6)  # the robust refit drops the object
    assert res[10:16, 10:16].min() > 0.3 and np.delete(res.ravel(), 0).min() < 1e-6


def test_rule_segments_clean_frames_and_rejects_empty_ones():
    spec = VideoSpec(num_frames=6, degraded_prob=0.0)
    scores = []
    for i in range(4):
        v = generate_video(np.random.default_rng([11, i]), spec, f"v{i}")
        for t in range(v.num_frames):
            pred = segment_frame(v.frames[t])
            assert pred.dtype == bool and pred.shape[1:] == v.frames.shape[1:3]
            assert pred.sum(0).max() <= 1  # instances never overlap
            scores.append(score_frame(pred, _gt(v, t))["jf"])
    assert np.mean(scores) > 0.8
    yy, xx = np.mgrid[0:64, 0:64] / 64
    bare = np.stack([0.3 + 0.4 * xx, 0.5 + 0 * xx, 0.6 - 0.2 * yy], -1)
    noisy = bare + np.random.default_rng(0).normal(0, 0.02, bare.shape)
    assert len(segment_frame((noisy * 255).round().astype(np.uint8))) == 0
    # a threshold above every residual finds nothing even on a frame with objects
    v = generate_video(np.random.default_rng([11, 0]), spec, "v0")
    assert len(segment_frame(v.frames[0], ColourRuleConfig(residual_k=1e6))) == 0


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("seg baseline")
    spec = VideoSpec(num_frames=6, max_objects=2)
    ids = [f"syn_{i:06d}" for i in range(8)]
    for i, vid in enumerate(ids):
        write_sav_video(root, generate_video(np.random.default_rng([7, i]), spec, vid))
    split = split_manifest(ids, seed=0, val_frac=0.25, test_frac=0.25)
    (root / "manifest.json").write_text(json.dumps({"params": {}, "split": split}))
    return root


def _script():
    spec = importlib.util.spec_from_file_location(
        "distill_baselines", ROOT / "scripts/distill_baselines.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_baseline_script_tunes_on_train_and_scores_the_worker_frames(data_dir, tmp_path):
    mod = _script()
    out = tmp_path / "rule.json"
    assert mod.main(["--data-dir", str(data_dir), "--context-frames", "2", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert len(res["grid"]) == int(np.prod([len(v) for v in mod.GRID.values()]))
    best = max(res["grid"], key=lambda r: r["jf"])
    assert all(res["config"][k] == best[k] for k in mod.GRID)
    split = json.loads((data_dir / "manifest.json").read_text())["split"]
    for s in ("val", "test"):
        assert res[s]["n_videos"] == len(split[s]) and res[s]["n_frames"] == 4 * len(split[s])
        lo, hi = res[s]["instance_jf_video_ci"]
        assert 0 <= res[s]["instance_jf"] <= 1 and lo <= hi
    # a "student" that is the rule itself, in the worker's eval format: rule - student = 0
    records = mod.score_rule(
        mod.query_frames([mod.load_sav_video(data_dir, v) for v in split["val"]], 2),
        mod.ColourRuleConfig(**res["config"]),
    )
    same = [
        {k: r[k] for k in ("video", "t", "degraded", "n_gt")}
        | {
            "on": r["rule"],
            "off": r["rule"],
            "shuffled": {k: r["rule"][k] for k in ("iou", "j", "f", "jf")},
        }
        for r in records
    ]
    student = tmp_path / "same.json"
    student.write_text(json.dumps({"split": "val", "samples": same}))
    assert (
        mod.main(
            [
                "--data-dir",
                str(data_dir),
                "--context-frames",
                "2",
                "--student-eval",
                str(student),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    res = json.loads(out.read_text())
    for mode in ("on", "off", "shuffled"):
        assert res[f"student_{mode}"]["rule_minus_student"][0] == pytest.approx(0.0, abs=1e-9)
    assert res["student_off"]["instance_jf"] == pytest.approx(res["val"]["instance_jf"])
    # a student eval over other frames is refused
    bad = tmp_path / "student.json"
    bad.write_text(json.dumps({"split": "val", "samples": [{"video": "nope", "t": 2}]}))
    assert (
        mod.main(["--data-dir", str(data_dir), "--context-frames", "2", "--student-eval", str(bad)])
        == 2
    )


def test_given_thresholds_skip_the_search_and_score_as_searched(data_dir, tmp_path, capsys):
    mod = _script()
    searched, given, default = tmp_path / "s.json", tmp_path / "g.json", tmp_path / "d.json"
    base = ["--data-dir", str(data_dir), "--context-frames", "2"]
    assert mod.main([*base, "--out", str(searched)]) == 0
    chosen = json.loads(searched.read_text())["config"]
    text = ",".join(f"{k}={chosen[k]}" for k in mod.GRID)
    assert mod.main([*base, "--thresholds", text, "--out", str(given)]) == 0
    a, b = json.loads(searched.read_text()), json.loads(given.read_text())
    assert b["grid"] == [] and b["config"] == a["config"]
    for s in ("val", "test"):
        assert b[s] == a[s]
    assert mod.main([*base, "--thresholds", "default", "--out", str(default)]) == 0
    d = json.loads(default.read_text())
    assert d["config"] == {
        k: getattr(mod.ColourRuleConfig(), k) for k in mod.ColourRuleConfig.__dataclass_fields__
    }
    capsys.readouterr()
    for bad in ("residual_k", "sigma=2", "blur_px=2.5", "residual_k=high"):
        assert mod.main([*base, "--thresholds", bad]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: --thresholds") and err.count("\n") == 1, err


def test_harder_data_keeps_the_objects_and_defeats_the_colour_rule():
    easy, hard = (
        VideoSpec(num_frames=6, degraded_prob=0.0),
        VideoSpec(num_frames=6, degraded_prob=0.0, texture=0.3, palette_size=3),
    )
    scores: dict[str, list[float]] = {"easy": [], "hard": []}
    for i in range(4):
        a = generate_video(np.random.default_rng([12, i]), easy, "a")
        b = generate_video(np.random.default_rng([12, i]), hard, "b")
        np.testing.assert_array_equal(a.masks, b.masks)  # same objects, same motion
        assert not np.array_equal(a.frames, b.frames)
        for name, v in (("easy", a), ("hard", b)):
            scores[name] += [
                score_frame(segment_frame(v.frames[t]), _gt(v, t))["jf"] for t in range(6)
            ]
    assert np.mean(scores["hard"]) < np.mean(scores["easy"]) - 0.2
