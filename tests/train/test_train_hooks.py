"""Architectures own their training hooks: freeze rules (HPS v2, PickScore, ratio, backbone), initial weights,
parameter groups, gradient checkpointing; every registry architecture trains; a tiny CLIP learns the task."""

from __future__ import annotations

import json
import re
import subprocess
from dataclasses import replace

import pytest
import torch
from support import official_python

import rewardlab
from rewardlab.errors import CheckpointError, UsageError
from rewardlab.models import get_architecture
from rewardlab.models.clip import convert_openai_state
from rewardlab.registry import get_spec
from rewardlab.scoring.loader import spec_to_json
from rewardlab.testing import randomize, tiny_blip_spec, tiny_clip_spec
from rewardlab.testing.shapes import make_pairs
from rewardlab.train.cli import recipe_path
from rewardlab.train.trainer import TrainConfig, Trainer


def _tiny_blip_score_spec():
    """The tiny BLIP configuration as a BLIPScore model (which takes no head/mean/std options)."""
    spec = tiny_blip_spec()
    options = {k: v for k, v in spec.options.items() if k in ("vision", "text")}
    return replace(spec, architecture="blip-score", options={**options, "head": "itc"})

def _build(spec, meta: bool = False):
    if meta:
        with torch.device("meta"):
            return get_architecture(spec.architecture).build(spec)
    return get_architecture(spec.architecture).build(spec)


