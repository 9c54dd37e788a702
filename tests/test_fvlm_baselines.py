"""scripts/fvlm_baselines.py: token-to-word grouping, the text-prior floors of an eval sample,
and the summary table from a worker-format eval file."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

from models.fvlm_tokenizer import train_caption_tokenizer
from synthvid.captioned_shapes import caption_word_nats, generate_clip

ROOT = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location(
        "fvlm_baselines", ROOT / "scripts/fvlm_baselines.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _samples(n: int = 12) -> list[dict]:
    captions = [generate_clip(1, i, num_frames=4, image_size=48).caption for i in range(n)]
    tok = train_caption_tokenizer(captions)
    out = []
    for i, c in enumerate(captions):
        tokens = tok.convert_ids_to_tokens(tok(c, add_special_tokens=False)["input_ids"]) + ["</s>"]
        # a "model" that pays exactly the text prior, spread over each word's tokens
        words = caption_word_nats(c)
        ce: list[float] = []
        w = -1
        for t in tokens[:-1]:
            if t.startswith("▁"):
                w += 1
                ce.append(words[w][2])
            else:
                ce.append(0.0)
        ce.append(words[-1][2])
        out.append(
            {
                "id": f"clip_{i}",
                "caption": c,
                "n_tokens": len(tokens),
                "tokens": tokens,
                "tok_ce_coarse": ce,
                "tok_ce_fine": [x * 0.5 for x in ce],
            }
        )
    return out


def test_grouping_and_floors_agree_with_the_prior():
    mod = _script()
    for s in _samples():
        words = caption_word_nats(s["caption"])
        grouped = mod.group_tokens(s["tokens"], s["tok_ce_coarse"], len(words) - 1)
        assert grouped == pytest.approx([w[2] for w in words])
        fl = mod.floors(s)
        assert fl["prior"] == pytest.approx(sum(s["tok_ce_coarse"]) / s["n_tokens"])
        assert 0 < fl["prior_known_colour_shape"] < fl["prior"]
    with pytest.raises(ValueError):
        mod.group_tokens(["▁a", "▁red", "</s>"], [0.0, 0.0, 0.0], 3)


def test_summary_table_from_an_eval_file(tmp_path, capsys):
    mod = _script()
    samples = _samples()
    ce = [sum(s["tok_ce_coarse"]) / s["n_tokens"] for s in samples]
    summary = {
        "ce_coarse": sum(ce) / len(ce),
        "ce_fine": sum(ce) / len(ce) / 2,
        "delta_ce": 0.1,
        "delta_ce_ci_low": 0.05,
        "delta_ce_ci_high": 0.15,
        "delta_ce_p_greater": 0.01,
        "ce_shuffled": 2.0,
        "ce_randq": 3.0,
        "ce_blind": 4.0,
        "otherq_gap": 0.01,
        "otherq_gap_ci_low": -0.01,
        "otherq_gap_ci_high": 0.02,
    }
    path = tmp_path / "test_epoch_000001.json"
    path.write_text(
        json.dumps({"split": "test", "epoch": 1, "summary": summary, "samples": samples})
    )
    out = tmp_path / "rows.json"
    assert mod.main([str(path), str(path), "--out", str(out)]) == 0
    (row, _) = json.loads(out.read_text())
    assert row["ce_prior"] == pytest.approx(summary["ce_coarse"])  # the "model" pays the prior
    words = row["words"]
    for t in ("colour", "shape", "direction", "structure"):
        assert words[t]["coarse"] == pytest.approx(words[t]["prior"])
        assert words[t]["fine"] == pytest.approx(words[t]["prior"] / 2)
    assert words["shape"]["prior"] == pytest.approx(math.log(4))
    assert "| mean ± sd over 2 runs |" in capsys.readouterr().out
    assert mod.main([str(tmp_path / "missing.json")]) == 2
