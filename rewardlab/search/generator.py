"""A diffusers text-to-image pipeline behind the small interface search needs: noises in, images out,
denoiser calls counted.

Any pipeline whose ``__call__`` takes ``prompt``, ``latents``, ``num_inference_steps`` and ``output_type``
works for best-of-N, random and zero-order search (tested: Stable Diffusion 1.x, SDXL, SD3, FLUX). Search
over paths steps the pipeline through :mod:`rewardlab.diffusion` (the same adapters reward fine-tuning
uses) and needs closed-form re-noising: UNet pipelines (SD 1.x/2.x, SDXL) with a DDIM or Euler scheduler,
and flow-matching pipelines (SD3, FLUX) with their Euler scheduler.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..errors import UsageError

logger = logging.getLogger(__name__)


@dataclass
class PathState:
    """Latents of a batch of paths after ``step`` of the scheduler's timesteps have run."""

    latents: torch.Tensor
    step: int


class DiffusersGenerator:
    """Wraps a loaded diffusers pipeline. ``nfe`` counts denoiser evaluations per sample (a classifier-free
    guidance step on one image counts 2: the UNet sees the conditional and unconditional input)."""

    def __init__(self, pipe, num_inference_steps: int = 30, guidance_scale: float | None = None,
                 height: int | None = None, width: int | None = None, negative_prompt: str | None = None,
                 call_kwargs: dict[str, Any] | None = None):
        if num_inference_steps < 1:
            raise UsageError(f"num_inference_steps {num_inference_steps} must be at least 1")
        self.pipe = pipe
        self.num_inference_steps = int(num_inference_steps)
        self.guidance_scale = guidance_scale
        self.negative_prompt = negative_prompt
        self.call_kwargs = dict(call_kwargs or {})
        self._check_call_kwargs()
        self.denoiser = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
        if self.denoiser is None:
            raise UsageError(f"{type(pipe).__name__} has neither a unet nor a transformer",
                             "pass a diffusers text-to-image pipeline")
        default = self._default_size()
        self.height = int(height or default)
        self.width = int(width or default)
        self._set_eval()
        self.nfe = 0
        self._adapter = None
        self._hook = self.denoiser.register_forward_pre_hook(self._count, with_kwargs=True)
        if hasattr(pipe, "set_progress_bar_config"):
            pipe.set_progress_bar_config(disable=True)

    def _check_call_kwargs(self) -> None:
        """Extra ``__call__`` options must exist on this pipeline; FLUX's true CFG needs a negative prompt
        (without one the pipeline silently skips it)."""
        accepted = inspect.signature(self.pipe.__call__).parameters
        named = {name for name, p in accepted.items() if p.kind is not inspect.Parameter.VAR_KEYWORD}
        unknown = sorted(k for k in self.call_kwargs if k not in named)  # **kwargs only takes deprecated names
        if unknown:
            raise UsageError(f"{type(self.pipe).__name__} does not take {', '.join(unknown)}",
                             "drop the option (true CFG, true_cfg_scale, is a FLUX option)")
        if float(self.call_kwargs.get("true_cfg_scale", 1.0)) > 1.0 and self.negative_prompt is None:
            raise UsageError("true_cfg_scale > 1 needs a negative prompt", 'pass --negative-prompt ("" for none)')

    def _set_eval(self) -> None:
        """Put every module of the pipeline in eval mode: ``from_pretrained`` does, but a pipeline built from
        freshly constructed modules keeps them in training mode, where dropout (T5's, for SD3 and FLUX) would
        make a recorded seed give different pixels on every call."""
        for name, component in getattr(self.pipe, "components", {}).items():
            if isinstance(component, torch.nn.Module) and component.training:
                logger.info("%s: %s was in training mode; switching it to eval", type(self.pipe).__name__, name)
                component.eval()

    def _default_size(self) -> int:
        """The pipeline's own default image side: ``default_sample_size`` (SDXL, SD3, FLUX) or the
        denoiser's ``sample_size`` (SD 1.x/2.x), times the VAE scale factor; 1024 when neither is known."""
        scale = int(getattr(self.pipe, "vae_scale_factor", 8))
        for sample in (getattr(self.pipe, "default_sample_size", None),
                       getattr(self.denoiser.config, "sample_size", None)):
            if isinstance(sample, int) and sample > 0:
                return sample * scale
        logger.warning("%s gives no default image size; using 1024x1024 (pass height and width)",
                       type(self.pipe).__name__)
        return 1024

    @property
    def _is_unet(self) -> bool:
        return getattr(self.pipe, "unet", None) is not None

    def _count(self, module, args, kwargs) -> None:
        sample = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
        self.nfe += int(sample.shape[0]) if isinstance(sample, torch.Tensor) else 1

    def describe(self) -> dict:
        """Settings recorded in a run's ``run.json`` (a resumed run must use the same ones)."""
        return {"pipeline": type(self.pipe).__name__, "scheduler": type(self.pipe.scheduler).__name__,
                "num_inference_steps": self.num_inference_steps, "guidance_scale": self.guidance_scale,
                "height": self.height, "width": self.width, "negative_prompt": self.negative_prompt,
                "latent_shape": list(self.latent_shape)}

    @property
    def latent_shape(self) -> tuple[int, ...]:
        """Shape of one initial noise, before any packing the pipeline does (FLUX packs 2x2 patches)."""
        scale = int(getattr(self.pipe, "vae_scale_factor", 8))
        if self._is_unet:
            return (int(self.denoiser.config.in_channels), self.height // scale, self.width // scale)
        channels = int(self.denoiser.config.in_channels)
        if hasattr(self.pipe, "_pack_latents"):  # FLUX: in_channels counts the packed 2x2 patch
            return (channels // 4, 2 * (self.height // (scale * 2)), 2 * (self.width // (scale * 2)))
        return (channels, self.height // scale, self.width // scale)

    def _pipeline_latents(self, noises: torch.Tensor) -> torch.Tensor:
        dtype = getattr(self.denoiser, "dtype", torch.float32)
        latents = noises.to(device=self.pipe.device, dtype=dtype)
        if not self._is_unet and hasattr(self.pipe, "_pack_latents"):
            b, c, h, w = latents.shape
            latents = self.pipe._pack_latents(latents, b, c, h, w)
        return latents

    def _call_options(self) -> dict:
        options = {"num_inference_steps": self.num_inference_steps, "height": self.height, "width": self.width,
                   **self.call_kwargs}
        if self.guidance_scale is not None:
            options["guidance_scale"] = self.guidance_scale
        if self.negative_prompt is not None:
            options["negative_prompt"] = self.negative_prompt
        return options

    @torch.inference_mode()
    def generate(self, prompt: str, noises: torch.Tensor) -> list[np.ndarray]:
        """Images (uint8 HWC) of ``prompt`` from initial ``noises`` of shape (B, *latent_shape)."""
        if tuple(noises.shape[1:]) != self.latent_shape:
            raise UsageError(f"noise shape {tuple(noises.shape[1:])} is not the pipeline's {self.latent_shape}")
        options = self._call_options()
        if "negative_prompt" in options:
            options["negative_prompt"] = [options["negative_prompt"]] * len(noises)
        out = self.pipe(prompt=[prompt] * len(noises), latents=self._pipeline_latents(noises), output_type="np",
                        **options)
        return [to_uint8(image) for image in out.images]

    # -- step-by-step sampling, for search over paths ---------------------------------------------------
    # Path states hold latents in the unpacked (B, *latent_shape) layout for every pipeline.

    @property
    def adapter(self):
        """The pipeline behind :mod:`rewardlab.diffusion`'s interface (conditioning, schedule, denoiser call,
        predicted x0, decoding), shared with reward fine-tuning."""
        if self._adapter is None:
            from ..diffusion import wrap_pipeline

            self._adapter = wrap_pipeline(self.pipe, self.height, self.width, embedded_guidance=self._guidance()[0])
            if hasattr(self._adapter, "max_sequence_length"):
                self._adapter.max_sequence_length = self.call_kwargs.get("max_sequence_length", 512)
        return self._adapter

    def check_paths(self) -> None:
        """Raise :class:`UsageError` unless this pipeline can be stepped and re-noised in closed form: UNet
        pipelines (SD 1.x/2.x, SDXL) with a DDIM or Euler scheduler, flow-matching pipelines (SD3, FLUX) with
        their Euler scheduler and without true CFG."""
        from diffusers import EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler

        name, scheduler = type(self.pipe).__name__, type(self.pipe.scheduler).__name__
        try:
            adapter = self.adapter
        except UsageError as exc:
            raise UsageError(f"search over paths (method 'paths') cannot step {name}: {exc.message}",
                             "use best-of-n, random or zero-order search with this pipeline") from None
        if adapter.flow_matching:
            if not isinstance(self.pipe.scheduler, FlowMatchEulerDiscreteScheduler):
                raise UsageError(f"search over paths on {name} needs FlowMatchEulerDiscreteScheduler, not {scheduler}")
            if float(self.call_kwargs.get("true_cfg_scale", 1.0)) > 1.0:
                raise UsageError(f"search over paths on {name} does not support true_cfg_scale > 1",
                                 "drop true_cfg_scale (FLUX's guidance is distilled into the model)")
            return
        if not (self._is_ddim or isinstance(self.pipe.scheduler, EulerDiscreteScheduler)):
            raise UsageError(f"search over paths on {name} needs a DDIM or Euler scheduler, not {scheduler}",
                             "pass --scheduler ddim (Python: load_pipeline(..., scheduler='ddim'))")

    def _default_guidance(self) -> float:
        """The ``guidance_scale`` default of the pipeline's ``__call__`` (7.5 for SD, 3.5 for FLUX)."""
        return float(inspect.signature(self.pipe.__call__).parameters["guidance_scale"].default)

    def _guidance(self) -> tuple[float, bool]:
        """(scale, classifier-free guidance on?) as the pipeline's ``__call__`` decides: FLUX's scale is the
        distilled guidance input (no CFG); guidance-embedded UNets (LCM) do not run CFG either."""
        from diffusers import FluxPipeline

        scale = self._default_guidance() if self.guidance_scale is None else float(self.guidance_scale)
        distilled = isinstance(self.pipe, FluxPipeline) or \
            getattr(self.denoiser.config, "time_cond_proj_dim", None) is not None
        return scale, scale > 1.0 and not distilled

    def timesteps(self) -> torch.Tensor:
        """The sampling timesteps, set on the pipeline's scheduler as its ``__call__`` sets them."""
        self.adapter.set_timesteps(self.pipe.scheduler, self.num_inference_steps, self.pipe.device)
        return self.pipe.scheduler.timesteps

    @property
    def _is_ddim(self) -> bool:
        from diffusers import DDIMScheduler

        return isinstance(self.pipe.scheduler, DDIMScheduler)

    def sigmas(self) -> torch.Tensor:
        """Flow matching and Euler: the noise level of each step boundary (``num_inference_steps + 1``
        values, the last 0)."""
        self.timesteps()
        return self.pipe.scheduler.sigmas.detach().double().cpu()

    @torch.inference_mode()
    def run_steps(self, prompt: str, state: PathState, end: int) -> tuple[PathState, torch.Tensor]:
        """Run steps ``state.step .. end-1`` of the pipeline's own loop; returns the new state and the
        predicted clean latents (both unpacked)."""
        adapter, scheduler, device = self.adapter, self.pipe.scheduler, self.pipe.device
        scale, cfg = self._guidance()
        timesteps = self.timesteps()
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(state.step)
        conditioning = adapter.encode([prompt] * len(state.latents), device, guidance=cfg,
                                      negative_prompt=self.negative_prompt)
        latents = adapter.from_vae_latents(state.latents.to(device, self.denoiser.dtype))
        predicted = latents
        for t in timesteps[state.step:end]:
            output = adapter.model_output(self.denoiser, scheduler, latents, t, conditioning, scale if cfg else 1.0)
            out = scheduler.step(output, t, latents)
            predicted = adapter.predicted_x0(scheduler, out, output, t, latents)
            latents = out.prev_sample
        return PathState(adapter.to_vae_latents(latents), end), adapter.to_vae_latents(predicted)

    def start_paths(self, noises: torch.Tensor) -> PathState:
        """Initial path latents: the noises times the scheduler's initial sigma for this schedule (Euler's
        depends on the number of steps, so the schedule is set first)."""
        self.timesteps()
        sigma = float(getattr(self.pipe.scheduler, "init_noise_sigma", 1.0))
        return PathState(noises.to(self.pipe.device, self.denoiser.dtype) * sigma, 0)

    def renoise(self, state: PathState, back: int, noises: torch.Tensor) -> PathState:
        """Move latents at ``state.step`` back ``back`` steps with the forward process q(x_s | x_t).

        DDIM: ``x_s = sqrt(a_s / a_t) x_t + sqrt(1 - a_s / a_t) eps`` (``a`` = cumulative alpha).
        Euler (variance exploding, ``x_t = x_0 + sigma_t eps``): ``x_s = x_t + sqrt(sigma_s^2 - sigma_t^2) eps``.
        Flow matching (``x_t = (1 - t) x_0 + t eps``): ``x_s = r x_t + sqrt(s^2 - r^2 t^2) eps`` with
        ``r = (1 - s) / (1 - t)``; at the final step (t = 0) this is ``(1 - s) x_0 + s eps``."""
        back = min(back, state.step)
        if back == 0:
            return state
        latents, noises = state.latents.double().cpu(), noises.double().cpu()
        if self.adapter.flow_matching or not self._is_ddim:
            sigmas = self.sigmas()
            s, t = float(sigmas[state.step - back]), float(sigmas[state.step])
            ratio = (1.0 - s) / (1.0 - t) if self.adapter.flow_matching else 1.0
            moved = ratio * latents + max(s * s - ratio * ratio * t * t, 0.0) ** 0.5 * noises
            return PathState(moved.to(self.pipe.device, self.denoiser.dtype), state.step - back)
        timesteps = self.timesteps()
        alphas = self.pipe.scheduler.alphas_cumprod.to(torch.float64)
        ratio = float(alphas[int(timesteps[state.step - back])] / alphas[int(timesteps[state.step])]) \
            if state.step < len(timesteps) else float(alphas[int(timesteps[state.step - back])])
        moved = ratio ** 0.5 * latents + (1.0 - ratio) ** 0.5 * noises
        return PathState(moved.to(self.pipe.device, self.denoiser.dtype), state.step - back)

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor) -> list[np.ndarray]:
        """Clean latents (unpacked) to uint8 images with the pipeline's VAE."""
        pixels = self.adapter.decode(self.adapter.from_vae_latents(latents.to(self.pipe.device)))
        return [to_uint8(image) for image in pixels.permute(0, 2, 3, 1).cpu().numpy()]

    def close(self) -> None:
        self._hook.remove()


def to_uint8(image: np.ndarray) -> np.ndarray:
    """A pipeline's float image in [0, 1] as uint8 (round half up, as PIL's ``numpy_to_pil`` does)."""
    return (np.clip(np.asarray(image, dtype=np.float32), 0.0, 1.0) * 255.0).round().astype(np.uint8)


def batched(items: Sequence, size: int):
    for start in range(0, len(items), size):
        yield start, items[start:start + size]
