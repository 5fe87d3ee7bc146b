"""Model registry: one spec record per reward model, kept as data (hub source, preprocessing, head)."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from .errors import CheckpointError, UnknownModelError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class WeightSource:
    """Where a checkpoint file can be downloaded from."""

    kind: str  # "hf" (huggingface_hub) or "url" (plain HTTPS, cached under the hub cache folder)
    location: str  # hub repo id, or the full URL
    filename: str  # file inside the hub repo, or the cached file name for a URL
    revision: str | None = None


@dataclass(frozen=True)
class Preprocess:
    """Image preprocessing: resize the shorter side, centre crop, normalise.

    ``backend``: ``pil`` resizes the 8-bit image with PIL (torchvision-on-PIL, transformers' image
    processors); ``tensor`` converts to a float tensor first and resizes it antialiased (open_clip's
    eval transform). ``crop``: offsets rounded half-to-even (``round``, torchvision) or floored (``floor``,
    transformers). ``fit``: ``crop`` scales the shorter side to ``size`` and crops the centre; ``pad`` scales
    the longer side to ``size`` and pads both sides of the shorter one with black (open_clip's
    ``ResizeMaxSize``, used by HPS v2's scoring)."""

    size: int = 224
    resize: str = "bicubic"
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    backend: str = "pil"
    crop: str = "round"
    fit: str = "crop"

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "spec") -> Preprocess:
        """Validated preprocessing settings (sizes bounded, names from the known sets)."""
        if not isinstance(data, dict):
            raise CheckpointError(f"{where}: preprocess must be an object")
        unknown = sorted(set(data) - {f.name for f in fields(cls)})
        if unknown:
            raise CheckpointError(f"{where}: unknown preprocess field(s) {', '.join(unknown)}")
        values = {**asdict(cls()), **data}
        size = values["size"]
        if isinstance(size, bool) or not isinstance(size, int) or not 8 <= size <= 1024:
            raise CheckpointError(f"{where}: preprocess.size must be an integer in 8..1024, got {size!r}")
        for key, allowed in (("resize", ("bicubic", "bilinear", "nearest")), ("backend", ("pil", "tensor")),
                             ("crop", ("round", "floor")), ("fit", ("crop", "pad"))):
            if values[key] not in allowed:
                raise CheckpointError(f"{where}: preprocess.{key} must be one of {', '.join(allowed)}, "
                                      f"got {values[key]!r}")
        for key in ("mean", "std"):
            triple = values[key]
            if (not isinstance(triple, (list, tuple)) or len(triple) != 3
                    or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                               for v in triple)):
                raise CheckpointError(f"{where}: preprocess.{key} must be three finite numbers, got {triple!r}")
            values[key] = tuple(float(v) for v in triple)
        if min(values["std"]) <= 0:
            raise CheckpointError(f"{where}: preprocess.std must be positive")
        return cls(**values)


def spec_to_json(spec: ModelSpec) -> str:
    """The spec as JSON (what checkpoints embed)."""
    return json.dumps(spec.to_dict())


