"""One interface over diffusers text-to-image pipelines for reward fine-tuning.

A :class:`Generator` wraps a loaded pipeline and exposes what ReFL, DRaFT and AlignProp need: prompt
conditioning, one denoiser call, the scheduler's predicted x0, VAE decoding to [0, 1] pixels, the
noise-prediction (pretraining) loss, and the LoRA save call of the pipeline's class.

Support:

- ``StableDiffusionPipeline`` (SD 1.x, SD 2.x; epsilon and v-prediction): tested on CPU with the tiny
  pipeline of :mod:`rewardlab.testing.diffusion`.
- ``StableDiffusionXLPipeline``: written (pooled embeddings + time ids), not covered by a test.
- ``StableDiffusion3Pipeline`` (flow matching; x0 = x_t - sigma * v): written, not covered by a test.
  FLUX (packed latents, guidance embedding) is not supported.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import UsageError

logger = logging.getLogger(__name__)


@dataclass
class Conditioning:
    """Encoded prompts: denoiser keyword arguments for the prompts and, with CFG, for the empty prompt."""

    cond: dict[str, Any]
    uncond: dict[str, Any] | None = None

    @property
    def batch_size(self) -> int:
        return next(v for v in self.cond.values() if isinstance(v, torch.Tensor)).shape[0]


def fresh_scheduler(pipeline, kind: str = "pipeline"):
    """A new scheduler (no shared step state) of the pipeline's class, or DDPM/DDIM from its config."""
    from diffusers import DDIMScheduler, DDPMScheduler

    classes = {"pipeline": type(pipeline.scheduler), "ddpm": DDPMScheduler, "ddim": DDIMScheduler}
    if kind not in classes:
        raise UsageError(f"unknown scheduler {kind!r}", f"use one of {', '.join(classes)}")
    return classes[kind].from_config(pipeline.scheduler.config)


def scheduler_step(scheduler, model_output: torch.Tensor, t, latents: torch.Tensor,
                   generator: torch.Generator | None = None):
    """``scheduler.step`` with a generator where the scheduler takes one (stochastic samplers)."""
    kwargs = {"return_dict": True}
    if generator is not None and "generator" in inspect.signature(scheduler.step).parameters:
        kwargs["generator"] = generator
    return scheduler.step(model_output, t, latents, **kwargs)


