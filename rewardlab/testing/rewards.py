"""A differentiable reward with known truth, served through the real :class:`~rewardlab.Scorer`.

``colour_scorer()``: the reward of an image for a prompt naming one of red, green or blue is the mean,
over pixels, of that channel minus the mean of the other two (range [-1, 1]); prompts naming none of
them score 0. The truth is exact and known, depends on the prompt
(so a generator must use its text conditioning to raise it on held-out prompts), and its gradient reaches
every pixel, which is what reward fine-tuning proofs need from a tiny, fast reward.
"""

from __future__ import annotations

import torch

from ..models.base import RewardModel, row_count, take

COLOUR_CHANNELS = {"red": 0, "green": 1, "blue": 2}


class _ColourTokenizer:
    def __call__(self, prompts: list[str], device=None) -> dict[str, torch.Tensor]:
        index = []
        for prompt in prompts:
            words = prompt.lower().replace(",", " ").split()
            index.append(next((COLOUR_CHANNELS[w] for w in words if w in COLOUR_CHANNELS), -1))
        return {"colour": torch.tensor(index, device=device)}


class ColourReward(RewardModel):
    """Mean of the named colour channel minus the mean of the other two, on [0, 1] pixels."""

    def __init__(self):
        super().__init__()
        self.register_buffer("dummy", torch.zeros(()))

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        return pixels.float().mean(dim=(2, 3))  # (B, 3) channel means in [0, 1]

    def score_features(self, image_features: torch.Tensor, text: dict[str, torch.Tensor],
                       image_index: torch.Tensor | None = None, text_index: torch.Tensor | None = None) -> torch.Tensor:
        row_count(image_features.shape[0], text["colour"].shape[0], image_index, text_index)
        channel_means = take(image_features, image_index)
        colour = take(text["colour"], text_index)
        picked = channel_means.gather(1, colour.clamp(min=0).unsqueeze(1)).squeeze(1)
        others = (channel_means.sum(dim=1) - picked) / 2
        return torch.where(colour >= 0, picked - others, torch.zeros_like(picked))


def colour_scorer(size: int = 16, name: str = "colour-truth"):
    """A :class:`~rewardlab.Scorer` of :class:`ColourReward` (identity normalisation, ``size`` px input)."""
    from ..registry import ModelSpec, Preprocess
    from ..scoring.scorer import Scorer

    spec = ModelSpec(name=name, architecture="colour-truth", sources=(),
                     preprocess=Preprocess(size=size, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), backend="tensor"),
                     max_tokens=0, normalization="exact colour contrast in [-1, 1]",
                     description="known-truth test reward")
    return Scorer(spec, ColourReward().eval(), _ColourTokenizer(), torch.device("cpu"), torch.float32)
