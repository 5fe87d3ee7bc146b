"""Batching, prompts, ranking and error handling of Scorer, on a tiny random model."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

import rewardlab
from rewardlab.scoring.scorer import ranks_from_scores, resolve_dtype


def test_batch_size_does_not_change_scores(tiny_scorer, image_dir):
    images = sorted(str(p) for p in image_dir.glob("*.png"))
    one = tiny_scorer.score("a red cube", images, batch_size=1)
    many = tiny_scorer.score("a red cube", images, batch_size=3)
    assert np.allclose(one, many, atol=1e-5)
    assert np.std(one) > 1e-3


def test_per_image_prompts_equal_separate_calls(tiny_scorer, image_dir):
    images = sorted(str(p) for p in image_dir.glob("*.png"))[:3]
    prompts = ["a red cube", "two dogs playing in the snow at night", "x"]
    paired = tiny_scorer.score(prompts, images, batch_size=3)
    separate = [tiny_scorer.score(p, [i])[0] for p, i in zip(prompts, images, strict=True)]
    assert np.allclose(paired, separate, atol=1e-5)
    with pytest.raises(ValueError, match="2 prompts for 3 images"):
        tiny_scorer.score(prompts[:2], images)
    with pytest.raises(rewardlab.UsageError, match="prompt #1 is int"):
        tiny_scorer.score(["ok", 5, "ok"], images)


def test_bad_image_never_shifts_or_reuses_others(tiny_scorer, image_dir):
    images = sorted(str(p) for p in image_dir.glob("*.png"))
    clean = tiny_scorer.score("a cat", images)
    with_bad = images[:2] + [str(image_dir / "missing.png")] + images[2:]
    result = tiny_scorer.score_detailed("a cat", with_bad, batch_size=2)
    assert list(result.errors) == [2] and "missing.png: file not found" in result.errors[2]
    assert math.isnan(result.scores[2])
    assert np.allclose(result.scores[:2] + result.scores[3:], clean, atol=1e-5)
    with pytest.raises(rewardlab.ImageLoadError, match="missing.png: file not found"):
        tiny_scorer.score("a cat", with_bad)


def test_rank_convention_and_ties():
    assert ranks_from_scores([0.1, 0.9, 0.5]) == ([3, 1, 2], [1, 2, 0])
    assert ranks_from_scores([0.5, 0.5, float("nan"), 1.0]) == ([2, 3, 4, 1], [3, 0, 1, 2])


def test_rank_matches_scores(tiny_scorer, image_dir):
    images = sorted(str(p) for p in image_dir.glob("*.png"))
    ranking = tiny_scorer.rank("a cat", images)
    assert ranking.scores == pytest.approx(tiny_scorer.score("a cat", images), abs=1e-6)
    assert [ranking.scores[i] for i in ranking.order] == sorted(ranking.scores, reverse=True)
    assert sorted(ranking.ranks) == list(range(1, 6))


def test_accepts_pil_and_arrays(tiny_scorer, image_dir):
    path = str(image_dir / "img0.png")
    pil = Image.open(path)
    array = np.asarray(pil)
    scores = tiny_scorer.score("a cat", [path, pil, array])
    assert scores[0] == pytest.approx(scores[1], abs=1e-6) == pytest.approx(scores[2], abs=1e-6)
    assert tiny_scorer.score("a cat", path) == pytest.approx([scores[0]], abs=1e-6)


def test_score_tensors_matches_score_without_resize_and_has_gradients(tiny_scorer, image_dir):
    path = image_dir / "img4.png"  # 32x32: no resize on either path
    array = np.asarray(Image.open(path))
    pixels = (torch.from_numpy(array.copy()).permute(2, 0, 1)[None].float() / 255).requires_grad_(True)
    value = tiny_scorer.score_tensors(pixels, "a cat")
    assert value.item() == pytest.approx(tiny_scorer.score("a cat", [str(path)])[0], abs=1e-5)
    value.sum().backward()
    assert pixels.grad.abs().sum() > 0


def test_dtype_resolution(monkeypatch):
    import warnings

    from rewardlab.scoring import scorer as scorer_module

    cpu = torch.device("cpu")
    assert resolve_dtype(None, cpu) == torch.float32
    monkeypatch.setattr(scorer_module, "cpu_has_fast_bf16", lambda: True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_dtype("bf16", cpu) == torch.bfloat16
    monkeypatch.setattr(scorer_module, "cpu_has_fast_bf16", lambda: False)
    with pytest.warns(UserWarning, match="neither AMX nor AVX512-BF16"):
        assert resolve_dtype("bfloat16", cpu) == torch.bfloat16
    assert resolve_dtype(torch.float16, cpu) == torch.float16
    with pytest.raises(ValueError, match="unknown dtype 'int8'"):
        resolve_dtype("int8", cpu)


def test_bf16_tiny_close_to_fp32(tiny_checkpoint, image_dir):
    images = sorted(str(p) for p in image_dir.glob("*.png"))
    fp32 = rewardlab.load(tiny_checkpoint).score("a cat", images)
    bf16 = rewardlab.load(tiny_checkpoint, dtype="bf16").score("a cat", images)
    assert np.abs(np.array(fp32) - np.array(bf16)).max() < 0.05


def test_unknown_model_lists_registry():
    with pytest.raises(KeyError, match="imagereward-v1.0"):
        rewardlab.load("no-such-model")
    assert {"imagereward-v1.0", "cyclereward-combo", "cyclereward-i2t", "cyclereward-t2i"} <= set(rewardlab.list_models())
