"""``Preprocess(fit="pad")``: longer side scaled to the size, black borders centring the shorter one (open_clip's
ResizeMaxSize, HPS v2's scoring transform). Geometry checked against hand computations."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

import rewardlab
from rewardlab.registry import Preprocess, get_spec
from rewardlab.scoring.preprocess import (
    image_to_unit_tensor,
    pad_box,
    padded_size,
    pil_to_array,
    tensor_preprocess,
)
from rewardlab.testing import make_random_checkpoint

RED = (255, 0, 0)


@pytest.mark.parametrize(("size", "expected_size", "expected_box"), [
    ((301, 173), (224, 129), (0, 47, 0, 48)),  # 173 * 224 / 301 = 128.74 -> 129; 95 rows of padding: 47 + 48
    ((97, 333), (65, 224), (79, 0, 80, 0)),  # 97 * 224 / 333 = 65.25 -> 65; 159 columns: 79 + 80
    ((448, 448), (224, 224), (0, 0, 0, 0)),
    ((224, 100), (224, 100), (0, 62, 0, 62)),
])
def test_pad_geometry(size, expected_size, expected_box):
    assert padded_size(*size, 224) == expected_size
    assert pad_box(*expected_size, 224) == expected_box


@pytest.mark.parametrize("backend", ["pil", "tensor"])
def test_wide_image_is_centred_between_black_bands(backend):
    spec = Preprocess(size=32, backend=backend, fit="pad", mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    image = Image.new("RGB", (100, 50), RED)  # -> 32 x 16, padded 8 rows above and 8 below
    pixels = image_to_unit_tensor(image, spec)
    assert pixels.shape == (3, 32, 32)
    assert pixels[:, :8].abs().max() == 0 and pixels[:, 24:].abs().max() == 0
    assert torch.allclose(pixels[:, 8:24], torch.tensor([1.0, 0.0, 0.0]).view(3, 1, 1).expand(3, 16, 32), atol=1e-6)
    if backend == "pil":
        array = pil_to_array(image, spec)
        assert array.dtype == np.uint8 and array[:8].max() == 0 and array[8:24].reshape(-1, 3).tolist() == [list(RED)] * 512


def test_tensor_pad_keeps_gradients_and_matches_the_score_path():
    spec = Preprocess(size=32, backend="tensor", fit="pad")
    image = Image.fromarray((np.random.RandomState(0).rand(20, 45, 3) * 255).astype(np.uint8))
    unit = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float().div(255).requires_grad_(True)
    out = tensor_preprocess(unit, spec)
    expected = image_to_unit_tensor(image, spec)
    mean, std = torch.tensor(spec.mean).view(3, 1, 1), torch.tensor(spec.std).view(3, 1, 1)
    assert torch.allclose(out[0], (expected - mean) / std, atol=1e-6)
    out.sum().backward()
    assert unit.grad is not None and unit.grad.abs().sum() > 0


def test_hpsv2_spec_pads_and_the_setting_survives_a_checkpoint(tmp_path):
    spec = get_spec("hpsv2.1")
    assert spec.preprocess.fit == "pad" and spec.preprocess.backend == "tensor"
    assert "padded to square" in spec.to_row()["preprocess"]
    assert get_spec("pickscore-v1").preprocess.fit == "crop"
    tiny = {"vision": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "patch_size": 8, "image_size": 32, "hidden_act": "gelu"},
            "text": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                     "hidden_act": "gelu"}, "projection_dim": 16}
    small = replace(spec, name="tiny-hps", preprocess=replace(spec.preprocess, size=32), options={**spec.options, "clip": tiny})
    path = make_random_checkpoint(tmp_path / "tiny-hps.safetensors", small, seed=1)
    scorer = rewardlab.load(path)
    assert scorer.spec.preprocess == small.preprocess
    wide = Image.fromarray((np.random.RandomState(1).rand(30, 90, 3) * 255).astype(np.uint8))
    unit = torch.from_numpy(np.array(wide)).permute(2, 0, 1)[None].float() / 255
    assert scorer.score("a cat", [wide]) == pytest.approx([scorer.score_tensors(unit, "a cat").item()], abs=1e-6)
