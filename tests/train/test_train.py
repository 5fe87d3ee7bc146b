"""Training: a synthetic task learned to ≥ 90 %, bit-exact resume, the freeze recipe, loss, data and init."""

from __future__ import annotations

import json
import math
import subprocess

import pytest
import torch
from click.testing import CliRunner
from support import REPO, official_python

import rewardlab
from rewardlab.cli import cli
from rewardlab.data import Group
from rewardlab.io.atomic import current_version
from rewardlab.io.checkpoint import CheckpointError, read_state_dict
from rewardlab.models import get_architecture
from rewardlab.registry import get_spec
from rewardlab.scoring.loader import spec_to_json
from rewardlab.testing import randomize, tiny_blip_spec
from rewardlab.testing.shapes import make_pairs
from rewardlab.train import Pair, bradley_terry_loss, pairs_from_groups, split_by_group
from rewardlab.train.init import load_initial_weights
from rewardlab.train.trainer import PairBatcher, TrainConfig, Trainer


def _config(tmp_path, **overrides) -> TrainConfig:
    values = {"spec_json": spec_to_json(tiny_blip_spec("gelu")), "output_dir": str(tmp_path / "run"), "freeze_ratio": 0.0,
              "lr": 1e-3, "batch_size": 32, "max_steps": 300, "warmup_steps": 10, "eval_every": 100, "save_every": 0,
              "seed": 0, "cpu": True}
    values.update(overrides)
    return TrainConfig(**values)


def test_synthetic_task_learned_and_checkpoint_loads_back(tmp_path):
    train, valid = make_pairs(2000, seed=1), make_pairs(300, seed=2)
    trainer = Trainer(_config(tmp_path), [train], valid)
    summary = trainer.train()
    assert summary["valid_accuracy"] >= 0.90, summary
    state = read_state_dict(tmp_path / "run" / "final.safetensors")
    assert not any(k.startswith("module.") for k in state)
    scorer = rewardlab.load(tmp_path / "run" / "final.safetensors")
    good = scorer.score([p.preferred_prompt for p in valid], [p.preferred_image for p in valid])
    bad = scorer.score([p.rejected_prompt for p in valid], [p.rejected_image for p in valid])
    accuracy = sum(g > b for g, b in zip(good, bad, strict=True)) / len(valid)
    assert accuracy == pytest.approx(summary["valid_accuracy"], abs=1e-9)
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "valid_accuracy" in r and "loss" in r] == [100, 200, 300]
    assert log[0]["event"] == "start" and log[0]["trainable"] == summary["trainable"]


class Crash(RuntimeError):
    pass


def test_kill_and_resume_gives_identical_weights(tmp_path):
    train = make_pairs(96, seed=3)
    settings = {"batch_size": 8, "max_steps": 8, "save_every": 2, "eval_every": 0, "grad_accum": 2}
    Trainer(_config(tmp_path / "a", **settings), [train]).train()
    reference = read_state_dict(tmp_path / "a" / "run" / "final.safetensors")

    def crash_at_five(step, trainer):
        if step == 5:
            raise Crash

    with pytest.raises(Crash):
        Trainer(_config(tmp_path / "b", **settings), [train], step_callback=crash_at_five).train()
    assert json.loads((current_version(tmp_path / "b" / "run" / "state") / "trainer_state.json").read_text())["step"] == 4
    Trainer(_config(tmp_path / "b", **settings), [train]).train()
    resumed = read_state_dict(tmp_path / "b" / "run" / "final.safetensors")
    assert reference.keys() == resumed.keys()
    assert all(torch.equal(reference[k], resumed[k]) for k in reference)
    log = (tmp_path / "b" / "run" / "log.jsonl").read_text()
    assert '"event": "resumed", "step": 4' in log


def _ours_frozen(ratio: float) -> tuple[set[str], set[str]]:
    spec = get_spec("cyclereward-combo")
    with torch.device("meta"):
        model = get_architecture(spec.architecture).build(spec)
    model.freeze(ratio)
    names = dict(model.named_parameters())
    return {n for n, p in names.items() if p.requires_grad}, {n for n, p in names.items() if not p.requires_grad}


