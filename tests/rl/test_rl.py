"""rewardlab.rl: reward functions against the direct Scorer, group advantages against hand computation,
calibration against numpy."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import rewardlab
from rewardlab.cli import cli
from rewardlab.errors import ImageLoadError, UsageError
from rewardlab.rl import MultiReward, group_advantages, group_stats, reward_fn
from rewardlab.scoring.ensemble import RewardEnsemble, load_calibration


@pytest.fixture(scope="module")
def second_scorer(tmp_path_factory):
    from rewardlab.testing import make_random_checkpoint

    path = make_random_checkpoint(tmp_path_factory.mktemp("ckpt2") / "other.safetensors", seed=1)
    return rewardlab.load(path)


def uint8_batch(n=6, seed=0, size=(40, 36)):
    return (np.random.RandomState(seed).rand(n, size[1], size[0], 3) * 255).astype(np.uint8)


PROMPTS = ["a red circle", "a blue square", "a red circle", "green", "a blue square", "a red circle"]


# -- group advantages -----------------------------------------------------------------------------------

def test_group_advantages_flow_grpo_fixture():
    prompts, rewards = list("abacba"), [1, 2, 3, 4, 5, 6]
    expected = [-1.1355, -0.9999, -0.1622, 0.0, 0.9999, 1.2977]
    assert np.round(group_advantages(prompts, rewards), 4).tolist() == expected
    expected_global = [-1.3662, -0.8783, -0.1952, 0.0, 0.8783, 1.5613]
    assert np.round(group_advantages(prompts, rewards, global_std=True), 4).tolist() == expected_global


def test_group_advantages_by_hand():
    # prompt a: rewards 1, 3, 6 -> mean 10/3, population variance ((7/3)^2 + (1/3)^2 + (8/3)^2) / 3 = 38/9
    mean_a, std_a = 10 / 3, math.sqrt(38 / 9)
    adv = group_advantages(list("abacba"), [1, 2, 3, 4, 5, 6], eps=1e-4)
    assert adv[0] == pytest.approx((1 - mean_a) / (std_a + 1e-4), abs=1e-12)
    assert adv[5] == pytest.approx((6 - mean_a) / (std_a + 1e-4), abs=1e-12)
    # b: 2, 5 -> std 1.5; c: single item -> 0 exactly
    assert adv[1] == pytest.approx(-1.5 / 1.5001, abs=1e-12) and adv[3] == 0.0
    # global std: population std of 1..6 = sqrt(35/12)
    adv_g = group_advantages(list("abacba"), [1, 2, 3, 4, 5, 6], global_std=True)
    assert adv_g[1] == pytest.approx(-1.5 / (math.sqrt(35 / 12) + 1e-4), abs=1e-12)
    stats = group_stats(list("abacba"), [1, 2, 3, 4, 5, 6])
    assert stats.zero_std_ratio == pytest.approx(1 / 3) and stats.groups == 3
    assert stats.mean_std == pytest.approx((std_a + 1.5 + 0) / 3)
    assert group_stats(list("aabb"), [1, 1, 2, 3]).zero_std_ratio == 0.5


def test_group_advantages_rejects_bad_input():
    with pytest.raises(rewardlab.NonFiniteError, match="items \\[1\\]"):
        group_advantages(["a", "a"], [1.0, float("nan")])
    with pytest.raises(UsageError, match="3 prompts for 2 rewards"):
        group_advantages(["a", "b", "c"], [1.0, 2.0])
    assert group_advantages(["a", "a"], torch.tensor([2.0, 2.0])).tolist() == [0.0, 0.0]


# -- reward functions -----------------------------------------------------------------------------------

def test_uint8_batch_equals_scorer_score_exactly(tiny_scorer):
    images = uint8_batch()
    fn = reward_fn(tiny_scorer)
    scores, info = fn(images, PROMPTS, {})
    direct = tiny_scorer.score(PROMPTS, list(images))
    assert scores.dtype == np.float64 and scores.tolist() == direct
    assert info[tiny_scorer.label].tolist() == direct
    # a uint8 torch tensor, NCHW or NHWC, and a list of encoded PNGs score the same pixels identically
    assert fn(torch.from_numpy(images), PROMPTS)[0].tolist() == direct
    assert fn(torch.from_numpy(images).permute(0, 3, 1, 2), PROMPTS)[0].tolist() == direct


def test_float_tensor_uses_score_tensors(tiny_scorer):
    pixels = torch.rand(4, 3, 48, 40, generator=torch.Generator().manual_seed(0))
    prompts = PROMPTS[:4]
    scores, _ = reward_fn(tiny_scorer)(pixels, prompts, None)
    with torch.no_grad():
        direct = tiny_scorer.score_tensors(pixels, prompts).double().numpy()
    assert np.array_equal(scores, direct)
    # float numpy NHWC is the same pixels
    assert np.array_equal(reward_fn(tiny_scorer)(pixels.permute(0, 2, 3, 1).numpy(), prompts)[0], direct)
    with pytest.raises(UsageError, match="outside \\[0, 1\\]"):
        reward_fn(tiny_scorer)(pixels * 2 - 1, prompts)


def test_differentiable_reward_reaches_pixels(tiny_scorer, second_scorer):
    pixels = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
    fn = reward_fn([tiny_scorer, second_scorer], weights=[1.0, 0.5], differentiable=True)
    total, info = fn(pixels, PROMPTS[:3])
    assert total.requires_grad
    total.sum().backward()
    assert pixels.grad is not None and float(pixels.grad.abs().sum()) > 0
    expected = info[tiny_scorer.label] + 0.5 * info[second_scorer.label]
    assert torch.allclose(total, expected, atol=1e-6)
    plain, _ = reward_fn([tiny_scorer, second_scorer], weights=[1.0, 0.5])(pixels.detach(), PROMPTS[:3])
    assert np.allclose(plain, total.detach().double().numpy(), atol=1e-6)


def test_multireward_schema_weights_and_zscore(tiny_scorer, second_scorer):
    images = uint8_batch(4, seed=3)
    prompts = PROMPTS[:4]
    a = tiny_scorer.score(prompts, list(images))
    b = second_scorer.score(prompts, list(images))
    multi = MultiReward(RewardEnsemble([tiny_scorer, second_scorer], [2.0, -1.0]))
    details, meta = multi(images, prompts, {})
    assert meta == {} and set(details) == {tiny_scorer.label, second_scorer.label, "avg"}
    assert details[tiny_scorer.label] == a and details[second_scorer.label] == b
    assert details["avg"] == pytest.approx([2 * x - y for x, y in zip(a, b, strict=True)], abs=1e-12)

    calibration = {tiny_scorer.label: {"mean": 0.1, "std": 0.5}, second_scorer.label: {"mean": -0.2, "std": 2.0}}
    z = MultiReward([f"{tiny_scorer.checkpoint}:1.0", f"{second_scorer.checkpoint}:3.0"], normalize="zscore",
                    calibration=calibration)
    details, _ = z(images, prompts)
    hand = [(x - 0.1) / 0.5 + 3.0 * (y + 0.2) / 2.0 for x, y in zip(a, b, strict=True)]
    assert details["avg"] == pytest.approx(hand, abs=1e-9)
    ranked, _ = MultiReward([tiny_scorer], normalize="rank")(images, prompts)
    order = np.argsort(a)
    expected = np.empty(4)
    expected[order] = np.arange(4) / 3
    assert ranked["avg"] == pytest.approx(expected.tolist())


def test_unreadable_items_raise_naming_them(tiny_scorer, image_dir):
    items = [str(image_dir / "img0.png"), b"not an image", str(image_dir / "missing.png")]
    with pytest.raises(ImageLoadError, match="2 of 3 images") as info:
        reward_fn(tiny_scorer)(items, "x")
    assert "missing.png" in str(info.value) and "image #1" in str(info.value)
    with pytest.raises(UsageError, match="uint8 images must have shape"):
        reward_fn(tiny_scorer)(np.zeros((2, 8, 8), np.uint8), "x")


# -- calibration ----------------------------------------------------------------------------------------

def test_calibrate_cli_writes_stats_that_zscore_uses(tiny_checkpoint, tmp_path):
    rng = np.random.RandomState(5)
    rows = []
    for i in range(12):
        Image.fromarray((rng.rand(32 + i, 40, 3) * 255).astype(np.uint8)).save(tmp_path / f"{i}.png")
        rows.append({"prompt": PROMPTS[i % len(PROMPTS)], "image": f"{i}.png"})
    data = tmp_path / "set.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "calib.json"
    result = CliRunner().invoke(cli, ["calibrate", "--model", tiny_checkpoint, "--data", str(data), "-o", str(out),
                                      "--no-progress", "--quantiles", "0.1,0.5,0.9"])
    assert result.exit_code == 0, result.output
    scorer = rewardlab.load(tiny_checkpoint)
    scores = np.array(scorer.score([r["prompt"] for r in rows], [str(tmp_path / r["image"]) for r in rows]))
    record = json.loads(out.read_text())[scorer.label]
    assert record["count"] == 12
    assert record["mean"] == pytest.approx(scores.mean(), abs=1e-12)
    assert record["std"] == pytest.approx(scores.std(), abs=1e-12)
    assert record["quantiles"]["0.5"] == pytest.approx(float(np.median(scores)), abs=1e-12)
    assert set(load_calibration(out)) == {scorer.label}
    # z-scored with its own calibration, the same set has mean 0 and std 1
    details, _ = MultiReward([scorer], normalize="zscore", calibration=out)(
        [str(tmp_path / r["image"]) for r in rows], [r["prompt"] for r in rows])
    assert np.mean(details["avg"]) == pytest.approx(0, abs=1e-9) and np.std(details["avg"]) == pytest.approx(1)
    # --merge keeps other models; a bad row is one error naming the file and row
    out.write_text(json.dumps({"other": {"mean": 1, "std": 2}, scorer.label: record}))
    result = CliRunner().invoke(cli, ["calibrate", "-m", tiny_checkpoint, "--data", str(data), "-o", str(out),
                                      "--merge", "--no-progress"])
    assert result.exit_code == 0 and set(json.loads(out.read_text())) == {"other", scorer.label}
    data.write_text('{"prompt": "x"}\n')
    result = CliRunner().invoke(cli, ["calibrate", "-m", tiny_checkpoint, "--data", str(data)])
    assert result.exit_code == 1 and "set.jsonl line 1: no 'image'" in result.output


def test_models_command_shows_score_range():
    result = CliRunner().invoke(cli, ["models", "--format", "jsonl"])
    rows = {json.loads(line)["name"]: json.loads(line) for line in result.output.splitlines()}
    assert "N(0, 1)" in rows["imagereward-v1.0"]["range"]
    assert "100 * cos" in rows["pickscore-v1"]["range"] and "0.25" in rows["hpsv2.1"]["range"]
    assert all(row["range"] != "-" for row in rows.values())
