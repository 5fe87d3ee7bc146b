"""One interface over diffusers text-to-image pipelines, for reward fine-tuning and search over paths.

A :class:`Generator` wraps a loaded pipeline and exposes what ReFL, DRaFT, AlignProp and step-by-step
search need: prompt conditioning, the pipeline's own schedule, one denoiser call, the scheduler's
predicted x0, VAE decoding to [0, 1] pixels, the noise-prediction (pretraining) loss, and the LoRA save
call of the pipeline's class.

Support:

- ``StableDiffusionPipeline`` (SD 1.x, SD 2.x; epsilon and v-prediction): :class:`Generator`.
- ``StableDiffusionXLPipeline`` (two text encoders, pooled embeddings + size/crop time ids):
  :class:`SDXLGenerator`.
- ``StableDiffusion3Pipeline`` (rectified flow; x0 = x_t - sigma * v): :class:`FlowMatchGenerator`.
- ``FluxPipeline`` (rectified flow on packed 2x2 latents, ``img_ids``/``txt_ids``, pooled CLIP projections,
  the guidance embedding of guidance-distilled transformers, timesteps / 1000, dynamically shifted sigmas):
  :class:`FluxGenerator`.

All four are tested on CPU with the tiny pipelines of :mod:`rewardlab.testing.diffusion` (the sampler
reproduces the pipeline's own latents, LoRA round-trips through ``load_lora_weights``).
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import UsageError

logger = logging.getLogger(__name__)


@dataclass
class Conditioning:
    """Encoded prompts: denoiser keyword arguments for the prompts and, with CFG, for the empty prompt."""

    cond: dict[str, Any]
    uncond: dict[str, Any] | None = None
    shared: dict[str, Any] = field(default_factory=dict)  # the same for cond and uncond, never batched

    @property
    def batch_size(self) -> int:
        return next(v for v in self.cond.values() if isinstance(v, torch.Tensor)).shape[0]


def fresh_scheduler(pipeline, kind: str = "pipeline"):
    """A new scheduler (no shared step state) of the pipeline's class, or DDPM/DDIM from its config."""
    from diffusers import DDIMScheduler, DDPMScheduler

    classes = {"pipeline": type(pipeline.scheduler), "ddpm": DDPMScheduler, "ddim": DDIMScheduler}
    if kind not in classes:
        raise UsageError(f"unknown scheduler {kind!r}", f"use one of {', '.join(classes)}")
    if kind != "pipeline" and not hasattr(pipeline, "unet"):
        raise UsageError(f"scheduler {kind!r} does not apply to the flow-matching {type(pipeline).__name__}",
                         "use scheduler: pipeline")
    return classes[kind].from_config(pipeline.scheduler.config)


def _cat_batches(uncond: Any, cond: Any) -> Any:
    """Unconditional and conditional denoiser arguments stacked along the batch (nested dicts too)."""
    if isinstance(cond, dict):
        return {k: _cat_batches(uncond[k], v) for k, v in cond.items()}
    return torch.cat([uncond, cond]) if isinstance(cond, torch.Tensor) else cond


def _negatives(negative_prompt: str | None, prompts: list[str]) -> list[str] | None:
    return None if negative_prompt is None else [negative_prompt] * len(prompts)


def scheduler_step(scheduler, model_output: torch.Tensor, t, latents: torch.Tensor,
                   generator: torch.Generator | None = None):
    """``scheduler.step`` with a generator where the scheduler takes one (stochastic samplers)."""
    kwargs = {"return_dict": True}
    if generator is not None and "generator" in inspect.signature(scheduler.step).parameters:
        kwargs["generator"] = generator
    return scheduler.step(model_output, t, latents, **kwargs)


