"""rewardlab.align on SDXL, SD3 and FLUX: the tiny offline pipelines of rewardlab.testing.diffusion (real
diffusers pipeline classes, random weights, 16x16 px). The sampler and its x0 against the pipeline's own
``__call__``, one ReFL/DRaFT step against the hand formula, AlignProp with full fine-tuning and the
pretraining loss, LoRA through ``load_lora_weights``, and the pretraining loss by hand (flow target
noise - x0 for SD3/FLUX, noise for SDXL)."""

from __future__ import annotations

import pytest
import torch
from support import record_calls

from rewardlab.align.backprop import sample_with_grad_window
from rewardlab.align.data import ImageTextPair, pixels_for_generator
from rewardlab.align.finetune import FinetuneConfig, Finetuner
from rewardlab.align.lora import trainable_state
from rewardlab.align.refl import refl_x0
from rewardlab.diffusion import fresh_scheduler, wrap_pipeline
from rewardlab.scoring.ensemble import RewardEnsemble
from rewardlab.testing.diffusion import tiny_flux_pipeline, tiny_sd3_pipeline, tiny_sdxl_pipeline
from rewardlab.testing.rewards import colour_scorer
from rewardlab.testing.shapes import draw

KINDS = {"sdxl": tiny_sdxl_pipeline, "sd3": tiny_sd3_pipeline, "flux": tiny_flux_pipeline}
PROMPTS = ["a red circle", "a blue square", "a green cat", "a red house"]
CPU = torch.device("cpu")
FLUX_GUIDANCE = 2.0  # not FluxPipeline's default 3.5, so a missing guidance embedding would show


def _pipe(kind: str, folder, seed: int = 0):
    pipe = KINDS[kind](folder, seed)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _pipeline_guidance(kind: str) -> dict:
    """``pipe(...)`` arguments for no classifier-free guidance (FLUX: the embedded guidance instead)."""
    return {"guidance_scale": FLUX_GUIDANCE if kind == "flux" else 1.0}


def _tuner(tmp_path, kind: str, pretrain_pairs: list[ImageTextPair] | None = None, **settings) -> Finetuner:
    values = {"output_dir": str(tmp_path / "run"), "batch_size": 2, "max_steps": 2, "validation_every": 0,
              "validation_count": 2, "validation_guidance_scale": 1.0, "num_steps": 6, "refl_stop_min": 3,
              "refl_stop_max": 5, "save_every": 0, "cpu": True, "lr": 1e-2, "height": 16, "width": 16,
              "embedded_guidance": FLUX_GUIDANCE}
    values.update(settings)
    return Finetuner(FinetuneConfig(**values), pipeline=_pipe(kind, tmp_path / "pipe"),
                     reward=RewardEnsemble([colour_scorer()]), prompts=PROMPTS, validation_prompts=PROMPTS[:2],
                     pretrain_pairs=pretrain_pairs)


