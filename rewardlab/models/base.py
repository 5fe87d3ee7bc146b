"""The interface every reward architecture implements, so scoring and training never reach inside a model.

A reward module scores *rows*. Images and texts of a batch are encoded once each; ``image_index`` and
``text_index`` say which image and which text each row pairs (None: row i uses item i). One prompt shared
by a batch is one text with ``text_index = zeros``; one image with many captions is one image with
``image_index = zeros``.
"""

from __future__ import annotations

import torch
from torch import nn


def row_count(images: int, texts: int, image_index: torch.Tensor | None, text_index: torch.Tensor | None) -> int:
    """Number of scored rows; checks that the indices agree."""
    counts = {len(index) for index in (image_index, text_index) if index is not None}
    if image_index is None:
        counts.add(images)
    if text_index is None:
        counts.add(texts)
    if len(counts) != 1:
        raise ValueError(f"rows disagree: {images} images, {texts} texts, image_index/text_index of lengths {counts}")
    return counts.pop()


def take(values: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
    """``values[index]`` (rows of an encoded batch), or ``values`` itself when ``index`` is None."""
    return values if index is None else values[index.to(values.device)]


class RewardModel(nn.Module):
    """Base class: ``encode_images`` once per image, ``score_features`` per row, hooks for training."""

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Per-image features (B, ...) from normalised pixels (B, 3, S, S)."""
        raise NotImplementedError

    def score_features(self, image_features: torch.Tensor, text: dict[str, torch.Tensor],
                       image_index: torch.Tensor | None = None, text_index: torch.Tensor | None = None) -> torch.Tensor:
        """Reward of each row (float32, shape (rows,)) from encoded images and tokenized texts."""
        raise NotImplementedError

    def forward(self, pixels: torch.Tensor, text: dict[str, torch.Tensor], image_index: torch.Tensor | None = None,
                text_index: torch.Tensor | None = None) -> torch.Tensor:
        return self.score_features(self.encode_images(pixels), text, image_index, text_index)

    # -- training hooks (the trainer calls only these) --------------------------------------------
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute activations in the backward pass of the towers (less memory, same gradients)."""
        raise NotImplementedError(f"{type(self).__name__} does not support gradient checkpointing")
