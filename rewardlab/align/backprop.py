"""Sampling with a window of steps that carry gradient: the engine of ReFL, DRaFT-K and AlignProp.

``sample_with_grad_window`` runs the scheduler's denoising loop; steps before ``grad_from`` run under
``torch.no_grad`` and only steps ``grad_from ..`` build a graph, so gradients reach the denoiser through
the last steps only (truncated backpropagation). With ``stop_at`` the loop ends at that step and returns
the scheduler's predicted x0 there (ReFL); without it, the final latents (DRaFT, AlignProp).

- DRaFT-K (Clark et al. 2024): the last K of N steps carry gradient (K = 1 by default).
- AlignProp (Prabhudesai et al. 2023): the same truncation, with K drawn anew every training step
  (``fixed``, ``uniform`` or ``gaussian``). AlignProp detaches the noise prediction before its truncation
  point instead of running those steps without grad; the parameter gradients are the same.

Gradient checkpointing recomputes each denoiser call in the backward pass instead of storing its
activations: memory grows with K by the size of the latents only.
"""

from __future__ import annotations

import random

import torch
from torch.utils.checkpoint import checkpoint as _checkpoint

from ..diffusion.adapters import Conditioning, Generator, scheduler_step
from ..errors import ConfigError

TRUNCATIONS = ("fixed", "uniform", "gaussian")


def sample_with_grad_window(generator: Generator, denoiser, scheduler, latents: torch.Tensor,
                            conditioning: Conditioning, num_steps: int, grad_from: int, stop_at: int | None = None,
                            guidance_scale: float = 1.0, gradient_checkpointing: bool = False,
                            noise_generator: torch.Generator | None = None) -> torch.Tensor:
    """Denoise ``latents`` over ``num_steps`` scheduler steps; steps ``i >= grad_from`` carry gradient.

    Returns the predicted x0 at step ``stop_at`` when given, else the latents after the last step."""
    generator.set_timesteps(scheduler, num_steps, latents.device)
    timesteps = scheduler.timesteps
    if len(timesteps) != num_steps:
        raise ConfigError(f"{type(scheduler).__name__} made {len(timesteps)} timesteps for {num_steps} steps")
    last = num_steps - 1 if stop_at is None else stop_at
    if not 0 <= last < num_steps:
        raise ConfigError(f"stop index {stop_at} is outside 0..{num_steps - 1}")
    for i in range(last + 1):
        t = timesteps[i]
        with torch.set_grad_enabled(i >= grad_from):
            # input scaling stays outside the checkpoint: Euler schedulers read their step index there,
            # which has moved on by the time the backward pass recomputes the denoiser call
            model_input = generator.scale_input(scheduler, latents, t)
            if i >= grad_from and gradient_checkpointing:
                def call(x, t=t):
                    return generator.guided_output(denoiser, x, t, conditioning, guidance_scale)

                output = _checkpoint(call, model_input, use_reentrant=False)
            else:
                output = generator.guided_output(denoiser, model_input, t, conditioning, guidance_scale)
            step = scheduler_step(scheduler, output, t, latents, noise_generator)
            if i == stop_at:
                return generator.predicted_x0(scheduler, step, output, t, latents)
            latents = step.prev_sample
    return latents


def draw_grad_steps(num_steps: int, rng: random.Random, strategy: str = "fixed", k: int = 1,
                    k_min: int = 1, k_max: int | None = None, k_mean: float = 8.0, k_std: float = 5.0) -> int:
    """How many final steps carry gradient: ``fixed`` K (DRaFT-K), ``uniform`` in [k_min, k_max] or
    ``gaussian`` round(N(k_mean, k_std)) clipped to [k_min, k_max] (AlignProp's truncation strategies;
    its defaults, truncation point ~ N(42, 5) of 50 steps, are K ~ N(8, 5))."""
    k_max = num_steps if k_max is None else k_max
    if not 1 <= k_min <= k_max <= num_steps:
        raise ConfigError(f"gradient steps range [{k_min}, {k_max}] must lie within 1..{num_steps}")
    if strategy == "fixed":
        if not 1 <= k <= num_steps:
            raise ConfigError(f"draft_k={k} must lie within 1..num_steps={num_steps}")
        return k
    if strategy == "uniform":
        return rng.randint(k_min, k_max)
    if strategy == "gaussian":
        return min(k_max, max(k_min, round(rng.gauss(k_mean, k_std))))
    raise ConfigError(f"unknown truncation {strategy!r}", f"use one of {', '.join(TRUNCATIONS)}")


def negative_reward_loss(rewards: torch.Tensor, grad_scale: float = 1.0) -> torch.Tensor:
    """DRaFT / AlignProp objective: maximise the mean reward, ``-mean(reward) * grad_scale``."""
    return -rewards.mean() * grad_scale
