"""Which parameters train: the ImageReward/CycleReward freeze-ratio recipe, or head only."""

from __future__ import annotations

from torch import nn


def freeze_ratio(model: nn.Module, ratio: float) -> None:
    """Freeze the bottom ``ratio`` of the BLIP backbone, exactly as the ImageReward/CycleReward recipe.

    The ``*_proj`` contrastive projections (unused by the reward) are frozen. Then text-encoder
    parameters are frozen in definition order up to and including the first one whose name contains
    ``layer.{int(L_text * ratio)}`` and ViT parameters up to the first containing
    ``blocks.{int(L_vision * ratio)}``. As in the reference, that first parameter (``...query.weight``
    of the text layer, ``norm1.weight`` of the ViT block) is frozen while the rest of that layer trains.
    """
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"freeze ratio must be in [0, 1], got {ratio}")
    blip = model.blip
    for name, param in blip.named_parameters():
        if "_proj" in name:
            param.requires_grad_(False)
    if ratio <= 0:
        return
    boundaries = (
        (blip.text_encoder, f"layer.{int(blip.text_encoder.config.layers * ratio)}"),
        (blip.visual_encoder, f"blocks.{int(blip.visual_encoder.config.depth * ratio)}"),
    )
    for encoder, boundary in boundaries:
        for name, param in encoder.named_parameters():
            param.requires_grad_(False)
            if boundary in name:
                break


def freeze_backbone(model: nn.Module) -> None:
    """Train the reward head only."""
    for param in model.blip.parameters():
        param.requires_grad_(False)


def trainable_summary(model: nn.Module) -> dict:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"parameters": total, "trainable": trainable, "trainable_fraction": trainable / total if total else 0.0}
