"""CLIP-family reward models on transformers' ``CLIPModel``: CLIPScore, PickScore, HPSv2.1, LAION aesthetic.

One CLIP module serves them all. OpenAI/open_clip checkpoints (``visual.conv1.weight`` ...) are mapped to
transformers' names by :func:`convert_openai_state`; transformers checkpoints load as they are.
"""

from __future__ import annotations

import gzip
import math
from collections.abc import Callable
from functools import cache
from importlib import resources

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CheckpointError
from ..registry import ModelSpec
from .base import RewardModel, Tower, row_count, take
from .options import CLIP_TOWER, check_heads, check_keys, check_number, check_section

AESTHETIC_HEAD = (1024, 128, 64, 16, 1)


def clip_config(options: dict):
    from transformers import CLIPConfig

    arch = options["clip"]
    text = {"vocab_size": 49408, "max_position_embeddings": 77, "bos_token_id": 49406, "eos_token_id": 49407,
            "pad_token_id": 49407, "layer_norm_eps": 1e-5, **arch["text"]}
    vision = {"layer_norm_eps": 1e-5, **arch["vision"]}
    config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=arch["projection_dim"])
    config._attn_implementation = "sdpa"
    return config


class CLIPReward(RewardModel):
    """Image-text similarity of a CLIP model, or an aesthetic MLP on its normalised image embedding.

    ``output``: ``cosine``; ``clipscore`` (w·max(cos, 0)); ``logit`` (exp(logit_scale)·cos);
    ``aesthetic`` (MLP(normalised image embedding), prompt ignored).
    """

    def __init__(self, options: dict):
        super().__init__()
        from transformers import CLIPModel

        self.output = options["output"]
        self.weight = float(options.get("w", 1.0))
        self.clip = CLIPModel(clip_config(options))
        if self.output == "aesthetic":
            dims = (options["clip"]["projection_dim"], *AESTHETIC_HEAD)
            layers: list[nn.Module] = []
            for i in range(len(AESTHETIC_HEAD)):
                layers.append(nn.Linear(dims[i], dims[i + 1]))
                if i < 3:
                    layers.append(nn.Dropout((0.2, 0.2, 0.1)[i]))
            self.mlp = nn.Module()
            self.mlp.layers = nn.Sequential(*layers)  # keys layers.{0,2,4,6,7}, as the LAION predictor

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """L2-normalised projected image embeddings (B, projection_dim)."""
        pooled = self.clip.vision_model(pixel_values=pixels).pooler_output
        return F.normalize(self.clip.visual_projection(pooled), dim=-1)

    def encode_texts(self, text: dict[str, torch.Tensor]) -> torch.Tensor:
        """L2-normalised projected text embeddings (T, projection_dim)."""
        pooled = self.clip.text_model(input_ids=text["input_ids"], attention_mask=text["attention_mask"]).pooler_output
        return F.normalize(self.clip.text_projection(pooled), dim=-1)

    def score_features(self, image_features: torch.Tensor, text: dict[str, torch.Tensor],
                       image_index: torch.Tensor | None = None, text_index: torch.Tensor | None = None) -> torch.Tensor:
        """Each distinct text is encoded once; rows combine embeddings (a product, no per-row tower)."""
        row_count(image_features.shape[0], text["input_ids"].shape[0], image_index, text_index)
        image = take(image_features, image_index)
        if self.output == "aesthetic":
            with torch.autocast(device_type=image.device.type, enabled=False):
                return self.mlp.layers(image.float()).squeeze(-1)
        cosine = (image.float() * take(self.encode_texts(text), text_index).float()).sum(-1)
        if self.output == "cosine":
            return cosine
        if self.output == "clipscore":
            return self.weight * cosine.clamp(min=0)
        if self.output == "logit":
            return self.clip.logit_scale.exp().float() * cosine
        raise ValueError(f"unknown CLIP output {self.output!r}")

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        modern = hasattr(self.clip, "activation_checkpointing_enable")  # transformers 5.x; gradient_* before
        if enable and modern:
            self.clip.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        elif enable:
            self.clip.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        elif modern:
            self.clip.activation_checkpointing_disable()
        else:
            self.clip.gradient_checkpointing_disable()

    # -- training hooks ------------------------------------------------------------------------------
    def towers(self) -> dict[str, Tower]:
        """Vision: patch/class/position embeddings and the pre-norm, then the encoder layers (open_clip's
        ``conv1``, ``class_embedding``, ``positional_embedding``, ``ln_pre``, ``resblocks``); text: token
        and position embeddings, then the layers."""
        vision, text = self.clip.vision_model, self.clip.text_model
        return {"vision": Tower([vision.embeddings, vision.pre_layrnorm], vision.encoder.layers),
                "text": Tower([text.embeddings], text.encoder.layers)}

    def head_prefixes(self) -> tuple[str, ...]:
        if self.output == "aesthetic":
            return ("mlp.",)
        return ("clip.visual_projection.", "clip.text_projection.", "clip.logit_scale")

    def is_unused(self, name: str) -> bool:
        """The aesthetic predictor ignores the prompt: the text tower and the logit scale are unused."""
        return self.output == "aesthetic" and name.startswith(("clip.text_model.", "clip.text_projection.",
                                                                "clip.logit_scale"))

    def preference_scale(self) -> torch.Tensor | float:
        """Cosine outputs: ``exp(logit_scale)`` (at most 100), the temperature of the contrastive
        preference losses HPS v2 and PickScore were trained with; logits and aesthetic scores: 1."""
        if self.output in ("cosine", "clipscore"):
            return self.clip.logit_scale.clamp(max=math.log(100)).exp().float()
        return 1.0

    def init_from_pretrained(self, path) -> str:
        """An OpenAI CLIP / open_clip (``visual.conv1.weight`` ...) or transformers ``CLIPModel`` checkpoint
        into both towers, projections and logit scale; the aesthetic MLP keeps its fresh weights."""
        from ..errors import CheckpointError
        from ..io.checkpoint import load_strict, read_state_dict

        try:
            state = convert_openai_state(read_state_dict(path))
        except CheckpointError as exc:
            raise CheckpointError(f"{path}: {exc.message}", exc.hint) from None
        kept = load_strict(self, state, str(path), ignore=("position_ids",),
                           allow_missing=("mlp.",) if self.output == "aesthetic" else ())
        return f"CLIP checkpoint {path}" + (f" ({len(kept)} head tensors freshly initialised)" if kept else "")