@pytest.mark.parametrize("kind", KINDS)
def test_sampler_and_x0_match_the_pipeline(tmp_path, kind):
    """Our denoising loop (no grad) reproduces ``pipe(latents=..., output_type="latent")``; the predicted x0 at
    step k is the hand formula on the pipeline's own latents (Euler: x - sigma * eps on the scaled input;
    flow: x - sigma * v); at the last step x0 is the pipeline's output."""
    pipe = _pipe(kind, tmp_path)
    g = wrap_pipeline(pipe, 16, 16, embedded_guidance=FLUX_GUIDANCE)
    conditioning = g.encode(PROMPTS[:2], CPU)
    steps, k = 6, 3
    scheduler = fresh_scheduler(pipe)
    g.set_timesteps(scheduler, steps, CPU)
    latents = g.initial_latents(2, torch.Generator().manual_seed(1), CPU, scheduler)
    noise = torch.randn((2, g.latent_channels, *g.latent_size), generator=torch.Generator().manual_seed(1))
    if kind == "flux":
        noise = pipe._pack_latents(noise, 2, g.latent_channels, *g.latent_size)
    seen = {}

    def keep(pipeline, i, t, kwargs):
        seen[i] = kwargs["latents"].clone()
        return kwargs

    with torch.no_grad():
        ours = sample_with_grad_window(g, g.denoiser, scheduler, latents, conditioning, steps, grad_from=steps)
        theirs = pipe(PROMPTS[:2], latents=noise, num_inference_steps=steps, height=16, width=16,
                      output_type="latent", callback_on_step_end=keep, **_pipeline_guidance(kind)).images
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
        last = refl_x0(g, g.denoiser, fresh_scheduler(pipe), latents, conditioning, steps - 1, steps)
        torch.testing.assert_close(last, theirs, atol=1e-4, rtol=1e-5)
        # x0 at step k by hand, from the pipeline's latents after step k - 1
        x0 = refl_x0(g, g.denoiser, fresh_scheduler(pipe), latents, conditioning, k, steps)
        hand = fresh_scheduler(pipe)
        g.set_timesteps(hand, steps, CPU)
        x, t, sigma = seen[k - 1], hand.timesteps[k], hand.sigmas[k]
        model_input = x / (sigma**2 + 1) ** 0.5 if kind == "sdxl" else x
        prediction = g.guided_output(g.denoiser, model_input, t, conditioning)
        torch.testing.assert_close(x0, x - sigma * prediction, atol=1e-5, rtol=1e-5)
    if kind == "flux":  # the guidance embedding is used: another value changes the images
        with torch.no_grad():
            other = pipe(PROMPTS[:2], latents=noise, num_inference_steps=steps, height=16, width=16,
                         output_type="latent", guidance_scale=5.0).images
        assert (other - theirs).abs().max() > 1e-4


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", ["refl", "draft"])
def test_one_step_trains_lora_and_loss_is_the_hand_formula(tmp_path, kind, method, monkeypatch):
    tuner = _tuner(tmp_path, kind, method=method, grad_scale=1.0 if method == "draft" else None)
    before = {k: v.detach().clone() for k, v in trainable_state(tuner.denoiser).items()}
    assert before and all("lora" in k for k in before)
    seen = []
    record_calls(monkeypatch, tuner, "reward_loss", seen)
    record = tuner.train_step(0)
    rewards, loss = seen[0]
    if method == "refl":
        assert 3 <= record["stop_index"] <= 5
        assert loss.item() == pytest.approx(torch.relu(2.0 - rewards).mean().item() * 1e-3, rel=1e-6)
    else:
        assert record["grad_steps"] == 1
        assert loss.item() == pytest.approx(-rewards.mean().item(), rel=1e-6)
    assert record["loss"] == pytest.approx(loss.item(), rel=1e-6)
    assert record["reward"] == pytest.approx(rewards.mean().item(), rel=1e-6)
    after = trainable_state(tuner.denoiser)
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert any("lora_B" in k for k in changed) and any("lora_A" in k for k in changed)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> list[ImageTextPair]:
    import random

    folder = tmp_path_factory.mktemp("pairs")
    rng = random.Random(0)
    out = []
    for i, (colour, shape) in enumerate([("red", "circle"), ("blue", "square"), ("green", "cross"),
                                         ("red", "square")]):
        draw(colour, shape, rng, size=16).save(folder / f"{i}.png")
        out.append(ImageTextPair(str(folder / f"{i}.png"), f"a {colour} {shape}"))
    return out


@pytest.mark.parametrize("kind", KINDS)
def test_alignprop_full_finetuning_with_alternating_pretraining(tmp_path, kind, pairs):
    tuner = _tuner(tmp_path, kind, method="alignprop", parameters="full", truncation="uniform", truncation_min=1,
                   truncation_max=3, grad_scale=1.0, lr=1e-4, pretrain_loss="alternate", pretrain_pairs=pairs)
    params = dict(tuner.denoiser.named_parameters())
    assert all(p.requires_grad for p in params.values()) and not any("lora" in k for k in params)
    before = {k: v.detach().clone() for k, v in params.items()}
    record = tuner.train_step(0)
    assert 1 <= record["grad_steps"] <= 3
    assert record["pretrain_loss"] > 0 and record["pretrain_grad_norm"] > 0 and record["grad_norm"] > 0
    changed = sum(not torch.equal(before[k], v) for k, v in tuner.denoiser.named_parameters())
    assert changed >= 0.9 * len(before)


