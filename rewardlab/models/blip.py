"""BLIP backbone: ViT image encoder and BERT text encoder with cross-attention, on PyTorch SDPA.

Parameter names follow the BLIP checkpoints (``visual_encoder.blocks.N.attn.qkv``,
``text_encoder.encoder.layer.N.crossattention.self.key`` ...), so released ImageReward, CycleReward and
Salesforce BLIP state dicts load strictly without a key map.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


@dataclass
class VisionConfig:
    image_size: int = 224
    patch_size: int = 16
    width: int = 1024
    depth: int = 24
    heads: int = 16
    mlp_ratio: float = 4.0
    layer_norm_eps: float = 1e-6
    drop_path: float = 0.1  # stochastic depth at the last block (training only)


@dataclass
class TextConfig:
    vocab_size: int = 30524
    hidden_size: int = 768
    layers: int = 12
    heads: int = 12
    intermediate_size: int = 3072
    max_positions: int = 512
    layer_norm_eps: float = 1e-12
    dropout: float = 0.1
    encoder_width: int = 1024


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, mask, dropout: float) -> torch.Tensor:
    """Multi-head SDPA on (B, N, C) inputs; ``mask`` is a boolean (B, 1, 1, M) key mask or None."""
    b, n, c = q.shape
    m = k.shape[1]
    q = q.view(b, n, heads, c // heads).transpose(1, 2)
    k = k.view(b, m, heads, c // heads).transpose(1, 2)
    v = v.view(b, m, heads, c // heads).transpose(1, 2)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
    return out.transpose(1, 2).reshape(b, n, c)


class PatchEmbed(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.proj = nn.Conv2d(3, cfg.width, kernel_size=cfg.patch_size, stride=cfg.patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.heads = cfg.heads
        self.qkv = nn.Linear(cfg.width, cfg.width * 3)
        self.proj = nn.Linear(cfg.width, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return self.proj(_attention(q, k, v, self.heads, None, 0.0))


class VisionMlp(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        hidden = int(cfg.width * cfg.mlp_ratio)
        self.fc1 = nn.Linear(cfg.width, hidden)
        self.fc2 = nn.Linear(hidden, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class VisionBlock(nn.Module):
    def __init__(self, cfg: VisionConfig, drop_path: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.attn = VisionAttention(cfg)
        self.norm2 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.mlp = VisionMlp(cfg)
        self.drop_path = drop_path

    def _residual(self, x: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
        if self.training and self.drop_path > 0:
            keep = 1.0 - self.drop_path
            mask = x.new_empty(x.shape[0], 1, 1).bernoulli_(keep) / keep
            branch = branch * mask
        return x + branch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._residual(x, self.attn(self.norm1(x)))
        return self._residual(x, self.mlp(self.norm2(x)))


class VisionTransformer(nn.Module):
    """ViT with a class token and learned position embeddings; returns all tokens, final-normed."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.config = cfg
        grid = cfg.image_size // cfg.patch_size
        self.patch_embed = PatchEmbed(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.width))
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid + 1, cfg.width))
        rates = [cfg.drop_path * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]  # linear, 0 at the first block
        self.blocks = nn.ModuleList(VisionBlock(cfg, rate) for rate in rates)
        self.norm = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.gradient_checkpointing = False

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(pixels)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
        x = x + self.pos_embed[:, : x.shape[1]].to(x.dtype)
        for block in self.blocks:
            if self.gradient_checkpointing and self.training:
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return self.norm(x)


class BertEmbeddings(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=0)
        self.position_embeddings = nn.Embedding(cfg.max_positions, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions)[None]
        return self.dropout(self.LayerNorm(x))


class BertSelfAttention(nn.Module):
    def __init__(self, cfg: TextConfig, key_width: int):
        super().__init__()
        self.heads = cfg.heads
        self.dropout = cfg.dropout
        self.query = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.key = nn.Linear(key_width, cfg.hidden_size)
        self.value = nn.Linear(key_width, cfg.hidden_size)

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask) -> torch.Tensor:
        p = self.dropout if self.training else 0.0
        return _attention(self.query(x), self.key(context), self.value(context), self.heads, mask, p)


