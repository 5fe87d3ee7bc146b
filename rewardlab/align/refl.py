"""ReFL (Xu et al. 2023, ImageReward): reward feedback learning at one late denoising step.

One ReFL step, as ImageReward's ``ReFL.py`` does it:

1. ``scheduler.set_timesteps(40)``; draw the stop index ``mid`` uniformly from 30..39 (inclusive);
2. run steps ``0 .. mid-1`` without gradient (no classifier-free guidance in the training pass);
3. one denoiser call with gradient at ``timesteps[mid]``; the scheduler step's ``pred_original_sample``
   is the predicted x0;
4. ``vae.decode(x0 / scaling_factor)``, pixels ``(x / 2 + 0.5).clamp(0, 1)``;
5. loss ``relu(margin - reward).mean() * grad_scale`` with margin 2.0 and grad_scale 1e-3.
"""

from __future__ import annotations

import random

import torch

from ..diffusion.adapters import Conditioning, Generator
from ..errors import ConfigError
from .backprop import sample_with_grad_window

REFL_STEPS = 40
REFL_STOP_RANGE = (30, 39)
REFL_MARGIN = 2.0
REFL_GRAD_SCALE = 1e-3


def draw_stop_index(rng: random.Random, low: int = REFL_STOP_RANGE[0], high: int = REFL_STOP_RANGE[1]) -> int:
    """The step whose x0 prediction is rewarded, uniform in [low, high] inclusive."""
    return rng.randint(low, high)


def refl_loss(rewards: torch.Tensor, margin: float = REFL_MARGIN, grad_scale: float = REFL_GRAD_SCALE) -> torch.Tensor:
    """``relu(margin - reward).mean() * grad_scale``: images already scoring above ``margin`` get no gradient."""
    return torch.relu(margin - rewards).mean() * grad_scale


def refl_x0(generator: Generator, denoiser, scheduler, latents: torch.Tensor, conditioning: Conditioning,
            stop_index: int, num_steps: int = REFL_STEPS, gradient_checkpointing: bool = False,
            noise_generator: torch.Generator | None = None) -> torch.Tensor:
    """Predicted x0 latents at ``stop_index`` of a ``num_steps`` schedule, with gradient from that one call."""
    if not 0 <= stop_index < num_steps:
        raise ConfigError(f"ReFL stop index {stop_index} is outside 0..{num_steps - 1}")
    return sample_with_grad_window(generator, denoiser, scheduler, latents, conditioning, num_steps,
                                   grad_from=stop_index, stop_at=stop_index, guidance_scale=1.0,
                                   gradient_checkpointing=gradient_checkpointing, noise_generator=noise_generator)