def _trainable(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def _layer(name: str, tower: str) -> int | None:
    match = re.match(rf"clip\.{tower}_model\.encoder\.layers\.(\d+)\.", name)
    return int(match.group(1)) if match else None


# -- HPS v2 and PickScore freeze rules on the real ViT-H-14 shapes (built on the meta device) ------------

@pytest.fixture(scope="module")
def vit_h():
    """PickScore's and HPS v2.1's model (the same ViT-H-14 parameters), built once on the meta device."""
    assert get_spec("pickscore-v1").options["clip"] == get_spec("hpsv2.1").options["clip"]
    return _build(get_spec("hpsv2.1"), meta=True)


@pytest.fixture
def hps_model(vit_h):
    config = TrainConfig.from_yaml(recipe_path("hpsv2"))
    assert config.architecture == "hpsv2.1"
    vit_h.requires_grad_(True)
    vit_h.freeze_layers(**config.freeze_layers)
    return vit_h


def test_hps_recipe_freezes_the_lower_layers_of_both_towers_parameter_by_parameter(hps_model):
    model = hps_model
    names = [n for n, _ in model.named_parameters()]
    expected_frozen = set()
    for name in names:  # the rule written out independently: open_clip lock-image 20 groups, lock-text 11 layers
        vision_layer, text_layer = _layer(name, "vision"), _layer(name, "text")
        stem = name.startswith(("clip.vision_model.embeddings.", "clip.vision_model.pre_layrnorm.",
                                "clip.text_model.embeddings."))
        low_vision = vision_layer is not None and vision_layer < 32 - 19  # 19 blocks unlocked (+ ln_post, proj)
        low_text = text_layer is not None and text_layer < 24 - 11
        if stem or low_vision or low_text:
            expected_frozen.add(name)
    assert set(names) - _trainable(model) == expected_frozen
    assert len(expected_frozen) == (3 + 2 + 13 * 16) + (2 + 13 * 16)  # stems + 13 layers x 16 tensors per tower
    for name in ("clip.vision_model.encoder.layers.12.mlp.fc2.bias", "clip.text_model.encoder.layers.12.layer_norm2.bias",
                 "clip.vision_model.embeddings.class_embedding", "clip.text_model.embeddings.token_embedding.weight"):
        assert name in expected_frozen
    for name in ("clip.vision_model.encoder.layers.13.self_attn.q_proj.weight", "clip.vision_model.post_layernorm.weight",
                 "clip.text_model.encoder.layers.13.mlp.fc1.weight", "clip.text_model.final_layer_norm.bias",
                 "clip.visual_projection.weight", "clip.text_projection.weight", "clip.logit_scale"):
        assert name in _trainable(model)


@pytest.mark.parity
def test_hps_recipe_matches_hpsv2_open_clip_lock_functions(hps_model):
    """HPS v2's own open_clip (from the hpsv2 package) locks ViT-H-14 as its training script does; the
    trainable flags, mapped to our names by the checkpoint converter, equal ours."""
    script = (
        "import sys, json, sysconfig, torch\n"
        "sys.path.insert(0, sysconfig.get_paths()['purelib'] + '/hpsv2')\n"
        "from src.open_clip.factory import create_model\n"
        "with torch.device('meta'):\n"
        "    m = create_model('ViT-H-14', precision='fp32', device='meta')\n"
        "m.lock_image_tower(unlocked_groups=20)\n"
        "m.lock_text_tower(unlocked_layers=11)\n"
        "print(json.dumps({n: p.requires_grad for n, p in m.named_parameters()}))\n"
    )
    out = subprocess.run([official_python(), "-c", script], check=True, capture_output=True, text=True, timeout=600)
    official = json.loads(out.stdout.strip().splitlines()[-1])

    def flag(name: str, trainable: bool) -> torch.Tensor:
        value = float(trainable)
        if "in_proj" in name:
            return torch.full((3,), value)  # split into q, k, v by the converter
        if name in ("visual.proj", "text_projection"):
            return torch.full((1, 1), value)  # transposed by the converter
        return torch.tensor(value)

    mapped = convert_openai_state({n: flag(n, t) for n, t in official.items()})
    official_trainable = {n for n, t in mapped.items() if bool(t.all())}
    model = hps_model
    assert set(mapped) == {n for n, _ in model.named_parameters()}
    assert _trainable(model) == official_trainable


def test_pickscore_recipe_fine_tunes_both_towers_entirely(vit_h):
    config = TrainConfig.from_yaml(recipe_path("pickscore"))
    assert config.freeze_ratio == 0.0 and config.freeze_layers is None and not config.freeze_backbone
    assert config.architecture == "pickscore-v1"
    model = vit_h
    model.requires_grad_(True)
    model.freeze(config.freeze_ratio)
    assert _trainable(model) == {n for n, _ in model.named_parameters()}
    assert config.lr_schedule == "constant" and config.include_ties


# -- freeze hooks on tiny configurations -----------------------------------------------------------------

def test_clip_freeze_ratio_backbone_and_bad_counts():
    model = _build(tiny_clip_spec())
    model.freeze(0.5)  # int(4 * 0.5) = 2 layers and the stem of each tower
    frozen = {n for n, _ in model.named_parameters()} - _trainable(model)
    layers = {(t, _layer(n, t)) for n in frozen for t in ("vision", "text") if _layer(n, t) is not None}
    assert layers == {("vision", 0), ("vision", 1), ("text", 0), ("text", 1)}
    assert "clip.vision_model.pre_layrnorm.weight" in frozen and "clip.text_model.embeddings.position_embedding.weight" in frozen
    backbone = _build(tiny_clip_spec())
    backbone.freeze_backbone()
    assert _trainable(backbone) == {"clip.visual_projection.weight", "clip.text_projection.weight", "clip.logit_scale"}
    aesthetic = _build(tiny_clip_spec("aesthetic"))
    aesthetic.freeze(0.0)  # the prompt is ignored: the text tower and logit scale never train
    assert not any(n.startswith(("clip.text_model.", "clip.text_projection", "clip.logit_scale")) for n in _trainable(aesthetic))
    assert "clip.vision_model.encoder.layers.0.mlp.fc1.weight" in _trainable(aesthetic)
    aesthetic.freeze_backbone()
    assert _trainable(aesthetic) == {n for n, _ in aesthetic.named_parameters() if n.startswith("mlp.")}
    with pytest.raises(UsageError, match="freeze_layers vision=5.*0 to 4"):
        _build(tiny_clip_spec()).freeze_layers(vision=5)
    with pytest.raises(UsageError, match="freeze ratio"):
        _build(tiny_clip_spec()).freeze(1.5)


def test_blip_score_keeps_its_projections_and_drops_unused_cross_attention():
    model = _build(_tiny_blip_score_spec())
    model.freeze(0.0)
    trainable = _trainable(model)
    assert "blip.vision_proj.weight" in trainable and "blip.text_proj.bias" in trainable
    assert not any(".crossattention." in n for n in trainable)
    reward = _build(tiny_blip_spec())
    reward.freeze_backbone()
    assert _trainable(reward) == {n for n, _ in reward.named_parameters() if n.startswith("mlp.")}


def test_param_groups_decay_matrices_only():
    model = _build(tiny_clip_spec())
    model.freeze(0.5)
    decay, plain = model.param_groups(0.35)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.35 and plain["weight_decay"] == 0.0
    assert all(p.ndim >= 2 and p.requires_grad for p in decay["params"])
    assert {names[id(p)] for p in plain["params"]} >= {"clip.logit_scale", "clip.vision_model.post_layernorm.bias"}
    assert len(decay["params"]) + len(plain["params"]) == len(_trainable(model))


def test_clip_gradient_checkpointing_gives_the_same_gradients():
    spec = tiny_clip_spec()
    text = get_architecture("clip").tokenizer(spec)(["a red circle", "a blue square"])
    pixels = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    grads = []
    for checkpointing in (False, True):
        model = _build(spec)
        randomize(model, 2)
        model.train()
        model.set_grad_checkpointing(checkpointing)
        model(pixels, text).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    assert all(torch.allclose(grads[0][n], grads[1][n], atol=1e-6) for n in grads[0])


# -- initial weights -------------------------------------------------------------------------------------

def _openai_layout(model) -> dict[str, torch.Tensor]:
    """A CLIP state dict in OpenAI/open_clip names, built by inverting the converter on ``model``."""
    ours = {k: v.clone() for k, v in model.state_dict().items() if not k.endswith("position_ids")}
    out = {}
    for tower, src in (("vision", "visual."), ("text", "")):
        depth = len(model.towers()[tower].layers)
        for i in range(depth):
            d, s = f"clip.{tower}_model.encoder.layers.{i}.", f"{src}transformer.resblocks.{i}."
            out[s + "attn.in_proj_weight"] = torch.cat([ours.pop(d + f"self_attn.{x}_proj.weight") for x in "qkv"])
            out[s + "attn.in_proj_bias"] = torch.cat([ours.pop(d + f"self_attn.{x}_proj.bias") for x in "qkv"])
            for a, b in (("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"),
                         ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
                for p in ("weight", "bias"):
                    out[f"{s}{a}.{p}"] = ours.pop(f"{d}{b}.{p}")
    v, t = "clip.vision_model.", "clip.text_model."
    out.update({"visual.class_embedding": ours.pop(v + "embeddings.class_embedding"),
                "visual.conv1.weight": ours.pop(v + "embeddings.patch_embedding.weight"),
                "visual.positional_embedding": ours.pop(v + "embeddings.position_embedding.weight"),
                "visual.ln_pre.weight": ours.pop(v + "pre_layrnorm.weight"), "visual.ln_pre.bias": ours.pop(v + "pre_layrnorm.bias"),
                "visual.ln_post.weight": ours.pop(v + "post_layernorm.weight"),
                "visual.ln_post.bias": ours.pop(v + "post_layernorm.bias"),
                "visual.proj": ours.pop("clip.visual_projection.weight").t().contiguous(),
                "token_embedding.weight": ours.pop(t + "embeddings.token_embedding.weight"),
                "positional_embedding": ours.pop(t + "embeddings.position_embedding.weight"),
                "ln_final.weight": ours.pop(t + "final_layer_norm.weight"), "ln_final.bias": ours.pop(t + "final_layer_norm.bias"),
                "text_projection": ours.pop("clip.text_projection.weight").t().contiguous(),
                "logit_scale": ours.pop("clip.logit_scale")})
    return out, ours


def test_clip_init_from_openai_and_transformers_checkpoints(tmp_path):
    donor = _build(tiny_clip_spec())
    randomize(donor, 4)
    openai, rest = _openai_layout(donor)
    assert not rest  # every tensor of the model has an OpenAI name
    torch.save({"state_dict": openai}, tmp_path / "open_clip.pt")
    transformers_layout = {k.removeprefix("clip."): v for k, v in donor.state_dict().items()}
    torch.save(transformers_layout, tmp_path / "hf.bin")
    for file in ("open_clip.pt", "hf.bin"):
        model = _build(tiny_clip_spec())
        assert "CLIP checkpoint" in model.init_from_pretrained(tmp_path / file)
        assert all(torch.equal(model.state_dict()[k], donor.state_dict()[k]) for k in donor.state_dict())
    aesthetic = _build(tiny_clip_spec("aesthetic"))
    head = {k: v.clone() for k, v in aesthetic.state_dict().items() if k.startswith("mlp.")}
    assert "head tensors freshly initialised" in aesthetic.init_from_pretrained(tmp_path / "open_clip.pt")
    assert all(torch.equal(aesthetic.state_dict()[k], v) for k, v in head.items())
    torch.save({**openai, "visual.surprise": torch.zeros(1)}, tmp_path / "odd.pt")
    with pytest.raises(CheckpointError, match="unexpected keys: clip.visual.surprise"):
        _build(tiny_clip_spec()).init_from_pretrained(tmp_path / "odd.pt")
    missing = dict(openai)
    del missing["ln_final.bias"]
    torch.save(missing, tmp_path / "short.pt")
    with pytest.raises(CheckpointError, match="short.pt: OpenAI/open_clip-layout CLIP checkpoint lacks 'ln_final.bias'"):
        _build(tiny_clip_spec()).init_from_pretrained(tmp_path / "short.pt")
    del transformers_layout["text_model.final_layer_norm.bias"]
    torch.save(transformers_layout, tmp_path / "hf_short.bin")
    with pytest.raises(CheckpointError, match="missing keys: clip.text_model.final_layer_norm.bias"):
        _build(tiny_clip_spec()).init_from_pretrained(tmp_path / "hf_short.bin")


def test_blip_score_init_from_salesforce_layout(tmp_path):
    spec = _tiny_blip_score_spec()
    donor = _build(spec)
    randomize(donor, 3)
    state = {k.removeprefix("blip."): v for k, v in donor.state_dict().items()}
    torch.save({"model": {**state, "text_decoder.bias": torch.zeros(1), "temp": torch.ones(())}}, tmp_path / "m.pth")
    model = _build(spec)
    assert model.init_from_pretrained(tmp_path / "m.pth") == f"BLIP pretraining checkpoint {tmp_path / 'm.pth'}"
    assert all(torch.equal(model.state_dict()[k], v) for k, v in donor.state_dict().items())


# -- every architecture trains through the same loop -------------------------------------------------------

TINY_SPECS = {
    "blip-reward": tiny_blip_spec("gelu"),
    "blip-score": replace(_tiny_blip_score_spec(), name="tiny-blip-score"),
    "clip-cosine (CLIPScore, HPS v2.1)": tiny_clip_spec("cosine"),
    "clip-logit (PickScore)": tiny_clip_spec("logit"),
    "clip-aesthetic": tiny_clip_spec("aesthetic"),
}


@pytest.mark.parametrize("kind", list(TINY_SPECS))
def test_every_architecture_trains_only_its_unfrozen_parameters(tmp_path, kind):
    spec = TINY_SPECS[kind]
    config = TrainConfig(spec_json=spec_to_json(spec), output_dir=str(tmp_path / "run"), freeze_layers={"vision": 1, "text": 1},
                         lr=1e-3, batch_size=4, max_steps=2, eval_every=0, save_every=0, seed=0, cpu=True, workers=1)
    trainer = Trainer(config, [make_pairs(8, seed=7)])
    model = trainer.reward_model
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    trainable = _trainable(model)
    trainer.train()
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and changed <= trainable  # frozen weights are bit-identical, trained ones moved
    bottom = [p for tower in model.towers().values() for p in tower.layers[0].parameters()]
    assert bottom and not any(p.requires_grad for p in bottom)  # freeze_layers 1/1: the bottom layers stayed put
    reloaded = rewardlab.load(tmp_path / "run" / "final.safetensors")
    assert reloaded.spec.options == spec.options and torch.equal(
        reloaded.model.state_dict()[sorted(changed)[0]], after[sorted(changed)[0]])


def test_tiny_clip_learns_the_synthetic_preference_task(tmp_path):
    """Same loop as the BLIP test: a 4+4-layer CLIP (cosine output, trained on exp(logit_scale)·cos) reaches
    >= 90 % held-out pairwise accuracy; the saved checkpoint scores the same through the Scorer."""
    train, valid = make_pairs(1200, seed=1), make_pairs(300, seed=2)
    config = TrainConfig(spec_json=spec_to_json(tiny_clip_spec()), output_dir=str(tmp_path / "run"), freeze_ratio=0.0,
                         lr=1e-3, batch_size=16, max_steps=80, warmup_steps=10, eval_every=40, save_every=0, seed=0,
                         cpu=True, workers=1)
    summary = Trainer(config, [train], valid).train()
    assert summary["valid_accuracy"] >= 0.90, summary
    scorer = rewardlab.load(tmp_path / "run" / "final.safetensors")
    good = scorer.score([p.preferred_prompt for p in valid], [p.preferred_image for p in valid])
    bad = scorer.score([p.rejected_prompt for p in valid], [p.rejected_image for p in valid])
    accuracy = sum(g > b for g, b in zip(good, bad, strict=True)) / len(valid)
    assert accuracy == pytest.approx(summary["valid_accuracy"], abs=1e-9)