class BertProjection(nn.Module):
    """Dense + dropout + residual LayerNorm (BERT's post-norm output block)."""

    def __init__(self, cfg: TextConfig, width_in: int):
        super().__init__()
        self.dense = nn.Linear(width_in, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(x)) + residual)


class BertAttention(nn.Module):
    def __init__(self, cfg: TextConfig, key_width: int):
        super().__init__()
        self.self = BertSelfAttention(cfg, key_width)
        self.output = BertProjection(cfg, cfg.hidden_size)

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask) -> torch.Tensor:
        return self.output(self.self(x, context, mask), x)


class BertIntermediate(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(x))


class BertLayer(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.attention = BertAttention(cfg, cfg.hidden_size)
        self.crossattention = BertAttention(cfg, cfg.encoder_width)
        self.intermediate = BertIntermediate(cfg)
        self.output = BertProjection(cfg, cfg.intermediate_size)

    def forward(self, x: torch.Tensor, mask, image_embeds: torch.Tensor | None) -> torch.Tensor:
        x = self.attention(x, x, mask)
        if image_embeds is not None:
            x = self.crossattention(x, image_embeds, None)
        return self.output(self.intermediate(x), x)


class BertEncoder(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(cfg) for _ in range(cfg.layers))


class TextEncoder(nn.Module):
    """BERT encoder whose every layer cross-attends to image tokens (BLIP's image-grounded text encoder).

    Without ``image_embeds`` it is BLIP's unimodal text encoder (cross-attention skipped).
    """

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.config = cfg
        self.embeddings = BertEmbeddings(cfg)
        self.encoder = BertEncoder(cfg)
        self.gradient_checkpointing = False

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, image_embeds=None) -> torch.Tensor:
        x = self.embeddings(input_ids)
        mask = attention_mask.bool()[:, None, None, :]
        for layer in self.encoder.layer:
            if self.gradient_checkpointing and self.training:
                x = checkpoint(layer, x, mask, image_embeds, use_reentrant=False)
            else:
                x = layer(x, mask, image_embeds)
        return x