class Generator:
    """A UNet latent-diffusion pipeline (SD 1.x / 2.x). Subclasses adapt SDXL, SD3 and FLUX."""

    flow_matching = False
    denoiser_name = "unet"
    latent_multiple = 1  # latent height/width must be a multiple of this (FLUX packs 2x2 patches)

    def __init__(self, pipeline, height: int | None = None, width: int | None = None):
        self.pipeline = pipeline
        self.denoiser = getattr(pipeline, self.denoiser_name)
        self.vae = pipeline.vae
        self.vae_factor = getattr(pipeline, "vae_scale_factor", 8)
        sample_size = getattr(pipeline, "default_sample_size", None) or self.denoiser.config.sample_size
        default = sample_size * self.vae_factor
        self.height, self.width = height or default, width or default
        step = self.vae_factor * self.latent_multiple
        if self.height % step or self.width % step:
            raise UsageError(f"image size {self.height}x{self.width} is not a multiple of {step} "
                             f"(VAE factor {self.vae_factor} x latent multiple {self.latent_multiple})")
        self.latent_size = (self.height // self.vae_factor, self.width // self.vae_factor)

    # -- conditioning ------------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, prompts: list[str], device: torch.device, guidance: bool = False,
               negative_prompt: str | None = None) -> Conditioning:
        """Prompt embeddings; with ``guidance``, also those of ``negative_prompt`` (default: the pipeline's
        own choice for no negative prompt: the empty prompt, or zeros where SDXL forces them)."""
        positive, negative = self.pipeline.encode_prompt(list(prompts), device, 1, guidance,
                                                          negative_prompt=_negatives(negative_prompt, prompts))
        return Conditioning({"encoder_hidden_states": positive},
                            {"encoder_hidden_states": negative} if guidance else None)

    # -- denoising ---------------------------------------------------------------------------------
    @property
    def latent_channels(self) -> int:
        return self.denoiser.config.in_channels

    def set_timesteps(self, scheduler, num_steps: int, device: torch.device) -> None:
        """The sampling schedule exactly as the pipeline's ``__call__`` sets it."""
        scheduler.set_timesteps(num_steps, device=device)

    def initial_latents(self, batch: int, generator: torch.Generator, device: torch.device, scheduler,
                        dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Seeded Gaussian latents drawn on the generator's device, times the scheduler's initial sigma
        (call :meth:`set_timesteps` first: for Euler schedulers that sigma depends on the schedule)."""
        shape = (batch, self.latent_channels, *self.latent_size)
        noise = torch.randn(shape, generator=generator, device=generator.device, dtype=torch.float32)
        return (noise * getattr(scheduler, "init_noise_sigma", 1.0)).to(device=device, dtype=dtype)

    def call_denoiser(self, denoiser, latents: torch.Tensor, t, cond: dict[str, Any],
                      shared: dict[str, Any] | None = None) -> torch.Tensor:
        return denoiser(latents, t, **cond, **(shared or {})).sample

    def scale_input(self, scheduler, latents: torch.Tensor, t) -> torch.Tensor:
        return scheduler.scale_model_input(latents, t)

    def guided_output(self, denoiser, model_input: torch.Tensor, t, conditioning: Conditioning,
                      guidance_scale: float = 1.0) -> torch.Tensor:
        """The denoiser's prediction for already scaled input; classifier-free guidance when
        ``guidance_scale != 1`` (one batched call, unconditional half first, as the pipelines do)."""
        if guidance_scale == 1.0 or conditioning.uncond is None:
            return self.call_denoiser(denoiser, model_input, t, conditioning.cond, conditioning.shared)
        both = _cat_batches(conditioning.uncond, conditioning.cond)
        uncond, cond = self.call_denoiser(denoiser, torch.cat([model_input] * 2), t, both,
                                          conditioning.shared).chunk(2)
        return uncond + guidance_scale * (cond - uncond)

    def model_output(self, denoiser, scheduler, latents: torch.Tensor, t, conditioning: Conditioning,
                     guidance_scale: float = 1.0) -> torch.Tensor:
        """One denoiser prediction at timestep ``t`` (scheduler input scaling, then :meth:`guided_output`)."""
        return self.guided_output(denoiser, self.scale_input(scheduler, latents, t), t, conditioning, guidance_scale)

    def predicted_x0(self, scheduler, step_output, model_output: torch.Tensor, t, latents: torch.Tensor) -> torch.Tensor:
        """The scheduler step's ``pred_original_sample`` (ReFL decodes it)."""
        x0 = getattr(step_output, "pred_original_sample", None)
        if x0 is None:
            raise UsageError(f"{type(scheduler).__name__} does not return pred_original_sample",
                             "use scheduler: ddpm or ddim")
        return x0

    # -- decoding ----------------------------------------------------------------------------------
    def to_vae_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Denoiser latents -> the VAE's (B, C, h, w) layout (FLUX unpacks)."""
        return latents

    def from_vae_latents(self, latents: torch.Tensor) -> torch.Tensor:
        return latents

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> pixels in [0, 1]: ``vae.decode(x / scaling_factor + shift_factor)``, then
        ``(x / 2 + 0.5).clamp(0, 1)``."""
        config = self.vae.config
        latents = self.to_vae_latents(latents) / config.scaling_factor
        shift = getattr(config, "shift_factor", None)
        if shift:
            latents = latents + shift
        image = self.vae.decode(latents.to(self.vae.dtype)).sample
        return (image.float() / 2 + 0.5).clamp(0, 1)

    @torch.no_grad()
    def encode_images(self, pixels01: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """[0, 1] pixels -> scaled VAE latents (a sample of the posterior), in the denoiser's layout."""
        config = self.vae.config
        posterior = self.vae.encode((pixels01 * 2 - 1).to(self.vae.device, self.vae.dtype)).latent_dist
        latents = posterior.sample(generator=generator)
        shift = getattr(config, "shift_factor", None)
        if shift:
            latents = latents - shift
        return self.from_vae_latents((latents * config.scaling_factor).float())

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
        prediction = self.call_denoiser(denoiser, noisy, timesteps, conditioning.cond, conditioning.shared)
        return torch.nn.functional.mse_loss(prediction.float(), target.float())

    def training_scheduler(self):
        from diffusers import DDPMScheduler

        return DDPMScheduler.from_config(self.pipeline.scheduler.config)

    # -- LoRA --------------------------------------------------------------------------------------
    def save_lora(self, folder, layers: dict[str, torch.Tensor], metadata: dict) -> None:
        """Write peft-named adapter ``layers`` with the pipeline class's ``save_lora_weights``."""
        from diffusers.utils import convert_state_dict_to_diffusers

        type(self.pipeline).save_lora_weights(folder, unet_lora_layers=convert_state_dict_to_diffusers(layers),
                                              unet_lora_adapter_metadata=metadata, safe_serialization=True)


class SDXLGenerator(Generator):
    """SDXL: two text encoders, pooled embeddings and size/crop time ids as added conditioning."""

    @torch.no_grad()
    def encode(self, prompts: list[str], device: torch.device, guidance: bool = False,
               negative_prompt: str | None = None) -> Conditioning:
        pipe = self.pipeline
        embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
            list(prompts), device=device, num_images_per_prompt=1, do_classifier_free_guidance=guidance,
            negative_prompt=_negatives(negative_prompt, prompts))
        size = (self.height, self.width)
        projection = pipe.text_encoder_2.config.projection_dim if pipe.text_encoder_2 is not None else pooled.shape[-1]
        time_ids = pipe._get_add_time_ids(size, (0, 0), size, dtype=embeds.dtype,
                                          text_encoder_projection_dim=projection).to(device)
        time_ids = time_ids.repeat(len(prompts), 1)

        def kwargs(e, p):
            return {"encoder_hidden_states": e, "added_cond_kwargs": {"text_embeds": p, "time_ids": time_ids}}

        return Conditioning(kwargs(embeds, pooled), kwargs(negative, negative_pooled) if guidance else None)


