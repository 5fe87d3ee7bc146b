"""The shared scoring core: collate, image features reused across texts, batched forms, threads, ensembles."""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

import rewardlab
from rewardlab.errors import NonFiniteError, UsageError
from rewardlab.scoring.ensemble import RewardEnsemble, average_ranks, combine, load_calibration, parse_reward

CAPTIONS = ["a red circle", "a blue square on grass", "x", "two dogs", "a red circle", "night sky with stars"]


def _tiny_clip_spec():
    from rewardlab.registry import ModelSpec, Preprocess

    tower = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
    return ModelSpec(name="tiny-clip", architecture="clip", sources=(), preprocess=Preprocess(size=32), max_tokens=77,
                     options={"clip": {"vision": {**tower, "patch_size": 8, "image_size": 32}, "text": dict(tower),
                                       "projection_dim": 16}, "output": "logit"})


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    from rewardlab.testing import make_random_checkpoint

    return rewardlab.load(make_random_checkpoint(tmp_path_factory.mktemp("clip") / "clip.safetensors",
                                                 _tiny_clip_spec(), seed=3))


@pytest.mark.parametrize("which", ["blip", "clip"])
def test_score_matrix_equals_separate_scores(which, tiny_scorer, tiny_clip, image_dir):
    scorer = tiny_scorer if which == "blip" else tiny_clip
    images = sorted(str(p) for p in image_dir.glob("*.png"))[:3]
    matrix = scorer.score_matrix(images, CAPTIONS, batch_size=2)
    for i, image in enumerate(images):
        expected = scorer.score(CAPTIONS, [image] * len(CAPTIONS))
        assert np.allclose(matrix[i], expected, atol=1e-5)
    assert scorer.score_texts(images[1], CAPTIONS) == pytest.approx(matrix[1], abs=1e-6)


def test_vision_tower_runs_once_per_image(tiny_scorer, image_dir, monkeypatch):
    calls = []
    original = tiny_scorer.model.encode_images
    monkeypatch.setattr(tiny_scorer.model, "encode_images", lambda pixels: calls.append(len(pixels)) or original(pixels))
    tiny_scorer.score_texts(str(image_dir / "img0.png"), CAPTIONS * 3)
    assert calls == [1]
    calls.clear()
    # repeated paths in one batch are decoded and encoded once
    tiny_scorer.score(CAPTIONS, [str(image_dir / "img0.png")] * len(CAPTIONS))
    assert calls == [1]


def test_rank_groups_and_score_pairs_match_single_calls(tiny_scorer, image_dir):
    images = sorted(str(p) for p in image_dir.glob("*.png"))
    rankings = tiny_scorer.rank_groups([("a cat", images[:3]), ("a dog", images[2:]), ("empty", [])])
    assert rankings[0].scores == pytest.approx(tiny_scorer.score("a cat", images[:3]), abs=1e-6)
    assert rankings[1].ranks == tiny_scorer.rank("a dog", images[2:]).ranks and rankings[2].ranks == []
    a, b = tiny_scorer.score_pairs(["p", "q"], images[:2], images[2:4])
    assert a.scores == pytest.approx(tiny_scorer.score(["p", "q"], images[:2]), abs=1e-5)
    assert b.scores == pytest.approx(tiny_scorer.score(["p", "q"], images[2:4]), abs=1e-5)


def test_any_iterable_of_images_and_validated_options(tiny_scorer, image_dir):
    images = sorted(str(p) for p in image_dir.glob("*.png"))
    assert tiny_scorer.score("x", (p for p in images)) == pytest.approx(tiny_scorer.score("x", images), abs=1e-6)
    with pytest.raises(UsageError, match="errors must be"):
        tiny_scorer.score("x", images, errors="Raise")
    for bad in (0, -1, 1.5, True):
        with pytest.raises(UsageError, match="batch_size"):
            tiny_scorer.score("x", images, batch_size=bad)
    with pytest.raises(TypeError):
        tiny_scorer.score("x", images, 4)  # options are keyword-only


def test_score_tensors_checks_range_and_accepts_any_float_dtype(tiny_scorer):
    pixels = torch.rand(2, 3, 40, 48, generator=torch.Generator().manual_seed(0))
    reference = tiny_scorer.score_tensors(pixels, "a cat")
    for dtype, tol in ((torch.float64, 1e-5), (torch.float16, 2e-2), (torch.bfloat16, 5e-2)):
        assert torch.allclose(tiny_scorer.score_tensors(pixels.to(dtype), "a cat"), reference, atol=tol)
    with pytest.raises(UsageError, match="divide 0-255 values by 255"):
        tiny_scorer.score_tensors(pixels * 255, "a cat")
    with pytest.raises(UsageError, match=r"\(x \+ 1\) / 2"):
        tiny_scorer.score_tensors(pixels * 2 - 1, "a cat")
    with pytest.raises(UsageError, match="float tensor"):
        tiny_scorer.score_tensors((pixels * 255).to(torch.uint8), "a cat")
    with pytest.raises(NonFiniteError):
        tiny_scorer.score_tensors(torch.full_like(pixels, float("nan")), "a cat")


