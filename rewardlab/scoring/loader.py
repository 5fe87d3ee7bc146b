"""``rewardlab.load``: registry name or checkpoint path -> ready Scorer."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import torch

from ..io.checkpoint import CheckpointError, load_strict, read_state_dict
from ..io.hub import resolve_weights
from ..models import blip_reward, get_architecture
from ..registry import ModelSpec, Preprocess, get_spec
from .scorer import Scorer, resolve_device, resolve_dtype

SPEC_METADATA_KEY = "rewardlab_spec"


def spec_to_json(spec: ModelSpec) -> str:
    """Serialise the parts of a spec a checkpoint needs to be loaded back (architecture, options, ...)."""
    return json.dumps({
        "name": spec.name, "architecture": spec.architecture, "max_tokens": spec.max_tokens,
        "uses_prompt": spec.uses_prompt, "normalization": spec.normalization, "licence": spec.licence,
        "description": spec.description, "options": spec.options,
        "preprocess": {"size": spec.preprocess.size, "resize": spec.preprocess.resize,
                       "mean": list(spec.preprocess.mean), "std": list(spec.preprocess.std),
                       "backend": spec.preprocess.backend, "crop": spec.preprocess.crop, "fit": spec.preprocess.fit},
    })


def spec_from_json(text: str) -> ModelSpec:
    data = json.loads(text)
    pre = data.pop("preprocess")
    return ModelSpec(sources=(), preprocess=Preprocess(pre["size"], pre["resize"], tuple(pre["mean"]), tuple(pre["std"]),
                                                       pre.get("backend", "pil"), pre.get("crop", "round"),
                                                       pre.get("fit", "crop")), **data)


def _safetensors_spec(path: Path) -> ModelSpec | None:
    if path.suffix != ".safetensors":
        return None
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        meta = handle.metadata() or {}
    return spec_from_json(meta[SPEC_METADATA_KEY]) if SPEC_METADATA_KEY in meta else None


def detect_spec(path: Path, state: dict[str, torch.Tensor]) -> ModelSpec:
    """Work out which registered model a checkpoint is from its keys (or its embedded rewardlab spec)."""
    embedded = _safetensors_spec(path)
    if embedded is not None:
        return embedded
    head = blip_reward.detect(set(state))
    if head == "linear":
        return get_spec("imagereward-v1.0")
    if head == "gelu":
        return replace(get_spec("cyclereward-combo"), name=f"cyclereward:{path.stem}",
                       description="CycleReward-architecture checkpoint")
    from ..models import detect_other

    spec = detect_other(state)
    if spec is not None:
        return spec
    sample = ", ".join(sorted(state)[:8])
    raise CheckpointError(f"cannot tell which model {path} is from its keys (first keys: {sample}); "
                          "pass a registry name with checkpoint=PATH")


def load(name: str | os.PathLike | ModelSpec, checkpoint: str | os.PathLike | None = None,
         device: str | torch.device | None = None, dtype: str | torch.dtype | None = None) -> Scorer:
    """Load a reward model as a :class:`Scorer`.

    ``name`` is a registry name (``rewardlab.list_models()``), a checkpoint file whose architecture
    is detected from its keys, or a :class:`ModelSpec` (custom configurations). Weights come from
    ``checkpoint`` if given, else the huggingface_hub cache or a download. Every checkpoint key must match the model (missing/unexpected keys raise).
    ``dtype``: fp32 (default on CPU: exact), bf16 (default on CUDA), fp16.
    """
    path_like = None if isinstance(name, ModelSpec) else Path(name).expanduser()
    if path_like is None:
        spec = name
        weights = resolve_weights(spec, checkpoint)
        state = read_state_dict(weights)
    elif checkpoint is None and (path_like.is_file() or path_like.suffix in (".pt", ".pth", ".bin", ".safetensors")):
        weights = str(path_like)
        state = read_state_dict(weights)  # names the file when it is missing or unreadable
        spec = detect_spec(path_like, state)
    else:
        spec = get_spec(str(name))
        weights = resolve_weights(spec, checkpoint)
        state = read_state_dict(weights)
        embedded = _safetensors_spec(Path(weights))
        if embedded is not None:
            spec = replace(embedded, name=spec.name, sources=spec.sources)
    arch = get_architecture(spec.architecture)
    model = arch.build(spec)
    load_strict(model, arch.convert(state, spec), weights, ignore=arch.ignored_keys)
    device = resolve_device(device)
    model.eval().requires_grad_(False).to(device)
    if path_like is not None and checkpoint is None and Path(weights) == path_like:
        label = path_like.name
    elif checkpoint is not None:
        label = f"{spec.name}@{Path(checkpoint).name}"
    else:
        label = spec.name
    return Scorer(spec, model, arch.tokenizer(spec), device, resolve_dtype(dtype, device), checkpoint=weights,
                  label=label)


def save_checkpoint(model: torch.nn.Module, spec: ModelSpec, path: str | os.PathLike) -> None:
    """Save ``model`` as safetensors with ``spec`` embedded, so ``rewardlab.load(path)`` rebuilds it.

    Keys are saved without any ``module.`` prefix (unwrap DDP/accelerate models before calling). The file is
    written to a temporary file in the same folder and renamed over ``path`` (a kill leaves the old file or
    the new one); weights with NaN or infinite values are refused."""
    from safetensors.torch import save

    from ..errors import NonFiniteError
    from ..io.atomic import write_bytes

    state = {k.removeprefix("module."): v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise NonFiniteError(f"refusing to save {path}: non-finite weights in {', '.join(bad[:5])}")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_bytes(path, save(state, metadata={SPEC_METADATA_KEY: spec_to_json(spec)}))
