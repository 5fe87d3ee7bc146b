"""Parity of the comparison models with their reference code, on seeded random weights.

CLIPScore / aesthetic / BLIPScore against ImageReward's baseline classes (OpenAI `clip` package, full
ViT-L/14 and BLIP-L sizes), HPS v2 against the `hpsv2` wheel's open_clip (a small open_clip config),
PickScore against transformers' CLIPModel + CLIPImageProcessor (a small config), the CLIP tokenizer
against `clip.tokenize`.
"""

from __future__ import annotations

import importlib
import json
import subprocess
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from support import REPO, example_images, official_python

import rewardlab
from rewardlab.models.clip import convert_openai_state
from rewardlab.registry import get_spec

pytestmark = pytest.mark.parity
PROMPT = "a painting of an ocean with clouds and birds, day time"


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[str]:
    folder = tmp_path_factory.mktemp("baseline-images")
    rng = np.random.RandomState(3)
    extra = []
    for name, size in (("odd.png", (301, 173)), ("tall.png", (97, 333))):
        Image.fromarray((rng.rand(size[1], size[0], 3) * 255).astype(np.uint8)).save(folder / name)
        extra.append(str(folder / name))
    return example_images() + extra


def _reference(model: str, images: list[str], folder: Path) -> dict:
    subprocess.run([official_python(), str(REPO / "rewardlab" / "testing" / "reference" / "official_baselines.py"), "--model", model, "--seed", "11",
                    "--out-dir", str(folder), "--prompt", PROMPT, *images], check=True, capture_output=True, timeout=900)
    return json.loads((folder / f"{model}.json").read_text())


def _assert_close(ours, ref, tolerance=1e-4):
    ours, ref = np.array(ours), np.array(ref)
    assert np.abs(ours - ref).max() <= tolerance, f"max |Δ| {np.abs(ours - ref).max():.2e}"
    assert np.argsort(ours).tolist() == np.argsort(ref).tolist()


def test_clipscore_and_w25_match_imagereward_baseline(images, tmp_path):
    ref = _reference("clip", images, tmp_path)
    ours = rewardlab.load("clipscore-vit-l-14", checkpoint=tmp_path / "clip.pt").score(PROMPT, images)
    _assert_close(ours, ref["scores"])
    standard = rewardlab.load("clipscore-vit-l-14-w2.5", checkpoint=tmp_path / "clip.pt").score(PROMPT, images)
    assert standard == pytest.approx([2.5 * max(c, 0.0) for c in ref["scores"]], abs=1e-4)


def test_aesthetic_matches_imagereward_baseline_with_backbone_from_hub_cache(images, tmp_path, monkeypatch):
    ref = _reference("aesthetic", images, tmp_path)
    hub = tmp_path / "hf" / "hub" / "models--openai--clip-vit-large-patch14"
    (hub / "snapshots" / "abc").mkdir(parents=True)
    (hub / "refs").mkdir()
    (hub / "refs" / "main").write_text("abc")
    from safetensors.torch import save_file

    hf_layout = convert_openai_state(torch.load(tmp_path / "clip.pt", weights_only=True), prefix="")
    save_file({k: v.contiguous() for k, v in hf_layout.items()}, str(hub / "snapshots" / "abc" / "model.safetensors"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants

    importlib.reload(huggingface_hub.constants)
    try:
        scorer = rewardlab.load("aesthetic-laion-v2", checkpoint=tmp_path / "aesthetic.pth")
        ours = scorer.score(["ignored prompt"] * len(images), images)
    finally:
        monkeypatch.undo()
        importlib.reload(huggingface_hub.constants)
    _assert_close(ours, ref["scores"])
    assert scorer.score("another prompt", images[:1]) == pytest.approx(ours[:1], abs=1e-6)


def test_blipscore_matches_imagereward_baseline(images, tmp_path):
    ref = _reference("blip", images, tmp_path)
    ours = rewardlab.load("blipscore", checkpoint=tmp_path / "model_large.pth").score(PROMPT, images)
    _assert_close(ours, ref["scores"])


TINY_H = {"vision": {"hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 2,
                     "patch_size": 14, "image_size": 224, "hidden_act": "gelu"},
          "text": {"hidden_size": 48, "intermediate_size": 192, "num_hidden_layers": 2, "num_attention_heads": 4,
                   "hidden_act": "gelu"},
          "projection_dim": 32}


def test_hps_matches_open_clip_from_hpsv2(images, tmp_path):
    """hpsv2's scoring transform (light_augmentation=True) pads non-square images to a square: inputs and scores
    must match it, through score() and through the differentiable score_tensors()."""
    from rewardlab.scoring.preprocess import image_to_unit_tensor, normalize

    ref = _reference("hps", images, tmp_path)
    spec = get_spec("hpsv2.1")
    spec = replace(spec, options={**spec.options, "clip": TINY_H})
    scorer = rewardlab.load(spec, checkpoint=tmp_path / "hps.pt")
    for path, ref_pixels in zip(images, ref["pixels"], strict=True):
        pixels = normalize(image_to_unit_tensor(Image.open(path), spec.preprocess)[None], spec.preprocess)
        assert pixels[0, :, ::37, ::37].flatten().tolist() == pytest.approx(ref_pixels, abs=1e-6), path
    ours = scorer.score(PROMPT, images)
    _assert_close(ours, ref["scores"], tolerance=1e-6)  # random-weight cosines are small: hold to float precision
    assert np.ptp(ref["scores"]) > 1e-4
    unit = [torch.from_numpy(np.array(Image.open(p).convert("RGB"))).permute(2, 0, 1)[None].float() / 255 for p in images]
    _assert_close([scorer.score_tensors(x, PROMPT).item() for x in unit], ref["scores"], tolerance=1e-6)
    cropped = rewardlab.load(replace(spec, preprocess=replace(spec.preprocess, fit="crop")), checkpoint=tmp_path / "hps.pt")
    assert np.abs(np.array(cropped.score(PROMPT, images)) - ref["scores"]).max() > 1e-3  # the pad is what matches


def test_pickscore_matches_transformers_clip(images, tmp_path):
    from safetensors.torch import save_file
    from transformers import CLIPImageProcessor, CLIPModel

    from rewardlab.models.clip import clip_config
    from rewardlab.testing import randomize

    spec = get_spec("pickscore-v1")
    spec = replace(spec, options={**spec.options, "clip": TINY_H})
    reference = CLIPModel(clip_config(spec.options)).eval()
    randomize(reference, 5)
    with torch.no_grad():
        reference.logit_scale.fill_(4.6052)
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(tmp_path / "model.safetensors"))
    processor = CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}, resample=3,
                                   do_convert_rgb=True)
    scorer = rewardlab.load(spec, checkpoint=tmp_path / "model.safetensors")
    text = scorer.tokenizer([PROMPT])
    with torch.no_grad():
        pixels = processor(images=[Image.open(p) for p in images], return_tensors="pt")["pixel_values"]
        image = torch.nn.functional.normalize(reference.get_image_features(pixel_values=pixels).pooler_output, dim=-1)
        words = torch.nn.functional.normalize(reference.get_text_features(**text).pooler_output, dim=-1)
        expected = (reference.logit_scale.exp() * image @ words.T).squeeze(-1).tolist()
    _assert_close(scorer.score(PROMPT, images), expected)