def test_freeze_ratio_exact_parameter_set():
    trainable, frozen = _ours_frozen(0.7)
    text_frozen = {n for n in frozen if n.startswith("blip.text_encoder.")}
    assert "blip.text_encoder.encoder.layer.7.output.LayerNorm.bias" in text_frozen
    assert "blip.text_encoder.encoder.layer.8.attention.self.query.weight" in text_frozen  # the boundary quirk
    assert "blip.text_encoder.encoder.layer.8.attention.self.query.bias" in trainable
    expected_text = 4 + 8 * 26 + 1  # embeddings (word, position, LayerNorm w/b) + 8 layers x 26 tensors + 1
    assert len(text_frozen) == expected_text
    vision_frozen = {n for n in frozen if n.startswith("blip.visual_encoder.")}
    assert "blip.visual_encoder.blocks.16.norm1.weight" in vision_frozen
    assert "blip.visual_encoder.blocks.16.norm1.bias" in trainable
    assert len(vision_frozen) == 4 + 16 * 12 + 1  # cls, pos, patch w/b + 16 blocks x 12 + 1
    assert {n for n in frozen if "_proj" in n} == {"blip.vision_proj.weight", "blip.vision_proj.bias",
                                                  "blip.text_proj.weight", "blip.text_proj.bias"}
    assert all(n in trainable for n in ("mlp.layers.0.weight", "blip.visual_encoder.norm.weight"))


@pytest.mark.parity
def test_freeze_ratio_matches_official_cyclereward(tmp_path):
    script = (
        "import sys, json; sys.path.insert(0, {!r}); import official_ref as o\n"
        "m = o.build('cyclereward')\n"
        "print(json.dumps(sorted(n for n, p in m.named_parameters() if p.requires_grad)))\n"
    ).format(str(REPO / "rewardlab" / "testing" / "reference"))
    out = subprocess.run([official_python(), "-c", script], check=True, capture_output=True, text=True, timeout=600)
    official = set(json.loads(out.stdout.strip().splitlines()[-1]))
    trainable, _ = _ours_frozen(0.7)
    assert trainable == official


def test_bradley_terry_by_hand():
    good, bad = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 0.0])
    softplus = lambda x: math.log1p(math.exp(-x))  # noqa: E731  -log sigmoid(x)
    assert bradley_terry_loss(good, bad).item() == pytest.approx((softplus(1) + softplus(0)) / 2, abs=1e-6)
    assert bradley_terry_loss(good, bad, margin=0.5).item() == pytest.approx((softplus(0.5) + softplus(-0.5)) / 2, abs=1e-6)
    tie = torch.tensor([True, False])
    expected = (0.5 * (softplus(1) + softplus(-1)) + softplus(0)) / 2
    assert bradley_terry_loss(good, bad, tie=tie).item() == pytest.approx(expected, abs=1e-6)


def test_pairs_split_and_mixed_batches():
    group = Group("g", ["p"] * 3, ["a", "b", "c"], [2, 1, 2])
    pairs = pairs_from_groups([group])
    assert [(p.preferred_image, p.rejected_image) for p in pairs] == [("b", "a"), ("b", "c")]
    assert len(pairs_from_groups([group], include_ties=True)) == 3
    many = [Pair(f"g{i % 10}", "p", i, "p", -i) for i in range(50)]
    train, valid = split_by_group(many, 0.2, seed=1)
    assert {p.group_id for p in train}.isdisjoint({p.group_id for p in valid}) and len(valid) == 10
    assert split_by_group(many, 0.2, seed=1) == (train, valid)
    short, long = [Pair("s", "p", i, "p", i) for i in range(4)], [Pair("l", "p", i, "p", i) for i in range(10)]
    batcher = PairBatcher([short, long], batch_size=2, seed=0)
    sources = [batcher.micro_batch(m)[0].group_id for m in range(6)]
    assert sources == ["s", "l", "s", "l", "s", "l"]  # alternating; the short source wraps into a new epoch
    seen = [p.preferred_image for m in (0, 2) for p in batcher.micro_batch(m)]
    assert sorted(seen) == [0, 1, 2, 3]