class BLIPBackbone(nn.Module):
    """ViT + cross-attention text encoder + the two contrastive projections of BLIP."""

    def __init__(self, vision: VisionConfig, text: TextConfig, embed_dim: int = 256):
        super().__init__()
        text.encoder_width = vision.width
        self.visual_encoder = VisionTransformer(vision)
        self.text_encoder = TextEncoder(text)
        self.vision_proj = nn.Linear(vision.width, embed_dim)
        self.text_proj = nn.Linear(text.hidden_size, embed_dim)

    def config_dict(self) -> dict:
        return {"vision": asdict(self.visual_encoder.config), "text": asdict(self.text_encoder.config)}

    def multimodal_cls(self, pixels: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """[CLS] feature of the text encoder cross-attending to the image: (B, hidden)."""
        image_embeds = self.visual_encoder(pixels)
        return self.text_encoder(input_ids, attention_mask, image_embeds)[:, 0]


# -- training hooks shared by the BLIP-backbone reward models ----------------------------------------

# Parts of Salesforce's BLIP pretraining checkpoints (model_large.pth) that the reward models have no use
# for: momentum encoders and projections, the text decoder, the matching head, the queues and temperature.
BLIP_DROPPED_PREFIXES = ("visual_encoder_m.", "text_encoder_m.", "vision_proj_m.", "text_proj_m.", "text_decoder.",
                         "itm_head.")
BLIP_DROPPED_KEYS = ("image_queue", "text_queue", "idx_queue", "ptr_queue", "queue_ptr", "temp")


def drop_pretraining_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A Salesforce BLIP state dict without the pretraining-only parts listed above."""
    return {k: v for k, v in state.items() if not k.startswith(BLIP_DROPPED_PREFIXES) and k not in BLIP_DROPPED_KEYS}


def interpolate_pos_embed(pos_embed: torch.Tensor, num_patches: int) -> torch.Tensor:
    """Resize a ViT position table (1, 1 + g*g, D) to ``num_patches`` patches (bicubic on the grid)."""
    old = pos_embed.shape[1] - 1
    if old == num_patches:
        return pos_embed
    old_side, new_side = int(old**0.5), int(num_patches**0.5)
    grid = pos_embed[:, 1:].reshape(1, old_side, old_side, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid.float(), size=(new_side, new_side), mode="bicubic", align_corners=False)
    return torch.cat([pos_embed[:, :1], grid.permute(0, 2, 3, 1).reshape(1, new_side * new_side, -1)], dim=1)


class BlipHooks:
    """Training hooks of a reward model whose backbone is ``self.blip`` (a :class:`BLIPBackbone`).

    Mixed into :class:`~rewardlab.models.base.RewardModel` subclasses; ``fresh_head`` names the keys a
    BLIP pretraining checkpoint lacks (the reward head)."""

    blip: BLIPBackbone
    fresh_head: tuple[str, ...] = ()

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.blip.visual_encoder.gradient_checkpointing = enable
        self.blip.text_encoder.gradient_checkpointing = enable

    def towers(self) -> dict:
        from .base import Tower

        vit, bert = self.blip.visual_encoder, self.blip.text_encoder
        return {"vision": Tower([vit.patch_embed, vit.cls_token, vit.pos_embed], vit.blocks),
                "text": Tower([bert.embeddings], bert.encoder.layer)}

    def freeze(self, ratio: float) -> None:
        """Freeze the bottom ``ratio`` of the BLIP backbone, exactly as the ImageReward/CycleReward recipe.

        Unused parameters (:meth:`is_unused`) are frozen. Then text-encoder parameters are frozen in
        definition order up to and including the first one whose name contains ``layer.{int(L_text *
        ratio)}`` and ViT parameters up to the first containing ``blocks.{int(L_vision * ratio)}``. As in
        the reference, that first parameter (``...query.weight`` of the text layer, ``norm1.weight`` of the
        ViT block) is frozen while the rest of that layer trains."""
        from .base import check_ratio

        check_ratio(ratio)
        self._freeze_unused()
        if ratio <= 0:
            return
        text, vision = self.blip.text_encoder, self.blip.visual_encoder
        boundaries = ((text, f"layer.{int(text.config.layers * ratio)}"),
                      (vision, f"blocks.{int(vision.config.depth * ratio)}"))
        for encoder, boundary in boundaries:
            for name, param in encoder.named_parameters():
                param.requires_grad_(False)
                if boundary in name:
                    break

    def init_from_pretrained(self, path) -> str:
        """A Salesforce BLIP checkpoint (``model_large.pth``: pretraining-only keys dropped, ViT position
        table interpolated to this image size, the head keeps its fresh weights) or a checkpoint already in
        this model's layout (``blip.*`` keys, head included if present)."""
        from ..io.checkpoint import load_strict, read_state_dict

        state = read_state_dict(path)
        salesforce = not any(k.startswith("blip.") for k in state)
        if salesforce:
            state = {f"blip.{k}": v for k, v in drop_pretraining_keys(state).items()}
        key = "blip.visual_encoder.pos_embed"
        if key in state:
            state[key] = interpolate_pos_embed(state[key], self.blip.visual_encoder.pos_embed.shape[1] - 1)
        kept = load_strict(self, state, str(path), ignore=("position_ids",), allow_missing=self.fresh_head)
        what = "BLIP pretraining checkpoint" if salesforce else "checkpoint"
        return f"{what} {path}" + (f" ({len(kept)} head tensors freshly initialised)" if kept else "")
