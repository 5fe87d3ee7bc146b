"""Strict checkpoint loading: every key accounted for, DDP prefixes, formats, architecture detection."""

from __future__ import annotations

import pickle

import pytest
import torch

import rewardlab
from rewardlab.io.checkpoint import CheckpointError, load_strict, read_state_dict
from rewardlab.models import get_architecture
from rewardlab.scoring.loader import save_checkpoint
from rewardlab.testing import randomize, tiny_blip_spec


@pytest.fixture(scope="module")
def tiny_model():
    spec = tiny_blip_spec("gelu")
    model = get_architecture("blip-reward").build(spec)
    randomize(model, 3)
    return spec, model


def test_missing_unexpected_and_misshaped_keys_are_named(tiny_model, tmp_path):
    spec, model = tiny_model
    state = dict(model.state_dict())
    del state["mlp.layers.8.bias"]
    state["blip.extra_head.weight"] = torch.zeros(2)
    state["mlp.layers.0.weight"] = torch.zeros(3, 3)
    fresh = get_architecture("blip-reward").build(spec)
    with pytest.raises(CheckpointError) as info:
        load_strict(fresh, state, "my.ckpt")
    message = str(info.value)
    assert "my.ckpt" in message
    assert "missing keys: mlp.layers.8.bias" in message
    assert "unexpected keys: blip.extra_head.weight" in message
    assert "mlp.layers.0.weight (checkpoint (3, 3), model (1024, 32))" in message


def test_ddp_prefix_wrapper_and_position_ids(tiny_model, tmp_path):
    spec, model = tiny_model
    state = {f"module.{k}": v for k, v in model.state_dict().items()}
    state["module.blip.text_encoder.embeddings.position_ids"] = torch.arange(64)[None]  # official buffer
    torch.save({"model": state, "epoch": 3}, tmp_path / "ddp.pth")
    loaded = read_state_dict(tmp_path / "ddp.pth")
    assert not any(k.startswith("module.") for k in loaded)
    fresh = get_architecture("blip-reward").build(spec)
    load_strict(fresh, loaded, "ddp.pth", ignore=("position_ids",))
    assert torch.equal(fresh.mlp.layers[0].weight, model.mlp.layers[0].weight)


def test_pickled_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    with open(tmp_path / "evil.pt", "wb") as handle:
        pickle.dump({"w": Evil()}, handle)
    with pytest.raises(CheckpointError, match="evil.pt"):
        read_state_dict(tmp_path / "evil.pt")
    (tmp_path / "junk.safetensors").write_bytes(b"0123456789")
    with pytest.raises(CheckpointError, match="junk.safetensors"):
        read_state_dict(tmp_path / "junk.safetensors")
    with pytest.raises(CheckpointError, match="not found"):
        read_state_dict(tmp_path / "absent.pt")


def test_safetensors_roundtrip_scores_identically(tiny_model, tmp_path):
    spec, model = tiny_model
    save_checkpoint(model, spec, tmp_path / "m.safetensors")
    scorer = rewardlab.load(tmp_path / "m.safetensors")
    assert scorer.spec.options == spec.options
    pixels = torch.rand(2, 3, 32, 32)
    expected = model.eval()(scorer_input(scorer, pixels), scorer.tokenizer(["a", "b"]))
    assert torch.allclose(scorer.score_tensors(pixels, ["a", "b"]), expected, atol=1e-6)


def scorer_input(scorer, pixels):
    from rewardlab.scoring.preprocess import tensor_preprocess

    return tensor_preprocess(pixels, scorer.spec.preprocess)


def test_pt_file_detected_by_head_keys(tiny_model, tmp_path):
    spec, model = tiny_model
    torch.save(model.state_dict(), tmp_path / "plain.pt")
    with pytest.raises(CheckpointError, match="size mismatch|does not match"):
        rewardlab.load(tmp_path / "plain.pt")  # a gelu head -> CycleReward full size; tiny shapes differ
    torch.save({"foo.weight": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="cannot tell which model"):
        rewardlab.load(tmp_path / "other.pt")
