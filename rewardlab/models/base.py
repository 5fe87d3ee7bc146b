"""The interface every reward architecture implements, so scoring and training never reach inside a model.

A reward module scores *rows*. Images and texts of a batch are encoded once each; ``image_index`` and
``text_index`` say which image and which text each row pairs (None: row i uses item i). One prompt shared
by a batch is one text with ``text_index = zeros``; one image with many captions is one image with
``image_index = zeros``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import UsageError


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


@dataclass
class Tower:
    """One encoder of a model, bottom to top: ``stem`` (embeddings, pre-norms) then ``layers``."""

    stem: list[nn.Module | nn.Parameter]
    layers: nn.ModuleList


def _set_trainable(parts, trainable: bool) -> None:
    for part in parts:
        params = [part] if isinstance(part, nn.Parameter) else part.parameters()
        for param in params:
            param.requires_grad_(trainable)


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

    def towers(self) -> dict[str, Tower]:
        """The model's encoders by name (``vision``, ``text``), for layer freezing."""
        raise NotImplementedError(f"{type(self).__name__} does not list its towers")

    def head_prefixes(self) -> tuple[str, ...]:
        """Parameter-name prefixes that stay trainable under :meth:`freeze_backbone`."""
        raise NotImplementedError(f"{type(self).__name__} does not name its head")

    def is_unused(self, name: str) -> bool:
        """Whether parameter ``name`` never reaches the reward (frozen by every freeze hook, so the
        trainable count is honest)."""
        return False

    def _freeze_unused(self) -> None:
        _set_trainable([p for n, p in self.named_parameters() if self.is_unused(n)], False)

    def freeze_layers(self, vision: int = 0, text: int = 0) -> None:
        """Freeze the bottom ``vision`` / ``text`` layers of each tower, with its stem (embeddings) when
        any layer is frozen; everything above (top layers, final norms, projections, head) trains."""
        counts = {"vision": vision, "text": text}
        towers = self.towers()
        for name, count in counts.items():
            if name not in towers:
                if count:
                    raise UsageError(f"{type(self).__name__} has no {name} tower to freeze layers of")
                continue
            depth = len(towers[name].layers)
            if isinstance(count, bool) or not isinstance(count, int) or not 0 <= count <= depth:
                raise UsageError(f"freeze_layers {name}={count!r}: expected an integer from 0 to {depth} "
                                 f"(the {name} tower has {depth} layers)")
            if count:
                _set_trainable([*towers[name].stem, *towers[name].layers[:count]], False)
        self._freeze_unused()

    def freeze(self, ratio: float) -> None:
        """Freeze the bottom ``ratio`` of every tower (``int(depth * ratio)`` layers and the stem)."""
        check_ratio(ratio)
        self.freeze_layers(**{name: int(len(tower.layers) * ratio) for name, tower in self.towers().items()})

    def freeze_backbone(self) -> None:
        """Train the head only (:meth:`head_prefixes`); every backbone parameter is frozen."""
        head = self.head_prefixes()
        for name, param in self.named_parameters():
            param.requires_grad_(name.startswith(head) and not self.is_unused(name))

    def init_from_pretrained(self, path: str | os.PathLike) -> str:
        """Fill the backbone from a pretraining checkpoint file (strict: every key must be used, only a
        fresh head may be missing). Returns a description of what was loaded."""
        raise NotImplementedError(f"{type(self).__name__} cannot be initialised from a pretrained backbone")

    def preference_scale(self) -> torch.Tensor | float:
        """Factor applied to rewards before the pairwise (Bradley–Terry) loss; 1 for models whose output
        is already a logit."""
        return 1.0

    def param_groups(self, weight_decay: float) -> list[dict]:
        """Trainable parameters for the optimizer: matrices decay, 1-D and scalar ones (norm gains,
        biases, class embeddings, logit scales) do not (open_clip's and HPS v2's rule)."""
        decay, plain = [], []
        for _, param in self.named_parameters():
            if param.requires_grad:
                (decay if param.ndim >= 2 else plain).append(param)
        groups = [{"params": decay, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]
        return [group for group in groups if group["params"]]

    def trainable_summary(self) -> dict:
        """Parameter counts: all, trainable, and the fraction."""
        total = sum(p.numel() for p in self.parameters())
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return {"parameters": total, "trainable": trainable, "trainable_fraction": trainable / total if total else 0.0}


def check_ratio(ratio: float) -> None:
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 <= ratio <= 1.0:
        raise UsageError(f"freeze ratio must be a number in [0, 1], got {ratio!r}")