class Generator:
    """A UNet latent-diffusion pipeline (SD 1.x / 2.x). Subclasses adapt SDXL and flow matching."""

    flow_matching = False

    def __init__(self, pipeline, height: int | None = None, width: int | None = None):
        self.pipeline = pipeline
        self.denoiser_name = "unet"
        self.denoiser = pipeline.unet
        self.vae = pipeline.vae
        factor = getattr(pipeline, "vae_scale_factor", 8)
        default = self.denoiser.config.sample_size * factor
        self.height, self.width = height or default, width or default
        if self.height % factor or self.width % factor:
            raise UsageError(f"image size {self.height}x{self.width} is not a multiple of the VAE factor {factor}")
        self.latent_size = (self.height // factor, self.width // factor)

    # -- conditioning ------------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, prompts: list[str], device: torch.device, guidance: bool = False) -> Conditioning:
        positive, negative = self.pipeline.encode_prompt(list(prompts), device, 1, guidance,
                                                          negative_prompt=[""] * len(prompts) if guidance else None)
        return Conditioning({"encoder_hidden_states": positive},
                            {"encoder_hidden_states": negative} if guidance else None)

    # -- denoising ---------------------------------------------------------------------------------
    @property
    def latent_channels(self) -> int:
        return self.denoiser.config.in_channels

    def initial_latents(self, batch: int, generator: torch.Generator, device: torch.device, scheduler,
                        dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Seeded Gaussian latents drawn on the generator's device, times the scheduler's initial sigma."""
        shape = (batch, self.latent_channels, *self.latent_size)
        noise = torch.randn(shape, generator=generator, device=generator.device, dtype=torch.float32)
        return (noise * getattr(scheduler, "init_noise_sigma", 1.0)).to(device=device, dtype=dtype)

    def call_denoiser(self, denoiser, latents: torch.Tensor, t, cond: dict[str, Any]) -> torch.Tensor:
        return denoiser(latents, t, **cond).sample

    def model_output(self, denoiser, scheduler, latents: torch.Tensor, t, conditioning: Conditioning,
                     guidance_scale: float = 1.0) -> torch.Tensor:
        """One denoiser prediction at timestep ``t``; classifier-free guidance when ``guidance_scale != 1``."""
        model_input = scheduler.scale_model_input(latents, t)
        if guidance_scale == 1.0 or conditioning.uncond is None:
            return self.call_denoiser(denoiser, model_input, t, conditioning.cond)
        both = {k: torch.cat([conditioning.uncond[k], v]) if isinstance(v, torch.Tensor) else v
                for k, v in conditioning.cond.items()}
        uncond, cond = self.call_denoiser(denoiser, torch.cat([model_input] * 2), t, both).chunk(2)
        return uncond + guidance_scale * (cond - uncond)

    def predicted_x0(self, scheduler, step_output, model_output: torch.Tensor, t, latents: torch.Tensor) -> torch.Tensor:
        """The scheduler step's ``pred_original_sample`` (ReFL decodes it)."""
        x0 = getattr(step_output, "pred_original_sample", None)
        if x0 is None:
            raise UsageError(f"{type(scheduler).__name__} does not return pred_original_sample",
                             "use scheduler: ddpm or ddim")
        return x0

    # -- decoding ----------------------------------------------------------------------------------
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> pixels in [0, 1]: ``vae.decode(x / scaling_factor)``, then ``(x / 2 + 0.5).clamp(0, 1)``."""
        config = self.vae.config
        latents = latents / config.scaling_factor
        shift = getattr(config, "shift_factor", None)
        if shift:
            latents = latents + shift
        image = self.vae.decode(latents.to(self.vae.dtype)).sample
        return (image.float() / 2 + 0.5).clamp(0, 1)

    @torch.no_grad()
    def encode_images(self, pixels01: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """[0, 1] pixels -> scaled VAE latents (a sample of the posterior)."""
        config = self.vae.config
        posterior = self.vae.encode((pixels01 * 2 - 1).to(self.vae.device, self.vae.dtype)).latent_dist
        latents = posterior.sample(generator=generator)
        shift = getattr(config, "shift_factor", None)
        if shift:
            latents = latents - shift
        return (latents * config.scaling_factor).float()

    # -- pretraining loss --------------------------------------------------------------------------
    def noise_prediction_loss(self, denoiser, train_scheduler, pixels01: torch.Tensor, conditioning: Conditioning,
                              generator: torch.Generator, timesteps: torch.Tensor | None = None) -> torch.Tensor:
        """The standard diffusion loss: MSE between the denoiser's output and its target (noise for
        epsilon models, velocity for v-prediction) at uniform random timesteps."""
        latents = self.encode_images(pixels01, generator)
        device = latents.device
        noise = torch.randn(latents.shape, generator=generator, device=generator.device).to(device)
        if timesteps is None:
            count = train_scheduler.config.num_train_timesteps
            timesteps = torch.randint(0, count, (latents.shape[0],), generator=generator, device=generator.device)
        timesteps = timesteps.to(device)
        noisy = train_scheduler.add_noise(latents, noise, timesteps)
        kind = train_scheduler.config.prediction_type
        if kind == "epsilon":
            target = noise
        elif kind == "v_prediction":
            target = train_scheduler.get_velocity(latents, noise, timesteps)
        else:
            raise UsageError(f"prediction_type {kind!r} has no pretraining loss here", "use epsilon or v_prediction")
        prediction = self.call_denoiser(denoiser, noisy, timesteps, conditioning.cond)
        return torch.nn.functional.mse_loss(prediction.float(), target.float())

    def training_scheduler(self):
        from diffusers import DDPMScheduler

        return DDPMScheduler.from_config(self.pipeline.scheduler.config)

    # -- LoRA --------------------------------------------------------------------------------------
    def save_lora(self, folder, layers: dict[str, torch.Tensor], metadata: dict) -> None:
        type(self.pipeline).save_lora_weights(folder, unet_lora_layers=layers, unet_lora_adapter_metadata=metadata,
                                              safe_serialization=True)


class SDXLGenerator(Generator):
    """SDXL: two text encoders, pooled embeddings and size/crop time ids as added conditioning."""

    @torch.no_grad()
    def encode(self, prompts: list[str], device: torch.device, guidance: bool = False) -> Conditioning:
        pipe = self.pipeline
        embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
            list(prompts), device=device, num_images_per_prompt=1, do_classifier_free_guidance=guidance,
            negative_prompt=[""] * len(prompts) if guidance else None)
        size = (self.height, self.width)
        projection = pipe.text_encoder_2.config.projection_dim if pipe.text_encoder_2 is not None else pooled.shape[-1]
        time_ids = pipe._get_add_time_ids(size, (0, 0), size, dtype=embeds.dtype,
                                          text_encoder_projection_dim=projection).to(device)
        time_ids = time_ids.repeat(len(prompts), 1)

        def kwargs(e, p):
            return {"encoder_hidden_states": e, "added_cond_kwargs": {"text_embeds": p, "time_ids": time_ids}}

        return Conditioning(kwargs(embeds, pooled), kwargs(negative, negative_pooled) if guidance else None)

    def model_output(self, denoiser, scheduler, latents, t, conditioning, guidance_scale=1.0):
        model_input = scheduler.scale_model_input(latents, t)
        if guidance_scale == 1.0 or conditioning.uncond is None:
            return self.call_denoiser(denoiser, model_input, t, conditioning.cond)
        u, c = conditioning.uncond, conditioning.cond
        both = {"encoder_hidden_states": torch.cat([u["encoder_hidden_states"], c["encoder_hidden_states"]]),
                "added_cond_kwargs": {k: torch.cat([u["added_cond_kwargs"][k], c["added_cond_kwargs"][k]])
                                      for k in c["added_cond_kwargs"]}}
        uncond, cond = self.call_denoiser(denoiser, torch.cat([model_input] * 2), t, both).chunk(2)
        return uncond + guidance_scale * (cond - uncond)


class FlowMatchGenerator(Generator):
    """SD3-style rectified flow: the transformer predicts v = noise - x0, so x0 = x_t - sigma_t * v."""

    flow_matching = True

    def __init__(self, pipeline, height: int | None = None, width: int | None = None):
        self.pipeline = pipeline
        self.denoiser_name = "transformer"
        self.denoiser = pipeline.transformer
        self.vae = pipeline.vae
        factor = getattr(pipeline, "vae_scale_factor", 8)
        default = self.denoiser.config.sample_size * factor
        self.height, self.width = height or default, width or default
        self.latent_size = (self.height // factor, self.width // factor)

    @torch.no_grad()
    def encode(self, prompts: list[str], device: torch.device, guidance: bool = False) -> Conditioning:
        embeds, negative, pooled, negative_pooled = self.pipeline.encode_prompt(
            prompt=list(prompts), prompt_2=None, prompt_3=None, device=device, num_images_per_prompt=1,
            do_classifier_free_guidance=guidance, negative_prompt=[""] * len(prompts) if guidance else None)
        cond = {"encoder_hidden_states": embeds, "pooled_projections": pooled}
        uncond = {"encoder_hidden_states": negative, "pooled_projections": negative_pooled} if guidance else None
        return Conditioning(cond, uncond)

    def call_denoiser(self, denoiser, latents, t, cond):
        timestep = torch.as_tensor(t, device=latents.device).expand(latents.shape[0])
        return denoiser(hidden_states=latents, timestep=timestep, **cond).sample

    def model_output(self, denoiser, scheduler, latents, t, conditioning, guidance_scale=1.0):
        if guidance_scale == 1.0 or conditioning.uncond is None:
            return self.call_denoiser(denoiser, latents, t, conditioning.cond)
        both = {k: torch.cat([conditioning.uncond[k], v]) for k, v in conditioning.cond.items()}
        uncond, cond = self.call_denoiser(denoiser, torch.cat([latents] * 2), t, both).chunk(2)
        return uncond + guidance_scale * (cond - uncond)

    def predicted_x0(self, scheduler, step_output, model_output, t, latents):
        index = scheduler.index_for_timestep(t) if scheduler.step_index is None else scheduler.step_index - 1
        sigma = scheduler.sigmas[index].to(latents.device, latents.dtype)
        return latents - sigma * model_output

    def noise_prediction_loss(self, denoiser, train_scheduler, pixels01, conditioning, generator, timesteps=None):
        latents = self.encode_images(pixels01, generator)
        noise = torch.randn(latents.shape, generator=generator, device=generator.device).to(latents.device)
        if timesteps is None:
            sigmas = torch.rand((latents.shape[0],), generator=generator, device=generator.device)
        else:
            sigmas = timesteps.float() / train_scheduler.config.num_train_timesteps
        sigmas = sigmas.to(latents.device).view(-1, 1, 1, 1)
        noisy = (1 - sigmas) * latents + sigmas * noise
        t = sigmas.flatten() * train_scheduler.config.num_train_timesteps
        prediction = self.call_denoiser(denoiser, noisy, t, conditioning.cond)
        return torch.nn.functional.mse_loss(prediction.float(), (noise - latents).float())

    def training_scheduler(self):
        return type(self.pipeline.scheduler).from_config(self.pipeline.scheduler.config)

    def save_lora(self, folder, layers, metadata):
        type(self.pipeline).save_lora_weights(folder, transformer_lora_layers=layers,
                                              transformer_lora_adapter_metadata=metadata, safe_serialization=True)


def wrap_pipeline(pipeline, height: int | None = None, width: int | None = None) -> Generator:
    """The :class:`Generator` for a loaded diffusers pipeline."""
    name = type(pipeline).__name__
    if name.startswith("StableDiffusionXL"):
        return SDXLGenerator(pipeline, height, width)
    if name.startswith("StableDiffusion3"):
        return FlowMatchGenerator(pipeline, height, width)
    if hasattr(pipeline, "unet") and hasattr(pipeline, "encode_prompt"):
        return Generator(pipeline, height, width)
    raise UsageError(f"pipeline {name} is not supported for reward fine-tuning",
                     "use a Stable Diffusion 1.x/2.x, SDXL or SD3 pipeline")