@pytest.mark.parametrize("kind", KINDS)
def test_lora_loads_into_fresh_pipeline_and_reproduces_images(tmp_path, kind):
    tuner = _tuner(tmp_path, kind, method="draft", lora_rank=4, lora_alpha=8, grad_scale=1.0, lr=5e-2)
    for step in range(2):
        tuner.train_step(step)
    folder = tuner.save_weights()
    assert (folder / "pytorch_lora_weights.safetensors").is_file()
    seeds = [3, 4]
    trained = tuner.generate(PROMPTS[:2], seeds, num_steps=4, guidance_scale=1.0)
    fresh = _pipe(kind, tmp_path / "fresh")

    def images(pipe):
        return pipe(PROMPTS[:2], num_inference_steps=4, height=16, width=16, output_type="pt",
                    generator=[torch.Generator().manual_seed(s) for s in seeds], **_pipeline_guidance(kind)).images

    base = images(fresh)
    fresh.load_lora_weights(str(folder))
    loaded = images(fresh)
    assert torch.equal(loaded, trained), (loaded - trained).abs().max()
    assert (loaded - base).abs().max() > 1e-3  # the adapter changed the generator (alpha / rank = 2 kept)


@pytest.mark.parametrize("kind", KINDS)
def test_pretraining_loss_by_hand(tmp_path, kind, pairs):
    """SD3/FLUX: x_s = (1 - s) z + s n at s = t / 1000, target n - z (the flow), timestep s * 1000 for SD3 and
    s for FLUX (its t / 1000 convention), latents packed for FLUX. SDXL: DDPM's add_noise, target n."""
    pipe = _pipe(kind, tmp_path)
    g = wrap_pipeline(pipe, 16, 16, embedded_guidance=FLUX_GUIDANCE)
    pixels = pixels_for_generator([p.image for p in pairs[:2]], 16, 16)
    conditioning = g.encode([p.text for p in pairs[:2]], CPU)
    timesteps = torch.tensor([250, 700])
    with torch.no_grad():
        loss = g.noise_prediction_loss(g.denoiser, g.training_scheduler(), pixels, conditioning,
                                       torch.Generator().manual_seed(0), timesteps)
        rng = torch.Generator().manual_seed(0)
        vae = pipe.vae
        z = vae.encode(pixels * 2 - 1).latent_dist.sample(generator=rng)
        z = (z - (vae.config.shift_factor or 0.0)) * vae.config.scaling_factor
        if kind == "flux":
            z = pipe._pack_latents(z, 2, z.shape[1], z.shape[2], z.shape[3])
        n = torch.randn(z.shape, generator=rng)
        text = conditioning.cond
        if kind == "sdxl":
            alpha = g.training_scheduler().alphas_cumprod[timesteps].view(-1, 1, 1, 1)
            x = alpha.sqrt() * z + (1 - alpha).sqrt() * n
            prediction = pipe.unet(x, timesteps, encoder_hidden_states=text["encoder_hidden_states"],
                                   added_cond_kwargs=text["added_cond_kwargs"]).sample
            target = n
        else:
            s = (timesteps.float() / 1000).view(-1, *[1] * (z.dim() - 1))
            x = (1 - s) * z + s * n
            if kind == "sd3":
                prediction = pipe.transformer(hidden_states=x, timestep=timesteps.float(), **text).sample
            else:
                ids = conditioning.shared
                prediction = pipe.transformer(hidden_states=x, timestep=timesteps.float() / 1000,
                                              guidance=torch.full([2], FLUX_GUIDANCE), txt_ids=ids["txt_ids"],
                                              img_ids=ids["img_ids"], **text).sample
            target = n - z
        hand = torch.nn.functional.mse_loss(prediction, target)
        assert loss.item() == pytest.approx(hand.item(), rel=1e-5)
        if kind != "sdxl":  # the flow target, not the noise
            assert abs(torch.nn.functional.mse_loss(prediction, n).item() - loss.item()) > 1e-2


@pytest.mark.parametrize("kind", KINDS)
def test_gradient_checkpointing_gives_the_same_gradients(tmp_path, kind):
    """Also with Euler's input scaling (SDXL), which reads the scheduler's moving step index."""
    grads = []
    for checkpointing in (False, True):
        pipe = _pipe(kind, tmp_path / str(checkpointing))
        g = wrap_pipeline(pipe, 16, 16)
        conditioning = g.encode(PROMPTS[:2], CPU)
        scheduler = fresh_scheduler(pipe)
        g.set_timesteps(scheduler, 4, CPU)
        latents = g.initial_latents(2, torch.Generator().manual_seed(0), CPU, scheduler)
        final = sample_with_grad_window(g, g.denoiser, scheduler, latents, conditioning, 4, grad_from=1,
                                        gradient_checkpointing=checkpointing)
        g.decode(final).mean().backward()
        grads.append({n: p.grad.clone() for n, p in g.denoiser.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    assert all(torch.allclose(grads[0][n], grads[1][n], atol=1e-6, rtol=1e-5) for n in grads[0])