def test_pair_file_layouts_and_cli(tmp_path):
    train = make_pairs(24, seed=4)
    rows = []
    for n, p in enumerate(train):
        p.preferred_image.save(tmp_path / f"good{n}.png")
        p.rejected_image.save(tmp_path / f"bad{n}.png")
        if n % 2:
            rows.append({"prompt": p.preferred_prompt, "preferred_image": f"good{n}.png", "rejected_image": f"bad{n}.png",
                         "input_id": n})
        else:
            rows.append({"image": f"good{n}.png", "preferred_text": p.preferred_prompt, "rejected_text": "a purple star",
                         "input_id": n})
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = tmp_path / "tiny.yaml"
    config.write_text(f"spec_json: '{spec_to_json(tiny_blip_spec())}'\nfreeze_ratio: 0.5\nbatch_size: 4\nmax_steps: 3\n"
                      "eval_every: 3\nsave_every: 0\nlr: 1.0e-4\ncpu: true\nvalid_fraction: 0.25\n")
    result = CliRunner().invoke(cli, ["train", "-c", str(config), "-d", f"pairs:{tmp_path / 'pairs.jsonl'}",
                                                    "-o", str(tmp_path / "out"), "--set", "seed=3"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "trainable parameters" in result.output
    scorer = rewardlab.load(tmp_path / "out" / "final.safetensors")
    assert scorer.spec.options["head"] == "linear" and len(scorer.score("a red circle", [str(tmp_path / "good0.png")])) == 1
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x", "image_a": "a.png"}\n')
    result = CliRunner().invoke(cli, ["train", "-c", str(config), "-d", f"pairs:{bad}", "-o",
                                                    str(tmp_path / "o2")])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "error: " in result.output and "bad.jsonl line 1: unknown pair layout" in result.output


def test_blip_pretrained_init_drops_only_listed_keys(tmp_path):
    spec = tiny_blip_spec()
    donor = get_architecture("blip-reward").build(spec)
    randomize(donor, 9)
    blip_state = {k.removeprefix("blip."): v for k, v in donor.state_dict().items() if k.startswith("blip.")}
    blip_state["visual_encoder.pos_embed"] = torch.randn(1, 1 + 9, 48)  # a 3x3 grid: interpolated to 4x4
    extras = {"visual_encoder_m.cls_token": torch.zeros(1), "text_decoder.bias": torch.zeros(1),
              "image_queue": torch.zeros(2, 2), "temp": torch.ones(()), "itm_head.weight": torch.zeros(2, 2)}
    torch.save({"model": {**blip_state, **extras}}, tmp_path / "model_large.pth")
    model = get_architecture("blip-reward").build(spec)
    assert "BLIP pretraining" in load_initial_weights(model, str(tmp_path / "model_large.pth"))
    assert torch.equal(model.blip.text_encoder.embeddings.word_embeddings.weight,
                       donor.blip.text_encoder.embeddings.word_embeddings.weight)
    assert model.blip.visual_encoder.pos_embed.shape == (1, 17, 48)
    torch.save({"model": {**blip_state, "surprise.weight": torch.zeros(1)}}, tmp_path / "odd.pth")
    with pytest.raises(CheckpointError, match="unexpected.*surprise.weight"):
        load_initial_weights(get_architecture("blip-reward").build(spec), str(tmp_path / "odd.pth"))


def test_early_stopping_after_patience(tmp_path):
    train, valid = make_pairs(64, seed=5), make_pairs(16, seed=6)
    trainer = Trainer(_config(tmp_path, lr=0.0, batch_size=8, max_steps=10, eval_every=1, early_stopping_patience=2,
                              warmup_steps=0), [train], valid)
    summary = trainer.train()
    assert summary["steps"] == 3 and summary["best_step"] == 1  # lr 0: nothing improves after the first evaluation
    assert '"event": "early_stop", "step": 3' in (tmp_path / "run" / "log.jsonl").read_text()


def test_gradient_checkpointing_gives_the_same_gradients():
    spec = tiny_blip_spec()
    grads = []
    for checkpointing in (False, True):
        model = get_architecture("blip-reward").build(spec)
        randomize(model, 2)
        model.train()
        model.set_grad_checkpointing(checkpointing)
        torch.manual_seed(0)
        text = get_architecture("blip-reward").tokenizer(spec)(["a red circle", "a blue square"])
        model(torch.rand(2, 3, 32, 32), text).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    assert all(torch.allclose(grads[0][n], grads[1][n], atol=1e-6) for n in grads[0])


def test_yaml_numbers_and_no_get_their_declared_types(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("lr: 2e-5\nmixed_precision: no\nbatch_size: '4'\n")
    cfg = TrainConfig.from_yaml(config, ["weight_decay=1e-2", "max_steps=7"])
    assert cfg.lr == 2e-5 and cfg.weight_decay == 0.01 and cfg.mixed_precision == "no"
    assert cfg.batch_size == 4 and cfg.max_steps == 7
    with pytest.raises(ValueError, match="setting lr: 'fast' is not a number"):
        TrainConfig.from_yaml(None, ["lr=fast"])
