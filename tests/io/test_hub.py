"""Weights resolution through the real huggingface_hub cache, offline."""

from __future__ import annotations

import importlib

import pytest

from rewardlab.io.hub import WeightsNotFoundError, resolve_weights
from rewardlab.registry import get_spec


@pytest.fixture()
def offline_hub(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants

    importlib.reload(huggingface_hub.constants)
    yield tmp_path / "hf" / "hub"
    monkeypatch.undo()
    importlib.reload(huggingface_hub.constants)


def test_missing_weights_error_says_what_where_and_how(offline_hub):
    with pytest.raises(WeightsNotFoundError) as info:
        resolve_weights("cyclereward-t2i", get_spec("cyclereward-t2i").sources)
    message = str(info.value)
    assert "model.safetensors from hub repo carolineec/CycleReward-T2I" in message
    assert "CycleReward-T2I.pth from hub repo carolineec/CycleReward-T2I" in message
    assert "releases/download/v1.0.0/CycleReward-T2I.pth" in message
    assert "checkpoint=PATH" in message and "--checkpoint PATH" in message


def test_weights_found_in_hub_cache_offline(offline_hub):
    snapshot = offline_hub / "models--THUDM--ImageReward" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "ImageReward.pt").write_bytes(b"weights")
    (offline_hub / "models--THUDM--ImageReward" / "refs").mkdir()
    (offline_hub / "models--THUDM--ImageReward" / "refs" / "main").write_text("abc123")
    path = resolve_weights("imagereward-v1.0", get_spec("imagereward-v1.0").sources)
    assert path.endswith("snapshots/abc123/ImageReward.pt")


def test_url_source_uses_cached_file_offline(offline_hub):
    cached = offline_hub / "rewardlab-url" / "CycleReward-I2T.pth"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"weights")
    assert resolve_weights("cyclereward-i2t", get_spec("cyclereward-i2t").sources) == str(cached)


def test_explicit_checkpoint_must_exist(tmp_path):
    with pytest.raises(WeightsNotFoundError, match="nothing.pt"):
        resolve_weights("imagereward-v1.0", get_spec("imagereward-v1.0").sources, tmp_path / "nothing.pt")
