"""rewardlab.diffusion.load_pipeline: a saved folder loads as the same pipeline class in the asked dtype with
the scheduler swap, options are checked first, and an uncached hub id fails at once offline, in one line."""

from __future__ import annotations

import time

import pytest
import torch

from rewardlab.diffusion import load_pipeline
from rewardlab.errors import UsageError, WeightsNotFoundError


@pytest.fixture(scope="module")
def saved_flux(tmp_path_factory):
    from rewardlab.testing.diffusion import tiny_flux_pipeline

    folder = tmp_path_factory.mktemp("flux")
    tiny_flux_pipeline(folder / "build", seed=0).save_pretrained(folder / "pipe")
    return folder / "pipe"


def test_a_saved_folder_loads_with_its_class_dtype_and_scheduler(saved_flux, tmp_path):
    from diffusers import DDIMScheduler, FluxPipeline

    pipe = load_pipeline(saved_flux, device="cpu", dtype="bf16")
    assert isinstance(pipe, FluxPipeline) and pipe.transformer.dtype == torch.bfloat16
    assert load_pipeline(saved_flux, device="cpu").transformer.dtype == torch.float32  # CPU default
    from rewardlab.testing.diffusion import tiny_pipeline

    tiny_pipeline(tmp_path / "build", seed=0).save_pretrained(tmp_path / "sd")
    assert isinstance(load_pipeline(tmp_path / "sd", device="cpu", scheduler="ddim").scheduler, DDIMScheduler)


def test_bad_options_are_refused_before_loading(saved_flux):
    with pytest.raises(UsageError, match="unknown scheduler 'euler'"):
        load_pipeline(saved_flux, scheduler="euler")
    with pytest.raises(UsageError, match="unknown dtype 'int8'"):
        load_pipeline(saved_flux, dtype="int8")


def test_an_uncached_hub_id_fails_fast_offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    started = time.monotonic()
    with pytest.raises(WeightsNotFoundError) as caught:
        load_pipeline("nobody/no-such-pipeline", device="cpu")
    assert time.monotonic() - started < 5
    message = str(caught.value)
    assert message.startswith("diffusers pipeline 'nobody/no-such-pipeline' could not be loaded from the hub cache")
    assert "\n" not in message
