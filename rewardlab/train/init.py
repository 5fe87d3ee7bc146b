"""Initial weights for training: random, a reward model, or Salesforce BLIP pretraining checkpoints."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..io.checkpoint import CheckpointError, read_state_dict
from ..models.blip_score import drop_pretraining_keys


def interpolate_pos_embed(pos_embed: torch.Tensor, num_patches: int) -> torch.Tensor:
    """Resize a ViT position table (1, 1 + g*g, D) to ``num_patches`` patches (bicubic on the grid)."""
    old = pos_embed.shape[1] - 1
    if old == num_patches:
        return pos_embed
    old_side, new_side = int(old**0.5), int(num_patches**0.5)
    grid = pos_embed[:, 1:].reshape(1, old_side, old_side, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid.float(), size=(new_side, new_side), mode="bicubic", align_corners=False)
    return torch.cat([pos_embed[:, :1], grid.permute(0, 2, 3, 1).reshape(1, new_side * new_side, -1)], dim=1)


def blip_pretrained_state(path: str) -> dict[str, torch.Tensor]:
    """A BLIP ``model_large.pth``-style state dict with the pretraining-only parts dropped, keyed like
    ``BlipReward.blip``'s children (``blip.visual_encoder.*`` ...)."""
    return {f"blip.{k}": v for k, v in drop_pretraining_keys(read_state_dict(path)).items()}


def load_initial_weights(model: nn.Module, init: str | None) -> str:
    """Fill ``model`` from ``init``: None/"random" (keep), a BLIP pretraining checkpoint (backbone only;
    the head stays freshly initialised), or a reward model (registry name or checkpoint path).

    Every key must be used and every backbone key present; only the head may be missing (BLIP init).
    Returns a description of what was loaded.
    """
    if init in (None, "", "random"):
        return "random initialisation"
    from pathlib import Path

    expected = model.state_dict()
    if Path(init).is_file() and not any(k.startswith("mlp.") for k in read_state_dict(init)):
        state = blip_pretrained_state(init)
        allowed_missing = {k for k in expected if k.startswith("mlp.")}
        source = f"BLIP pretraining checkpoint {init}"
    else:
        from .. import load

        state = load(init, device="cpu").model.state_dict()
        allowed_missing = set()
        source = f"reward model {init}"
    if "blip.visual_encoder.pos_embed" in state:
        state["blip.visual_encoder.pos_embed"] = interpolate_pos_embed(
            state["blip.visual_encoder.pos_embed"], expected["blip.visual_encoder.pos_embed"].shape[1] - 1)
    state = {k: v for k, v in state.items() if not k.endswith("position_ids")}
    missing = sorted(set(expected) - set(state) - allowed_missing)
    unexpected = sorted(set(state) - set(expected))
    shapes = sorted(k for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
    if missing or unexpected or shapes:
        raise CheckpointError(f"cannot initialise from {init}: missing {missing[:8]}, unexpected {unexpected[:8]}, "
                              f"shape mismatch {shapes[:8]}")
    model.load_state_dict({**expected, **state}, strict=True)
    return source
