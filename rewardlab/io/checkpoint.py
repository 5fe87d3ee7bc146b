"""Reading checkpoints (.pt/.pth/.bin with weights_only, .safetensors) and strict loading."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from ..errors import CheckpointError

_WRAPPER_KEYS = ("state_dict", "model", "module", "model_state_dict")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a flat ``{name: tensor}`` dict from ``path``.

    ``.safetensors`` files are memory-mapped; anything else is read with ``torch.load(weights_only=True)``.
    A dict that wraps the weights under one of ``state_dict``/``model``/``module`` is unwrapped, and a
    ``module.`` prefix (DistributedDataParallel) is stripped from every key.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt file, pickle with code objects, ...
        raise CheckpointError(f"cannot read checkpoint {path}: {exc}") from exc
    for _ in range(2):
        if isinstance(state, Mapping) and not _is_flat(state):
            inner = next((state[k] for k in _WRAPPER_KEYS if isinstance(state.get(k), Mapping)), None)
            if inner is None:
                break
            state = inner
    if not isinstance(state, Mapping) or not _is_flat(state):
        raise CheckpointError(f"{path} does not hold a state dict of tensors")
    return strip_prefix(dict(state), "module.")


def _is_flat(state: Mapping) -> bool:
    return bool(state) and all(isinstance(v, torch.Tensor) for v in state.values())


def strip_prefix(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Remove ``prefix`` from keys that start with it (DDP's ``module.``)."""
    if any(k.startswith(prefix) for k in state):
        return {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in state.items()}
    return state


def _summarise(keys: list[str], limit: int = 12) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def load_strict(
    model: nn.Module,
    state: Mapping[str, torch.Tensor],
    source: str,
    ignore: tuple[str, ...] = (),
    allow_missing: tuple[str, ...] = (),
) -> list[str]:
    """Load ``state`` into ``model``; any missing, unexpected or mis-shaped key is an error naming it.

    Keys that end with one of ``ignore`` (non-persistent buffers such as ``position_ids``) are dropped
    from the checkpoint first. Model keys that start with one of ``allow_missing`` (a fresh head when
    initialising from a backbone checkpoint) may be absent: they keep their current values. Returns the
    model keys that were left as they were.
    """
    state = {k: v for k, v in state.items() if not k.endswith(ignore)} if ignore else dict(state)
    expected = model.state_dict()
    kept = sorted(k for k in set(expected) - set(state) if allow_missing and k.startswith(allow_missing))
    missing = sorted(set(expected) - set(state) - set(kept))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = sorted(
        f"{k} (checkpoint {tuple(state[k].shape)}, model {tuple(expected[k].shape)})"
        for k in set(state) & set(expected)
        if state[k].shape != expected[k].shape
    )
    problems = []
    if missing:
        problems.append(f"missing keys: {_summarise(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_summarise(unexpected)}")
    if wrong_shape:
        problems.append(f"shape mismatch: {_summarise(wrong_shape)}")
    if problems:
        raise CheckpointError(f"checkpoint {source} does not match the model: " + "; ".join(problems))
    model.load_state_dict(state, strict=not kept)
    return kept
