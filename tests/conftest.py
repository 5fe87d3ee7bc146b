"""Shared fixtures: paths to real data, tiny random checkpoints, the official packages' venv."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from support import EXAMPLE_PROMPT, REPO, SHARED, example_images, official_python  # noqa: F401


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> str:
    from rewardlab.testing import make_random_checkpoint

    return make_random_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.safetensors", seed=0)


@pytest.fixture(scope="session")
def tiny_scorer(tiny_checkpoint):
    import rewardlab

    return rewardlab.load(tiny_checkpoint)


@pytest.fixture()
def image_dir(tmp_path) -> Path:
    """Five small RGB PNGs of different sizes with distinct content."""
    rng = np.random.RandomState(0)
    for i, (w, h) in enumerate([(40, 60), (64, 32), (33, 33), (90, 45), (32, 32)]):
        array = (rng.rand(h, w, 3) * 255).astype(np.uint8)
        Image.fromarray(array).save(tmp_path / f"img{i}.png")
    return tmp_path
