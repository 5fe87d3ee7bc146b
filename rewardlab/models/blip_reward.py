"""ImageReward / CycleReward: a BLIP backbone whose multimodal [CLS] feature feeds an MLP head."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import CheckpointError
from ..registry import ModelSpec
from .base import RewardModel, row_count, take
from .blip import BLIPBackbone, BlipHooks, TextConfig, VisionConfig
from .options import BLIP_TEXT, BLIP_VISION, check_heads, check_keys, check_number, check_section
from .tokenizer import TextTokenizer, bert_tokenizer

HEAD_WIDTHS = (1024, 128, 64, 16, 1)


def reward_head(width: int, kind: str) -> nn.Sequential:
    """The 5-layer MLP head. ``linear``: ImageReward's (dropout between layers, no activation, keys
    ``layers.{0,2,4,6,7}``); ``gelu``: CycleReward's (GELU between layers, keys ``layers.{0,2,4,6,8}``)."""
    layers: list[nn.Module] = []
    dims = (width, *HEAD_WIDTHS)
    dropouts = (0.2, 0.2, 0.1, None)
    for i in range(len(HEAD_WIDTHS)):
        layers.append(nn.Linear(dims[i], dims[i + 1]))
        if i == len(HEAD_WIDTHS) - 1:
            break
        if kind == "gelu":
            layers.append(nn.GELU())
        elif kind == "linear":
            if dropouts[i] is not None:
                layers.append(nn.Dropout(dropouts[i]))
        else:
            raise ValueError(f"unknown head kind {kind!r} (expected 'linear' or 'gelu')")
    return nn.Sequential(*layers)


class BlipReward(BlipHooks, RewardModel):
    """reward = (head(text_encoder([CLS] | image)) - mean) / std, computed in float32 after the backbone."""

    fresh_head = ("mlp.",)

    def __init__(self, vision: VisionConfig, text: TextConfig, head: str, mean: float = 0.0, std: float = 1.0):
        super().__init__()
        self.blip = BLIPBackbone(vision, text)
        self.mlp = nn.Module()
        self.mlp.layers = reward_head(text.hidden_size, head)
        self.head_kind = head
        self.mean = float(mean)
        self.std = float(std)

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Image tokens (B, 1 + patches, width) of the ViT."""
        return self.blip.visual_encoder(pixels)

    def score_features(self, image_features: torch.Tensor, text: dict[str, torch.Tensor],
                       image_index: torch.Tensor | None = None, text_index: torch.Tensor | None = None) -> torch.Tensor:
        """The text encoder cross-attends to each row's image, so it runs once per row."""
        row_count(image_features.shape[0], text["input_ids"].shape[0], image_index, text_index)
        ids, mask = take(text["input_ids"], text_index), take(text["attention_mask"], text_index)
        cls = self.blip.text_encoder(ids, mask, take(image_features, image_index))[:, 0]
        with torch.autocast(device_type=cls.device.type, enabled=False):
            raw = self.mlp.layers(cls.float()).squeeze(-1)
        return (raw - self.mean) / self.std

    def head_prefixes(self) -> tuple[str, ...]:
        return ("mlp.",)

    def is_unused(self, name: str) -> bool:
        return name.startswith(("blip.vision_proj.", "blip.text_proj."))  # the contrastive (ITC) projections


def validate(options: dict, where: str = "spec") -> None:
    """Types and ranges of a BLIP-reward spec's options (see ``rewardlab.models.options``)."""
    check_keys(where, options, {"head", "mean", "std", "vision", "text"}, {"head"})
    if options["head"] not in ("linear", "gelu"):
        raise CheckpointError(f"{where}: option head must be 'linear' or 'gelu', got {options['head']!r}")
    check_number(where, "mean", options.get("mean", 0.0))
    if check_number(where, "std", options.get("std", 1.0)) <= 0:
        raise CheckpointError(f"{where}: option std must be positive")
    validate_backbone(options, where)


def validate_backbone(options: dict, where: str) -> None:
    vision = check_section(where, "vision", options.get("vision", {}), BLIP_VISION)
    text = check_section(where, "text", options.get("text", {}), BLIP_TEXT)
    v, t = VisionConfig(**vision), TextConfig(**text)
    check_heads(where, v.width, v.heads, "vision")
    check_heads(where, t.hidden_size, t.heads, "text")
    if v.image_size % v.patch_size:
        raise CheckpointError(f"{where}: vision image_size {v.image_size} is not a multiple of patch_size {v.patch_size}")


def build(spec: ModelSpec) -> BlipReward:
    opts = spec.options
    vision = VisionConfig(**opts.get("vision", {}))
    text = TextConfig(**opts.get("text", {}))
    return BlipReward(vision, text, opts["head"], opts.get("mean", 0.0), opts.get("std", 1.0))


def tokenizer(spec: ModelSpec) -> TextTokenizer:
    return TextTokenizer(bert_tokenizer(spec.max_tokens))


def detect(keys: set[str]) -> str | None:
    """'gelu' or 'linear' if ``keys`` are a BLIP reward checkpoint, else None."""
    if "blip.visual_encoder.cls_token" not in keys or "mlp.layers.0.weight" not in keys:
        return None
    if "mlp.layers.8.weight" in keys:
        return "gelu"
    if "mlp.layers.7.weight" in keys:
        return "linear"
    return None


IGNORED_KEYS = ("position_ids",)  # a buffer the official BERT saves; positions are computed here
