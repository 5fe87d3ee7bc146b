"""BLIPScore: cosine between BLIP's contrastive image and text embeddings (ITC), on the shared backbone."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import CheckpointError
from ..registry import ModelSpec
from .base import RewardModel, row_count, take
from .blip import BLIPBackbone, BlipHooks, TextConfig, VisionConfig, drop_pretraining_keys
from .blip_reward import validate_backbone
from .options import check_keys


class BlipScore(BlipHooks, RewardModel):
    """cos(vision_proj(image [CLS]), text_proj(text [CLS])) with BLIP's unimodal encoders."""

    def __init__(self, vision: VisionConfig, text: TextConfig):
        super().__init__()
        self.blip = BLIPBackbone(vision, text)

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.blip.vision_proj(self.blip.visual_encoder(pixels)[:, 0]), dim=-1)

    def score_features(self, image_features: torch.Tensor, text: dict[str, torch.Tensor],
                       image_index: torch.Tensor | None = None, text_index: torch.Tensor | None = None) -> torch.Tensor:
        """Each distinct text is encoded once (unimodal text encoder), then paired with its rows' images."""
        row_count(image_features.shape[0], text["input_ids"].shape[0], image_index, text_index)
        words = F.normalize(self.blip.text_proj(self.blip.text_encoder(text["input_ids"], text["attention_mask"])[:, 0]),
                            dim=-1)
        return (take(image_features, image_index).float() * take(words, text_index).float()).sum(-1)

    def head_prefixes(self) -> tuple[str, ...]:
        return ("blip.vision_proj.", "blip.text_proj.")

    def is_unused(self, name: str) -> bool:
        return ".crossattention." in name  # the unimodal text encoder skips cross-attention

    def preference_scale(self) -> float:
        """1 / 0.07, BLIP's initial contrastive temperature (the learned one is a pretraining-only key)."""
        return 1 / 0.07


def validate(options: dict, where: str = "spec") -> None:
    check_keys(where, options, {"head", "vision", "text"})
    if options.get("head", "itc") != "itc":
        raise CheckpointError(f"{where}: option head must be 'itc' for BLIPScore")
    validate_backbone(options, where)


def build(spec: ModelSpec) -> BlipScore:
    return BlipScore(VisionConfig(**spec.options.get("vision", {})), TextConfig(**spec.options.get("text", {})))


def convert_state(state: dict[str, torch.Tensor], spec: ModelSpec, backbone: dict | None = None) -> dict[str, torch.Tensor]:
    """Salesforce layout (``visual_encoder.*``) -> ``blip.visual_encoder.*``, pretraining-only parts dropped."""
    if any(k.startswith("blip.") for k in state):
        return state
    return {f"blip.{k}": v for k, v in drop_pretraining_keys(state).items()}