def test_one_scorer_shared_by_threads(tiny_scorer, image_dir):
    images = sorted(str(p) for p in image_dir.glob("*.png"))
    prompts = [f"prompt {i}" for i in range(8)]
    expected = {p: tiny_scorer.score(p, images) for p in prompts}
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda p: (p, tiny_scorer.score(p, images, batch_size=2)), prompts * 3))
    for prompt, scores in results:
        assert scores == pytest.approx(expected[prompt], abs=1e-5)


def test_parse_reward_and_calibration(tmp_path):
    assert parse_reward("pickscore-v1:0.5").weight == 0.5 and parse_reward("pickscore-v1").weight == 1.0
    assert parse_reward("/models/a:b.safetensors").model == "/models/a:b.safetensors"
    with pytest.raises(UsageError):
        parse_reward("x:nan")
    (tmp_path / "cal.json").write_text('{"m": {"mean": 1.0, "std": 2.0, "quantiles": {"0.5": 1.0}}}')
    assert load_calibration(tmp_path / "cal.json")["m"].std == 2.0
    (tmp_path / "bad.json").write_text('{"m": {"mean": 1.0, "std": 0}}')
    with pytest.raises(rewardlab.ConfigError, match="std"):
        load_calibration(tmp_path / "bad.json")


def test_combine_by_hand():
    a, b = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([30.0, 10.0, 20.0])
    assert combine({"a": a, "b": b}, {"a": 1.0, "b": 0.1}).tolist() == pytest.approx([4.0, 3.0, 5.0])
    z = combine({"a": a, "b": b}, normalize="zscore")  # batch statistics: population std
    sa, sb = math.sqrt(2 / 3), math.sqrt(200 / 3)
    assert z.tolist() == pytest.approx([-1 / sa + 10 / sb, 0 - 10 / sb, 1 / sa + 0], abs=1e-6)
    cal = load_calibration({"a": {"mean": 0.0, "std": 2.0}, "b": {"mean": 20.0, "std": 10.0}})
    assert combine({"a": a, "b": b}, normalize="zscore", calibration=cal).tolist() == pytest.approx([1.5, 0.0, 1.5], abs=1e-6)
    assert combine({"a": a, "b": b}, normalize="rank").tolist() == pytest.approx([1.0, 0.5, 1.5])
    assert combine({"a": a, "b": b}, normalize="borda").tolist() == pytest.approx([2.0, 1.0, 3.0])
    assert average_ranks(torch.tensor([5.0, 1.0, 5.0, 0.0])).tolist() == [2.5, 1.0, 2.5, 0.0]
    with pytest.raises(NonFiniteError, match="model b .*items \\[1\\]"):
        combine({"a": a, "b": torch.tensor([1.0, float("nan"), 2.0])})


def test_ensemble_is_differentiable_and_labels_distinct(tiny_checkpoint, tmp_path):
    from rewardlab.testing import make_random_checkpoint

    other = make_random_checkpoint(tmp_path / "other.safetensors", seed=9)
    ensemble = RewardEnsemble.load([tiny_checkpoint, f"{other}:0.5"])
    assert ensemble.labels == ["tiny.safetensors", "other.safetensors"]
    pixels = torch.rand(2, 3, 32, 32, requires_grad=True)
    total, per_model = ensemble.score_tensors(pixels, ["a", "b"])
    assert torch.allclose(total, per_model["tiny.safetensors"] + 0.5 * per_model["other.safetensors"])
    total.sum().backward()
    assert pixels.grad is not None and pixels.grad.abs().sum() > 0
    same = RewardEnsemble([ensemble.scorers[0], ensemble.scorers[0]])
    assert same.labels == ["tiny.safetensors", "tiny.safetensors#2"]


@pytest.mark.slow
def test_compiled_scorer_gives_the_same_scores(tiny_checkpoint, image_dir):
    images = sorted(str(p) for p in image_dir.glob("*.png"))
    eager = rewardlab.load(tiny_checkpoint).score("a cat", images, batch_size=3)
    compiled = rewardlab.load(tiny_checkpoint, compile=True).score("a cat", images, batch_size=3)
    assert compiled == pytest.approx(eager, abs=1e-5)
