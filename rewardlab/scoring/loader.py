"""``rewardlab.load``: registry name or checkpoint path -> ready Scorer; ``save_checkpoint`` and ``convert``.

Loading never wastes work or memory: the module is built with its parameters on the meta device (no
random initialisation), the checkpoint is memory-mapped, every key and shape is checked before anything
is allocated, and the checkpoint's tensors are adopted (``assign=True``) rather than copied. A spec
embedded in a checkpoint is untrusted: it is validated field by field and may never name a download.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch

from ..errors import CheckpointError
from ..io.atomic import atomic_path
from ..io.checkpoint import load_strict, read_checkpoint
from ..io.hub import resolve_weights
from ..models import build_on_meta, detect_spec, get_architecture, validate_spec
from ..registry import ModelSpec, get_spec, spec_from_json, spec_to_json
from .scorer import Scorer, resolve_device, resolve_dtype

logger = logging.getLogger(__name__)

SPEC_METADATA_KEY = "rewardlab_spec"
WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")

__all__ = ["load", "load_model", "save_checkpoint", "convert", "spec_to_json", "spec_from_json", "SPEC_METADATA_KEY"]


def _embedded_spec(metadata: dict[str, str], path: Path) -> ModelSpec | None:
    if SPEC_METADATA_KEY not in metadata:
        return None
    spec = spec_from_json(metadata[SPEC_METADATA_KEY], trusted=False, where=f"{path} (embedded spec)")
    validate_spec(spec, f"{path} (embedded spec)")
    return spec


def _looks_like_path(name: str | os.PathLike, checkpoint) -> bool:
    path = Path(name).expanduser()
    return checkpoint is None and (path.is_file() or path.suffix in WEIGHT_SUFFIXES or os.sep in str(name))


def load_model(name: str | os.PathLike | ModelSpec, checkpoint: str | os.PathLike | None = None
               ) -> tuple[ModelSpec, torch.nn.Module, str, str]:
    """(spec, module on CPU in eval mode, weights path, display label) for :func:`load` and the trainer."""
    if isinstance(name, ModelSpec):
        spec = name
        validate_spec(spec)
        weights = resolve_weights(spec.name, spec.sources, checkpoint)
        state, _ = read_checkpoint(weights)
        label = spec.name if checkpoint is None else f"{spec.name}@{Path(checkpoint).name}"
    elif _looks_like_path(name, checkpoint):
        path = Path(name).expanduser()
        weights = str(path)
        state, metadata = read_checkpoint(path)  # names the file when it is missing or unreadable
        spec = _embedded_spec(metadata, path) or detect_spec(set(state), path.stem)
        if spec is None:
            sample = ", ".join(sorted(state)[:6])
            raise CheckpointError(f"cannot tell which model {path} is from its keys (first keys: {sample})",
                                  "pass a registry name with checkpoint=PATH (--model NAME --checkpoint PATH)")
        label = path.name
    else:
        spec = get_spec(str(name))
        weights = resolve_weights(spec.name, spec.sources, checkpoint)
        state, metadata = read_checkpoint(weights)
        embedded = _embedded_spec(metadata, Path(weights))
        if embedded is not None and embedded.architecture != spec.architecture:
            raise CheckpointError(f"checkpoint {weights} holds a {embedded.architecture} model ({embedded.name}), "
                                  f"not a {spec.architecture} model as {spec.name} is",
                                  "pass the matching registry name, or load the file by its path alone")
        if embedded is not None:  # trusted download locations stay the registry's
            spec = replace(embedded, name=spec.name, sources=spec.sources, backbone_sources=spec.backbone_sources)
        label = spec.name if checkpoint is None else f"{spec.name}@{Path(checkpoint).name}"
    arch = get_architecture(spec.architecture)
    model = build_on_meta(spec)
    load_strict(model, arch.convert(state, spec, _backbone_reader(spec)), weights, ignore=arch.ignored_keys, assign=True)
    return spec, model.eval().requires_grad_(False), weights, label


def _backbone_reader(spec: ModelSpec) -> Callable[[], dict[str, torch.Tensor]] | None:
    """The second weight file (aesthetic: the CLIP backbone) from the registry's sources, read on demand."""
    if not spec.backbone_sources:
        return None
    return lambda: read_checkpoint(resolve_weights(f"{spec.name} backbone", spec.backbone_sources))[0]


def load(name: str | os.PathLike | ModelSpec, checkpoint: str | os.PathLike | None = None,
         device: str | torch.device | None = None, dtype: str | torch.dtype | None = None,
         compile: bool = False) -> Scorer:
    """Load a reward model as a :class:`Scorer`.

    ``name`` is a registry name (``rewardlab.list_models()``), a checkpoint file whose architecture is
    detected from its keys (or its embedded rewardlab spec), or a :class:`ModelSpec`. Weights come from
    ``checkpoint`` if given, else the huggingface_hub cache or a download. Every checkpoint key must match the
    model. ``dtype``: fp32 (default on CPU: exact), bf16 (default on CUDA), fp16. ``compile=True`` runs the
    batched forward through ``torch.compile`` (same scores within 1e-5; the first call compiles).
    """
    resolved_device = resolve_device(device)  # options are checked before any file is read
    resolved_dtype = resolve_dtype(dtype, resolved_device)
    spec, model, weights, label = load_model(name, checkpoint)
    model.to(resolved_device)
    arch = get_architecture(spec.architecture)
    scorer = Scorer(spec, model, arch.tokenizer(spec), resolved_device, resolved_dtype, checkpoint=weights,
                    label=label)
    if compile:
        scorer.compile()
    return scorer


def save_checkpoint(model: torch.nn.Module, spec: ModelSpec, path: str | os.PathLike) -> None:
    """Save ``model`` as safetensors with ``spec`` embedded, so ``rewardlab.load(path)`` rebuilds it.

    Written atomically (temporary file in the same folder, fsync, rename). Keys are saved without any
    ``module.`` prefix. Non-finite weights are refused."""
    from safetensors.torch import save_file

    state = {k.removeprefix("module."): v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        from ..errors import NonFiniteError

        raise NonFiniteError(f"refusing to save {path}: non-finite weights in {', '.join(bad[:5])}")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata={SPEC_METADATA_KEY: spec_to_json(spec)})


def convert(source: str | os.PathLike, output: str | os.PathLike, model: str | None = None) -> ModelSpec:
    """Write any supported checkpoint as a safetensors file with its spec embedded (the fastest to load).

    ``model`` names the registry model when ``source`` cannot be recognised from its keys."""
    if Path(output).suffix != ".safetensors":
        raise CheckpointError(f"output {output} must end in .safetensors")
    if Path(output).resolve() == Path(source).resolve():
        raise CheckpointError(f"output {output} is the input file", "choose another output path")
    spec, module, _, _ = load_model(model, checkpoint=source) if model else load_model(source)
    save_checkpoint(module, spec, output)
    return spec
