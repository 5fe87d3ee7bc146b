"""Numerical parity with the official image-reward 1.5 and cyclereward 0.1.7 packages.

Both sides get the same seeded random weights (full-size ViT-L + BERT-base); the official side runs in
its own venv (.official-venv) through rewardlab/testing/reference/official_ref.py.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from support import EXAMPLE_PROMPT, REPO, example_images, official_python

import rewardlab
from rewardlab.io.images import open_image
from rewardlab.scoring.preprocess import arrays_to_tensor, pil_to_array

pytestmark = pytest.mark.parity

PROMPTS = [
    "A Cat, sitting on the MAT!!! (4k, trending on artstation)",
    "café crème brûlée — naïve déjà vu",
    "一只猫 and a dog 🐶",
    "",
    " ".join(f"word{i}" for i in range(60)),  # longer than 35 tokens: truncated
    " ".join(["an extremely detailed landscape"] * 40),  # longer than 128 tokens
]


def _real_photo_paths() -> list[str]:
    paths = []
    try:
        import skimage

        data = Path(skimage.__file__).parent / "data"
        paths += [str(data / name) for name in ("astronaut.png", "chelsea.png", "camera.png") if (data / name).exists()]
    except ImportError:
        pass
    try:
        import sklearn

        china = Path(sklearn.__file__).parent / "datasets" / "images" / "china.jpg"
        paths += [str(china)] if china.exists() else []
    except ImportError:
        pass
    return paths


@pytest.fixture(scope="module")
def parity_images(tmp_path_factory) -> list[str]:
    """The 4 real example generations, real photos, and synthetic images of odd sizes and modes."""
    folder = tmp_path_factory.mktemp("parity")
    rng = np.random.RandomState(7)
    synthetic = {
        "odd_rgb.png": Image.fromarray((rng.rand(173, 301, 3) * 255).astype(np.uint8)),
        "tall_gray.png": Image.fromarray((rng.rand(333, 97) * 255).astype(np.uint8), "L"),
        "rgba.png": Image.fromarray((rng.rand(250, 250, 4) * 255).astype(np.uint8), "RGBA"),
        "small_upscaled.png": Image.fromarray((rng.rand(20, 50, 3) * 255).astype(np.uint8)),
        "exact224.jpg": Image.fromarray((rng.rand(224, 224, 3) * 255).astype(np.uint8)),
    }
    for name, image in synthetic.items():
        image.save(folder / name)
    return example_images() + _real_photo_paths() + [str(folder / name) for name in synthetic]


def _official(model: str, images: list[str], folder: Path) -> tuple[dict, str]:
    checkpoint = folder / f"{model}.pt"
    out = folder / f"{model}.json"
    prompts = folder / "prompts.json"
    prompts.write_text(json.dumps(PROMPTS))
    cmd = [official_python(), str(REPO / "rewardlab" / "testing" / "reference" / "official_ref.py"), "--model", model, "--seed", "1234",
           "--checkpoint", str(checkpoint), "--out", str(out), "--prompt", EXAMPLE_PROMPT,
           "--prompts-file", str(prompts), *images]
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=1200)
    return json.loads(out.read_text()), str(checkpoint)


@pytest.fixture(scope="module", params=["imagereward", "cyclereward"])
def official(request, parity_images, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    result, checkpoint = _official(request.param, parity_images, folder)
    registry_name = "imagereward-v1.0" if request.param == "imagereward" else "cyclereward-combo"
    scorer = rewardlab.load(registry_name, checkpoint=checkpoint, dtype="fp32")
    return request.param, result, scorer, checkpoint


def test_scores_match_official(official, parity_images):
    name, ref, scorer, _ = official
    ours = scorer.score(EXAMPLE_PROMPT, parity_images, batch_size=4)
    diff = np.abs(np.array(ours) - np.array(ref["scores"]))
    assert diff.max() <= 1e-4, f"{name}: max |Δ| {diff.max():.2e}"
    assert np.std(ref["scores"]) > 0.05, "random weights must spread the scores or parity proves nothing"
    assert np.argsort(ours).tolist() == np.argsort(ref["scores"]).tolist()


def test_rank_matches_official(official, parity_images):
    name, ref, scorer, _ = official
    if "ranks" not in ref:
        pytest.skip("cyclereward has no rank function")
    ranking = scorer.rank(EXAMPLE_PROMPT, parity_images, batch_size=3)
    assert ranking.ranks == ref["ranks"]
    assert np.allclose(ranking.scores, ref["rank_scores"], atol=1e-4)


def test_prompts_tokenize_and_score_like_official(official, parity_images):
    name, ref, scorer, _ = official
    ours = scorer.score(PROMPTS, [parity_images[0]] * len(PROMPTS), batch_size=8)
    assert np.abs(np.array(ours) - np.array(ref["prompt_scores"])).max() <= 1e-4


def test_preprocessing_pixel_for_pixel(official, parity_images):
    _, ref, scorer, _ = official
    for path, sample in zip(parity_images, ref["pixels"], strict=True):
        ours = arrays_to_tensor([pil_to_array(open_image(path), scorer.spec.preprocess)], scorer.spec.preprocess,
                                torch.device("cpu"))
        assert np.abs(ours.flatten().numpy()[::97] - np.array(sample)).max() <= 1e-6, path


def test_checkpoint_detected_from_keys(official, parity_images):
    name, ref, _, checkpoint = official
    scorer = rewardlab.load(checkpoint)
    assert scorer.spec.options["head"] == ("linear" if name == "imagereward" else "gelu")
    assert abs(scorer.score(EXAMPLE_PROMPT, parity_images[:1])[0] - ref["scores"][0]) <= 1e-4


def test_bf16_close_to_fp32_with_same_ranking(official, parity_images):
    name, ref, _, checkpoint = official
    scorer = rewardlab.load(checkpoint, dtype="bf16")
    ours = np.array(scorer.score(EXAMPLE_PROMPT, parity_images, batch_size=16))
    fp32 = np.array(ref["scores"])
    assert np.abs(ours - fp32).max() <= 0.05, f"{name}: bf16 max |Δ| {np.abs(ours - fp32).max():.3f}"
    examples = slice(0, 4)  # the fixture set whose ranking must not change
    assert np.argsort(-ours[examples]).tolist() == np.argsort(-fp32[examples]).tolist()