class FlowMatchGenerator(Generator):
    """SD3-style rectified flow: the transformer predicts v = noise - x0, so x0 = x_t - sigma_t * v.

    Timesteps are in the scheduler's units (sigma * 1000), as ``StableDiffusion3Pipeline`` passes them."""

    flow_matching = True
    denoiser_name = "transformer"

    @torch.no_grad()
    def encode(self, prompts: list[str], device: torch.device, guidance: bool = False,
               negative_prompt: str | None = None) -> Conditioning:
        embeds, negative, pooled, negative_pooled = self.pipeline.encode_prompt(
            prompt=list(prompts), prompt_2=None, prompt_3=None, device=device, num_images_per_prompt=1,
            do_classifier_free_guidance=guidance, negative_prompt=_negatives(negative_prompt, prompts))
        cond = {"encoder_hidden_states": embeds, "pooled_projections": pooled}
        uncond = {"encoder_hidden_states": negative, "pooled_projections": negative_pooled} if guidance else None
        return Conditioning(cond, uncond)

    def image_seq_len(self) -> int:
        patch = self.denoiser.config.patch_size
        return (self.latent_size[0] // patch) * (self.latent_size[1] // patch)

    def set_timesteps(self, scheduler, num_steps, device):
        from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

        config = scheduler.config
        if not config.get("use_dynamic_shifting", None):
            scheduler.set_timesteps(num_steps, device=device)
            return
        mu = calculate_shift(self.image_seq_len(), config.get("base_image_seq_len", 256),
                             config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5),
                             config.get("max_shift", 1.16))
        scheduler.set_timesteps(num_steps, device=device, mu=mu)

    def scale_input(self, scheduler, latents, t):
        return latents

    def call_denoiser(self, denoiser, latents, t, cond, shared=None):
        timestep = torch.as_tensor(t, device=latents.device).expand(latents.shape[0])
        return denoiser(hidden_states=latents, timestep=timestep, **cond, **(shared or {})).sample

    def predicted_x0(self, scheduler, step_output, model_output, t, latents):
        index = scheduler.index_for_timestep(t) if scheduler.step_index is None else scheduler.step_index - 1
        sigma = scheduler.sigmas[index].to(latents.device, latents.dtype)
        return latents - sigma * model_output

    def noise_prediction_loss(self, denoiser, train_scheduler, pixels01, conditioning, generator, timesteps=None):
        """Flow matching's loss: x_sigma = (1 - sigma) x0 + sigma noise at uniform sigma, target noise - x0."""
        latents = self.encode_images(pixels01, generator)
        noise = torch.randn(latents.shape, generator=generator, device=generator.device).to(latents.device)
        count = train_scheduler.config.num_train_timesteps
        if timesteps is None:
            sigmas = torch.rand((latents.shape[0],), generator=generator, device=generator.device)
        else:
            sigmas = timesteps.float() / count
        sigmas = sigmas.to(latents.device).view(-1, *[1] * (latents.dim() - 1))
        noisy = (1 - sigmas) * latents + sigmas * noise
        prediction = self.call_denoiser(denoiser, noisy, sigmas.flatten() * count, conditioning.cond,
                                        conditioning.shared)
        return torch.nn.functional.mse_loss(prediction.float(), (noise - latents).float())

    def training_scheduler(self):
        return type(self.pipeline.scheduler).from_config(self.pipeline.scheduler.config)

    def save_lora(self, folder, layers, metadata):
        type(self.pipeline).save_lora_weights(folder, transformer_lora_layers=layers,
                                              transformer_lora_adapter_metadata=metadata, safe_serialization=True)