def test_clip_tokenizer_matches_openai(tmp_path):
    prompts = ["a photo of a cat", "A Cat, sitting on the MAT!!! (4k)", "café crème brûlée — naïve", "一只猫 and a dog 🐶",
               "", "don't stop 123 4.5%  double  space", " ".join(f"word{i}" for i in range(100)), "it's &amp; <b>html</b>"]
    (tmp_path / "p.json").write_text(json.dumps(prompts))
    script = "import clip, json, sys; print(json.dumps(clip.tokenize(json.load(open(sys.argv[1])), truncate=True).tolist()))"
    out = subprocess.run([official_python(), "-c", script, str(tmp_path / "p.json")], check=True, capture_output=True,
                         text=True, timeout=300)
    reference = json.loads(out.stdout.strip().splitlines()[-1])
    from rewardlab.models.clip import tokenizer

    encoded = tokenizer(get_spec("clipscore-vit-l-14"))(prompts)
    for ids, mask, ref in zip(encoded["input_ids"].tolist(), encoded["attention_mask"].tolist(), reference, strict=True):
        assert ids[: sum(mask)] == ref[: ref.index(49407) + 1]


def test_pickscore_matches_published_recipe_on_transformers_4_46(images, tmp_path):
    """Reference in the official venv (transformers 4.46.3): CLIPModel config written out independently, the slow
    PIL image processor (floored crop offsets: the 302 x 173 image is where that matters) and the fast tokenizer
    (curly apostrophe kept)."""
    rng = np.random.RandomState(4)
    floor = tmp_path / "floor.png"
    Image.fromarray((rng.rand(173, 302, 3) * 255).astype(np.uint8)).save(floor)
    paths, prompt = [str(floor), *images], "a cat’s toy &amp; a ball"
    subprocess.run([official_python(), str(REPO / "rewardlab" / "testing" / "reference" / "official_baselines.py"), "--model", "pickscore", "--seed", "5",
                    "--out-dir", str(tmp_path), "--prompt", prompt, *paths], check=True, capture_output=True, timeout=900)
    ref = json.loads((tmp_path / "pickscore.json").read_text())
    spec = get_spec("pickscore-v1")
    spec = replace(spec, options={**spec.options, "clip": TINY_H})
    scorer = rewardlab.load(spec, checkpoint=tmp_path / "pickscore" / "model.safetensors")
    _assert_close(scorer.score(prompt, paths), ref["scores"], tolerance=1e-4)
    rounded = rewardlab.load(replace(spec, preprocess=replace(spec.preprocess, crop="round")),
                             checkpoint=tmp_path / "pickscore" / "model.safetensors")
    assert abs(rounded.score(prompt, paths[:1])[0] - ref["scores"][0]) > 1e-3  # the floored crop is what matches