OUTPUTS = ("cosine", "clipscore", "logit", "aesthetic")


def validate(options: dict, where: str = "spec") -> None:
    """Types and ranges of a CLIP-family spec's options."""
    check_keys(where, options, {"clip", "output", "w", "text_cleaning"}, {"clip", "output"})
    if options["output"] not in OUTPUTS:
        raise CheckpointError(f"{where}: option output must be one of {', '.join(OUTPUTS)}, got {options['output']!r}")
    if options.get("text_cleaning", "openai") not in ("openai", "none"):
        raise CheckpointError(f"{where}: option text_cleaning must be 'openai' or 'none'")
    check_number(where, "w", options.get("w", 1.0), 0.0, 100.0)
    arch = options["clip"]
    if not isinstance(arch, dict):
        raise CheckpointError(f"{where}: option clip must be an object")
    check_keys(where, arch, {"vision", "text", "projection_dim"}, {"vision", "text", "projection_dim"})
    check_number(where, "clip.projection_dim", arch["projection_dim"], 8, 4096)
    for tower in ("vision", "text"):
        values = check_section(where, f"clip.{tower}", arch[tower], CLIP_TOWER)
        if "hidden_size" in values and "num_attention_heads" in values:
            check_heads(where, values["hidden_size"], values["num_attention_heads"], tower)


def build(spec: ModelSpec) -> CLIPReward:
    return CLIPReward(spec.options)


# -- checkpoint conversion --------------------------------------------------------------------------

# Scalars OpenAI's JIT archives keep next to the weights (the reference loader deletes them too).
OPENAI_METADATA_KEYS = ("input_resolution", "context_length", "vocab_size")