class FluxGenerator(FlowMatchGenerator):
    """FLUX: rectified flow on 2x2-packed latents (``_pack_latents``/``_unpack_latents``), ``img_ids`` and
    ``txt_ids`` position ids, pooled CLIP projections, T5 sequence embeddings, timesteps passed as
    ``t / 1000``, sigmas ``linspace(1, 1/N, N)`` shifted by ``mu`` from the packed sequence length, and
    the guidance embedding (``embedded_guidance``, the pipeline's ``guidance_scale``) when the
    transformer has one (FLUX.1-dev). Classifier-free guidance, when asked for, is FluxPipeline's
    ``true_cfg`` with the empty negative prompt."""

    latent_multiple = 2

    def __init__(self, pipeline, height: int | None = None, width: int | None = None,
                 embedded_guidance: float = 3.5, max_sequence_length: int = 512):
        super().__init__(pipeline, height, width)
        self.embedded_guidance = embedded_guidance
        self.max_sequence_length = max_sequence_length

    @property
    def latent_channels(self) -> int:
        return self.denoiser.config.in_channels // 4

    def image_seq_len(self) -> int:
        return (self.latent_size[0] // 2) * (self.latent_size[1] // 2)

    @torch.no_grad()
    def encode(self, prompts: list[str], device: torch.device, guidance: bool = False,
               negative_prompt: str | None = None) -> Conditioning:
        def one(texts):
            embeds, pooled, text_ids = self.pipeline.encode_prompt(
                prompt=list(texts), prompt_2=None, device=device, num_images_per_prompt=1,
                max_sequence_length=self.max_sequence_length)
            return {"encoder_hidden_states": embeds, "pooled_projections": pooled}, text_ids

        cond, text_ids = one(prompts)
        uncond = one(_negatives(negative_prompt, prompts) or [""] * len(prompts))[0] if guidance else None
        image_ids = self.pipeline._prepare_latent_image_ids(len(prompts), self.latent_size[0] // 2,
                                                            self.latent_size[1] // 2, device, text_ids.dtype)
        return Conditioning(cond, uncond, {"txt_ids": text_ids, "img_ids": image_ids})

    def set_timesteps(self, scheduler, num_steps, device):
        import numpy as np
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps

        config = scheduler.config
        sigmas = None if config.get("use_flow_sigmas", False) else np.linspace(1.0, 1 / num_steps, num_steps)
        mu = calculate_shift(self.image_seq_len(), config.get("base_image_seq_len", 256),
                             config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5),
                             config.get("max_shift", 1.15))
        retrieve_timesteps(scheduler, num_steps, device, sigmas=sigmas, mu=mu)

    def initial_latents(self, batch, generator, device, scheduler, dtype=torch.float32):
        return self.from_vae_latents(super().initial_latents(batch, generator, device, scheduler, dtype))

    def to_vae_latents(self, latents):
        return self.pipeline._unpack_latents(latents, self.height, self.width, self.vae_factor)

    def from_vae_latents(self, latents):
        return self.pipeline._pack_latents(latents, latents.shape[0], latents.shape[1], *latents.shape[2:])

    def call_denoiser(self, denoiser, latents, t, cond, shared=None):
        batch = latents.shape[0]
        timestep = torch.as_tensor(t, device=latents.device).to(latents.dtype).expand(batch)
        guidance = None
        if self.denoiser.config.guidance_embeds:
            guidance = torch.full([batch], self.embedded_guidance, device=latents.device, dtype=torch.float32)
        return denoiser(hidden_states=latents, timestep=timestep / 1000, guidance=guidance, **cond,
                        **(shared or {})).sample


def wrap_pipeline(pipeline, height: int | None = None, width: int | None = None,
                  embedded_guidance: float = 3.5) -> Generator:
    """The :class:`Generator` for a loaded diffusers pipeline (``embedded_guidance``: FLUX only)."""
    name = type(pipeline).__name__
    if name.startswith("StableDiffusionXL"):
        return SDXLGenerator(pipeline, height, width)
    if name.startswith("StableDiffusion3"):
        return FlowMatchGenerator(pipeline, height, width)
    if name.startswith("Flux") and hasattr(pipeline, "_pack_latents"):
        return FluxGenerator(pipeline, height, width, embedded_guidance)
    if hasattr(pipeline, "unet") and hasattr(pipeline, "encode_prompt"):
        return Generator(pipeline, height, width)
    raise UsageError(f"pipeline {name} is not supported for reward fine-tuning",
                     "use a Stable Diffusion 1.x/2.x, SDXL, SD3 or FLUX pipeline")