def spec_from_json(text: str, trusted: bool = True, where: str = "spec") -> ModelSpec:
    """Parse and validate :func:`spec_to_json` output; see :meth:`ModelSpec.from_dict` for ``trusted``."""
    if not isinstance(text, str) or len(text) > 1_000_000:
        raise CheckpointError(f"{where}: the embedded spec is not a string of at most 1 MB")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{where}: the embedded spec is not valid JSON ({exc})") from None
    return ModelSpec.from_dict(data, trusted=trusted, where=where)


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to build, load and describe one reward model."""

    name: str
    architecture: str  # key into rewardlab.models.ARCHITECTURES
    sources: tuple[WeightSource, ...]
    preprocess: Preprocess = Preprocess()
    max_tokens: int = 35
    uses_prompt: bool = True
    normalization: str = "none"  # human-readable description of the output transform
    licence: str = "unknown"
    description: str = ""
    options: dict = field(default_factory=dict)  # architecture-specific build options (validated by the architecture)
    backbone_sources: tuple[WeightSource, ...] = ()  # a second weight file (aesthetic: the CLIP backbone)
    score_range: str = ""  # scale, direction and typical range of the scores (`rewardlab models`)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data of every field (derived from the dataclass, so no field is forgotten)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], trusted: bool = True, where: str = "spec") -> ModelSpec:
        """Rebuild a spec from :meth:`to_dict` data, validating every field's type and range.

        ``trusted=False`` (a spec embedded in a checkpoint file): download sources are dropped — a
        checkpoint may describe its architecture and preprocessing, never where to download from."""
        if not isinstance(data, dict):
            raise CheckpointError(f"{where}: the model spec must be a JSON object, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise CheckpointError(f"{where}: unknown spec field(s) {', '.join(unknown)}",
                                  "the checkpoint was written by a newer rewardlab or was edited")
        values = dict(data)
        for key in ("name", "architecture"):
            if not isinstance(values.get(key), str) or not values[key] or len(values[key]) > 200:
                raise CheckpointError(f"{where}: field {key!r} must be a non-empty string (≤ 200 characters)")
        for key in ("normalization", "licence", "description", "score_range"):
            if key in values and not isinstance(values[key], str):
                raise CheckpointError(f"{where}: field {key!r} must be a string")
        max_tokens = values.get("max_tokens", 35)
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or not 1 <= max_tokens <= 512:
            raise CheckpointError(f"{where}: max_tokens must be an integer in 1..512, got {max_tokens!r}")
        if not isinstance(values.get("uses_prompt", True), bool):
            raise CheckpointError(f"{where}: uses_prompt must be true or false")
        if not isinstance(values.get("options", {}), dict):
            raise CheckpointError(f"{where}: options must be an object")
        values["preprocess"] = Preprocess.from_dict(values.get("preprocess", {}), where)
        if trusted:
            values["sources"] = tuple(WeightSource(**s) for s in values.get("sources", ()))
            values["backbone_sources"] = tuple(WeightSource(**s) for s in values.get("backbone_sources", ()))
        else:
            values["sources"] = ()
            values["backbone_sources"] = ()
        return cls(**values)

    def to_row(self) -> dict[str, str]:
        """A flat description for tables (`rewardlab models`)."""
        src = self.sources[0] if self.sources else None
        return {
            "name": self.name,
            "architecture": self.architecture,
            "weights": (src.location if src.kind == "url" else f"{src.location}/{src.filename}") if src else "-",
            "preprocess": f"{self.preprocess.size}px {self.preprocess.resize} ({self.preprocess.backend})"
                          + (", padded to square" if self.preprocess.fit == "pad" else ""),
            "mean/std": "CLIP" if self.preprocess.mean == CLIP_MEAN else str(self.preprocess.mean),
            "max_tokens": str(self.max_tokens),
            "prompt": "yes" if self.uses_prompt else "ignored",
            "output": self.normalization,
            "range": self.score_range or "-",
            "licence": self.licence,
        }


_REGISTRY: dict[str, ModelSpec] = {}


def register(spec: ModelSpec) -> ModelSpec:
    """Add a spec to the registry (names are case-insensitive)."""
    key = spec.name.lower()
    if key in _REGISTRY:
        raise ValueError(f"model {spec.name!r} is already registered")
    _REGISTRY[key] = spec
    return spec


def get_spec(name: str) -> ModelSpec:
    """Look up a registered model by name."""
    try:
        return _REGISTRY[name.lower()]
    except KeyError:
        import difflib

        close = difflib.get_close_matches(name.lower(), list(_REGISTRY), n=3, cutoff=0.5)
        hint = f"did you mean {', '.join(close)}?" if close else f"registered models: {', '.join(list_models())}"
        raise UnknownModelError(f"unknown model {name!r}", hint + " (`rewardlab models` lists them; a checkpoint "
                                "path also works)") from None


def list_models() -> list[str]:
    """Names of all registered models."""
    return [spec.name for spec in _REGISTRY.values()]


def all_specs() -> list[ModelSpec]:
    return list(_REGISTRY.values())


IMAGEREWARD_MEAN = 0.16717362830052426
IMAGEREWARD_STD = 1.0333394966054072
_CYCLE_RELEASE = "https://github.com/hjbahng/cyclereward/releases/download/v1.0.0"

register(
    ModelSpec(
        name="imagereward-v1.0",
        architecture="blip-reward",
        sources=(WeightSource("hf", "THUDM/ImageReward", "ImageReward.pt"),),
        max_tokens=35,
        normalization=f"(head - {IMAGEREWARD_MEAN}) / {IMAGEREWARD_STD}",
        licence="Apache-2.0",
        description="ImageReward v1.0 (Xu et al. 2023): BLIP ViT-L/16 + cross-attention BERT + linear MLP head.",
        options={"head": "linear", "mean": IMAGEREWARD_MEAN, "std": IMAGEREWARD_STD},
        score_range="higher is better; z-scored head, ~N(0, 1) over generated images (about 62 % in [-1, 1], "
                    "98 % in [-2, 2])",
    )
)
for _variant, _what in (
    ("combo", "trained on both I2T and T2I cycle preferences"),
    ("i2t", "trained on image-to-text cycle preferences (caption ranking)"),
    ("t2i", "trained on text-to-image cycle preferences (image ranking)"),
):
    _file = f"CycleReward-{_variant.capitalize() if _variant == 'combo' else _variant.upper()}"
    register(
        ModelSpec(
            name=f"cyclereward-{_variant}",
            architecture="blip-reward",
            # The hub repos' file layout is not pinned down here: the hub-mixin name first, then the
            # release file name in the same repo, then the GitHub release asset.
            sources=(
                WeightSource("hf", f"carolineec/{_file}", "model.safetensors"),
                WeightSource("hf", f"carolineec/{_file}", f"{_file}.pth"),
                WeightSource("url", f"{_CYCLE_RELEASE}/{_file}.pth", f"{_file}.pth"),
            ),
            max_tokens=128,
            normalization="raw head output",
            licence="MIT",
            description=f"CycleReward (Bahng et al. 2025), {_what}: BLIP ViT-L/16 + GELU MLP head.",
            options={"head": "gelu", "mean": 0.0, "std": 1.0},
            score_range="higher is better; raw head output, unbounded, no documented range (calibrate it)",
        )
    )

# -- the models reward models are compared with ---------------------------------------------------
# CLIP architectures (transformers CLIPConfig fields); kept here so the registry stays plain data.
_VIT_L_14 = {"vision": {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
                        "patch_size": 14, "image_size": 224, "hidden_act": "quick_gelu"},
             "text": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
                      "hidden_act": "quick_gelu"},
             "projection_dim": 768}
_VIT_H_14 = {"vision": {"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32, "num_attention_heads": 16,
                        "patch_size": 14, "image_size": 224, "hidden_act": "gelu"},
             "text": {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
                      "hidden_act": "gelu"},
             "projection_dim": 1024}
_OPENAI_L14 = WeightSource("hf", "openai/clip-vit-large-patch14", "model.safetensors")

register(ModelSpec(
    name="clipscore-vit-l-14", architecture="clip", sources=(_OPENAI_L14,), max_tokens=77,
    normalization="cos(image, text) (ImageReward's CLIP baseline)", licence="MIT",
    description="OpenAI CLIP ViT-L/14 cosine similarity.", options={"clip": _VIT_L_14, "output": "cosine"},
    score_range="higher is better; cosine in [-1, 1], typically ~0.15-0.35 for matching pairs"))
register(ModelSpec(
    name="clipscore-vit-l-14-w2.5", architecture="clip", sources=(_OPENAI_L14,), max_tokens=77,
    normalization="2.5 * max(cos, 0) (CLIPScore, Hessel et al. 2021)", licence="MIT",
    description="Standard CLIPScore on OpenAI CLIP ViT-L/14.", options={"clip": _VIT_L_14, "output": "clipscore", "w": 2.5},
    score_range="higher is better; 2.5 * max(cos, 0) in [0, 2.5], typically ~0.4-0.9"))
register(ModelSpec(
    name="blipscore", architecture="blip-score",
    sources=(WeightSource("url", "https://storage.googleapis.com/sfr-vision-language-research/BLIP/models/model_large.pth",
                          "model_large.pth"),),
    max_tokens=35, normalization="cos(vision_proj(image CLS), text_proj(text CLS))", licence="BSD-3-Clause",
    description="BLIP-L image-text contrastive similarity (ImageReward's BLIP baseline).", options={"head": "itc"},
    score_range="higher is better; cosine in [-1, 1], typically ~0.3-0.5 for matching pairs"))
register(ModelSpec(
    name="aesthetic-laion-v2", architecture="clip",
    sources=(WeightSource("url", "https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/main/"
                          "sac%2Blogos%2Bava1-l14-linearMSE.pth", "sac+logos+ava1-l14-linearMSE.pth"),),
    max_tokens=77, uses_prompt=False, normalization="MLP(L2-normalised CLIP image embedding); the prompt is ignored",
    licence="Apache-2.0 (predictor), MIT (CLIP)",
    description="LAION improved aesthetic predictor v2 on OpenAI CLIP ViT-L/14 image features.",
    options={"clip": _VIT_L_14, "output": "aesthetic"}, backbone_sources=(_OPENAI_L14,),
    score_range="higher is better; regressed on 1-10 ratings, typically ~4-7 (prompt ignored)"))
register(ModelSpec(
    name="hpsv2.1", architecture="clip", sources=(WeightSource("hf", "xswu/HPSv2", "HPS_v2.1_compressed.pt"),),
    preprocess=Preprocess(backend="tensor", fit="pad"),
    max_tokens=77, normalization="cos(image, text) (HPS v2 score)", licence="Apache-2.0",
    description="Human Preference Score v2.1: open_clip ViT-H-14 fine-tuned on HPD v2 (keys converted).",
    options={"clip": _VIT_H_14, "output": "cosine"},
    score_range="higher is better; cosine, typically ~0.25-0.30 (x100 in the HPS v2 examples)"))
register(ModelSpec(
    name="pickscore-v1", architecture="clip", sources=(WeightSource("hf", "yuvalkirstain/PickScore_v1", "model.safetensors"),),
    preprocess=Preprocess(crop="floor"),
    max_tokens=77, normalization="exp(logit_scale) * cos(image, text)", licence="MIT",
    description="PickScore v1: CLIP ViT-H-14 fine-tuned on Pick-a-Pic (processor of laion/CLIP-ViT-H-14-laion2B-s32B-b79K).",
    options={"clip": _VIT_H_14, "output": "logit", "text_cleaning": "none"},
    score_range="higher is better; 100 * cos, typically ~18-23 (Flow-GRPO divides by 26)"))  # AutoProcessor: fast tokenizer, no ftfy