class _Recorded(dict):
    """A dict that remembers which keys were read."""

    def __init__(self, values: dict):
        super().__init__(values)
        self.used: set[str] = set()

    def __getitem__(self, key):
        self.used.add(key)
        try:
            return super().__getitem__(key)
        except KeyError:
            from ..errors import CheckpointError

            raise CheckpointError(f"OpenAI/open_clip-layout CLIP checkpoint lacks {key!r}") from None


def convert_openai_state(state: dict[str, torch.Tensor], prefix: str = "clip.") -> dict[str, torch.Tensor]:
    """OpenAI CLIP / open_clip state dict -> transformers ``CLIPModel`` names (fused qkv split, projections
    transposed). Keys already in transformers' layout pass through with ``prefix`` added; keys the mapping
    does not know are kept (prefixed), so strict loading reports them instead of dropping them silently."""
    if "visual.conv1.weight" not in state:
        return {(k if k.startswith(prefix) or k.startswith("mlp.") else prefix + k): v for k, v in state.items()}
    state = _Recorded(state)
    out: dict[str, torch.Tensor] = {}

    def tower(src: str, dst: str) -> None:
        blocks = f"{src}transformer.resblocks."
        layer_ids = sorted({int(k[len(blocks):].split(".")[0]) for k in state if k.startswith(blocks)})
        for i in layer_ids:
            s, d = f"{src}transformer.resblocks.{i}.", f"{prefix}{dst}.encoder.layers.{i}."
            q, k, v = state[s + "attn.in_proj_weight"].chunk(3)
            qb, kb, vb = state[s + "attn.in_proj_bias"].chunk(3)
            out.update({d + "self_attn.q_proj.weight": q, d + "self_attn.k_proj.weight": k, d + "self_attn.v_proj.weight": v,
                        d + "self_attn.q_proj.bias": qb, d + "self_attn.k_proj.bias": kb, d + "self_attn.v_proj.bias": vb,
                        d + "self_attn.out_proj.weight": state[s + "attn.out_proj.weight"],
                        d + "self_attn.out_proj.bias": state[s + "attn.out_proj.bias"],
                        d + "layer_norm1.weight": state[s + "ln_1.weight"], d + "layer_norm1.bias": state[s + "ln_1.bias"],
                        d + "layer_norm2.weight": state[s + "ln_2.weight"], d + "layer_norm2.bias": state[s + "ln_2.bias"],
                        d + "mlp.fc1.weight": state[s + "mlp.c_fc.weight"], d + "mlp.fc1.bias": state[s + "mlp.c_fc.bias"],
                        d + "mlp.fc2.weight": state[s + "mlp.c_proj.weight"], d + "mlp.fc2.bias": state[s + "mlp.c_proj.bias"]})

    tower("visual.", "vision_model")
    tower("", "text_model")
    v, t = f"{prefix}vision_model.", f"{prefix}text_model."
    out.update({
        v + "embeddings.class_embedding": state["visual.class_embedding"],
        v + "embeddings.patch_embedding.weight": state["visual.conv1.weight"],
        v + "embeddings.position_embedding.weight": state["visual.positional_embedding"],
        v + "pre_layrnorm.weight": state["visual.ln_pre.weight"], v + "pre_layrnorm.bias": state["visual.ln_pre.bias"],
        v + "post_layernorm.weight": state["visual.ln_post.weight"], v + "post_layernorm.bias": state["visual.ln_post.bias"],
        f"{prefix}visual_projection.weight": state["visual.proj"].t().contiguous(),
        t + "embeddings.token_embedding.weight": state["token_embedding.weight"],
        t + "embeddings.position_embedding.weight": state["positional_embedding"],
        t + "final_layer_norm.weight": state["ln_final.weight"], t + "final_layer_norm.bias": state["ln_final.bias"],
        f"{prefix}text_projection.weight": state["text_projection"].t().contiguous(),
        f"{prefix}logit_scale": state["logit_scale"],
    })
    out.update({k: v for k, v in state.items() if k.startswith("mlp.")})
    out.update({prefix + k: v for k, v in state.items()
                if k not in state.used and not k.startswith("mlp.") and k not in OPENAI_METADATA_KEYS})
    return out


