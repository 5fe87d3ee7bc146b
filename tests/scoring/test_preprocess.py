"""Resize/crop geometry (torchvision's rules), normalisation, and the differentiable tensor path."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from rewardlab.registry import CLIP_MEAN, CLIP_STD, Preprocess
from rewardlab.scoring.preprocess import (
    arrays_to_tensor,
    crop_box,
    pil_to_array,
    resized_size,
    tensor_preprocess,
)


def test_resized_size_truncates_long_side():
    assert resized_size(640, 480, 224) == (298, 224)  # int(224 * 640 / 480) = int(298.67)
    assert resized_size(97, 333, 224) == (224, 768)  # int(224 * 333 / 97) = int(768.99)
    assert resized_size(224, 500, 224) == (224, 500)  # short side already right: untouched


def test_crop_box_rounds_half_to_even():
    assert crop_box(298, 224, 224) == (37, 0)
    assert crop_box(225, 225, 224) == (0, 0)  # round(0.5) == 0
    assert crop_box(227, 227, 224) == (2, 2)  # round(1.5) == 2


def test_normalisation_by_hand():
    spec = Preprocess(size=2)
    array = np.zeros((2, 2, 3), dtype=np.uint8)
    array[..., 1] = 255
    out = arrays_to_tensor([array], spec, torch.device("cpu"))
    assert out.shape == (1, 3, 2, 2)
    assert torch.allclose(out[0, :, 0, 0], torch.tensor([
        (0 - CLIP_MEAN[0]) / CLIP_STD[0], (1 - CLIP_MEAN[1]) / CLIP_STD[1], (0 - CLIP_MEAN[2]) / CLIP_STD[2]]))


def test_tensor_path_equals_pil_path_without_resize():
    rng = np.random.RandomState(0)
    array = (rng.rand(32, 40, 3) * 255).astype(np.uint8)
    spec = Preprocess(size=32)
    pil = arrays_to_tensor([pil_to_array(Image.fromarray(array), spec)], spec, torch.device("cpu"))
    tensor = tensor_preprocess(torch.from_numpy(array).permute(2, 0, 1)[None].float() / 255, spec)
    assert torch.equal(pil, tensor)


def test_tensor_resize_close_to_pil_bicubic():
    rng = np.random.RandomState(1)
    base = (rng.rand(24, 30, 3) * 255).astype(np.uint8)
    array = np.array(Image.fromarray(base).resize((300, 240), Image.BICUBIC))  # smooth content
    spec = Preprocess(size=224)
    pil = arrays_to_tensor([pil_to_array(Image.fromarray(array), spec)], spec, torch.device("cpu"))
    tensor = tensor_preprocess(torch.from_numpy(array).permute(2, 0, 1)[None].float() / 255, spec)
    assert pil.shape == tensor.shape == (1, 3, 224, 224)
    # both are antialiased bicubic (a=-0.5 vs -0.75 kernels differ slightly): mean error well under 1/255
    assert (pil - tensor).abs().mean() * CLIP_STD[0] < 2 / 255


def test_tensor_path_is_differentiable():
    x = torch.rand(2, 3, 50, 70, requires_grad=True)
    tensor_preprocess(x, Preprocess(size=16)).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
