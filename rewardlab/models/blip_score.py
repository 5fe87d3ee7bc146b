"""BLIPScore: cosine between BLIP's contrastive image and text embeddings (ITC), on the shared backbone."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..registry import ModelSpec
from .blip import BLIPBackbone, TextConfig, VisionConfig

# Parts of Salesforce's BLIP pretraining checkpoints (model_large.pth) that BLIPScore has no use for:
# momentum encoders and projections, the text decoder, the matching head, the queues and temperature.
BLIP_DROPPED_PREFIXES = ("visual_encoder_m.", "text_encoder_m.", "vision_proj_m.", "text_proj_m.", "text_decoder.",
                         "itm_head.")
BLIP_DROPPED_KEYS = ("image_queue", "text_queue", "idx_queue", "ptr_queue", "queue_ptr", "temp")


def drop_pretraining_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if not k.startswith(BLIP_DROPPED_PREFIXES) and k not in BLIP_DROPPED_KEYS}


class BlipScore(nn.Module):
    def __init__(self, vision: VisionConfig, text: TextConfig):
        super().__init__()
        self.blip = BLIPBackbone(vision, text)

    def forward(self, pixels: torch.Tensor, text: dict[str, torch.Tensor]) -> torch.Tensor:
        image = F.normalize(self.blip.vision_proj(self.blip.visual_encoder(pixels)[:, 0]), dim=-1)
        ids, mask = text["input_ids"], text["attention_mask"]
        if ids.shape[0] > 1 and ids.stride(0) == 0:  # one prompt for the batch: encode it once
            ids, mask = ids[:1], mask[:1]
        words = F.normalize(self.blip.text_proj(self.blip.text_encoder(ids, mask)[:, 0]), dim=-1)
        return (image.float() * words.float()).sum(-1)


def build(spec: ModelSpec) -> BlipScore:
    return BlipScore(VisionConfig(**spec.options.get("vision", {})), TextConfig(**spec.options.get("text", {})))


def convert_state(state: dict[str, torch.Tensor], spec: ModelSpec) -> dict[str, torch.Tensor]:
    """Salesforce layout (``visual_encoder.*``) -> ``blip.visual_encoder.*``, pretraining-only parts dropped."""
    if any(k.startswith("blip.") for k in state):
        return state
    return {f"blip.{k}": v for k, v in drop_pretraining_keys(state).items()}