def convert_state(state: dict[str, torch.Tensor], spec: ModelSpec,
                  backbone: Callable[[], dict[str, torch.Tensor]] | None = None) -> dict[str, torch.Tensor]:
    """Any accepted layout -> this module's keys (renames only). The aesthetic predictor's own file holds only
    the MLP (``layers.*``); ``backbone`` (from the loader) reads the spec's ``backbone_sources`` on demand."""
    if spec.options["output"] == "aesthetic" and state and all(k.startswith("layers.") for k in state):
        if backbone is None:
            raise CheckpointError(f"{spec.name}: this file holds only the aesthetic predictor (layers.*)",
                                  "load it as rewardlab.load('aesthetic-laion-v2', checkpoint=PATH) so the CLIP "
                                  "backbone is fetched, or pass a full rewardlab checkpoint")
        return {**convert_openai_state(backbone()), **{f"mlp.{k}": v for k, v in state.items()}}
    return convert_openai_state(state)


# -- tokenizer --------------------------------------------------------------------------------------

CLIP_TOKENIZER_FILE = "clip_tokenizer.json"


def _byte_chars() -> list[str]:
    """CLIP's byte-level alphabet in vocabulary order: printable bytes as themselves, then the other
    bytes mapped to code points from 256 on, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + n) for n in range(len(others))]


def build_clip_tokenizer():
    """CLIP's byte-level BPE (49,408 tokens) built from the vocabulary file shipped in the package
    (openai-clip's ``bpe_simple_vocab_16e6.txt.gz``, MIT). ``scripts/build_clip_tokenizer.py`` saves it as
    ``assets/clip_tokenizer.json``, which :func:`clip_bpe_tokenizer` loads; a test checks they are equal."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    path = resources.files("rewardlab.models") / "assets" / "bpe_simple_vocab_16e6.txt.gz"
    with gzip.open(str(path), "rt", encoding="utf-8") as handle:
        lines = handle.read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    chars = _byte_chars()
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: i for i, token in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab, merges, end_of_word_suffix="</w>", unk_token="<|endoftext|>", fuse_unk=False))
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""),
                             behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>", special_tokens=[("<|startoftext|>", 49406), ("<|endoftext|>", 49407)])
    tok.add_special_tokens(["<|startoftext|>", "<|endoftext|>"])
    return tok


@cache
def clip_bpe_tokenizer(max_tokens: int = 77):
    """The shipped ``clip_tokenizer.json`` (loaded by ``tokenizers``), truncating to ``max_tokens`` and padding
    with ``<|endoftext|>``."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(resources.files("rewardlab.models") / "assets" / CLIP_TOKENIZER_FILE))
    tok.enable_truncation(max_length=max_tokens)
    tok.enable_padding(pad_id=49407, pad_token="<|endoftext|>")
    return tok


def clean_prompt(text: str) -> str:
    """OpenAI CLIP's / open_clip's prompt cleaning: ``ftfy.fix_text`` (curly quotes, full-width forms, mojibake
    ...), then HTML entities decoded twice, then stripped."""
    import html

    from ftfy import fix_text

    return html.unescape(html.unescape(fix_text(text))).strip()


def tokenizer(spec: ModelSpec):
    """CLIP BPE. ``options["text_cleaning"]``: ``openai`` (default; ``clip``/open_clip tokenizers: ftfy + HTML
    unescaping) or ``none`` (transformers' fast CLIP tokenizer, which models served by a transformers processor
    see: curly quotes and entities are kept)."""
    from .tokenizer import TextTokenizer

    cleaning = spec.options.get("text_cleaning", "openai")
    if cleaning not in ("openai", "none"):
        raise ValueError(f"{spec.name}: unknown text_cleaning {cleaning!r} (expected 'openai' or 'none')")
    return TextTokenizer(clip_bpe_tokenizer(spec.max_tokens), clean=clean_prompt if cleaning == "openai" else None)
