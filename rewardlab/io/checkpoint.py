"""Reading checkpoints (.pt/.pth/.bin with weights_only, .safetensors) and strict loading."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from ..errors import CheckpointError

_WRAPPER_KEYS = ("state_dict", "model", "module", "model_state_dict")


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a flat ``{name: tensor}`` dict and the file's string metadata (safetensors only) from ``path``.

    Files are memory-mapped where the format allows (``.safetensors``; ``torch.save`` zip files through
    ``torch.load(mmap=True, weights_only=True)``), so tensors are paged in from disk rather than copied.
    Pickles are read with ``weights_only=True`` (no code runs). A dict that wraps the weights under one of
    ``state_dict``/``model``/``module`` is unwrapped, and a ``module.`` prefix (DDP) is stripped."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint file not found: {path}", "check the path")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} is not a regular file (a folder, FIFO or device)",
                              "pass the weights file itself")
    metadata: dict[str, str] = {}
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as handle:
                metadata = dict(handle.metadata() or {})
                state = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
        else:
            try:
                state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as exc:
                if "mmap" not in str(exc) and "zip" not in str(exc):
                    raise
                state = torch.load(str(path), map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except Exception as exc:  # corrupt file, pickle with code objects, ...
        raise CheckpointError(f"cannot read checkpoint {path}: {type(exc).__name__}: {str(exc)[:300]}",
                              "the file is corrupt, truncated, or a pickle that needs code to load (refused)") from exc
    for _ in range(2):
        if isinstance(state, Mapping) and not _is_flat(state):
            inner = next((state[k] for k in _WRAPPER_KEYS if isinstance(state.get(k), Mapping)), None)
            if inner is None:
                break
            state = inner
    if not isinstance(state, Mapping) or not _is_flat(state):
        raise CheckpointError(f"{path} does not hold a state dict of tensors")
    return strip_prefix(dict(state), "module."), metadata


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of :func:`read_checkpoint`."""
    return read_checkpoint(path)[0]


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
    assign: bool = False,
) -> list[str]:
    """Load ``state`` into ``model``; any missing, unexpected or mis-shaped key is an error naming it.

    Keys that end with one of ``ignore`` (non-persistent buffers such as ``position_ids``) are dropped
    from the checkpoint first. Model keys that start with one of ``allow_missing`` (a fresh head when
    initialising from a backbone checkpoint) may be absent: they keep their current values. Returns the
    model keys that were left as they were. Shapes are compared before anything is copied, so a model built
    on the meta device costs no memory until the check passes; ``assign=True`` then adopts the checkpoint's
    tensors (cast to the model's floating dtype) instead of copying them.
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
        raise CheckpointError(f"checkpoint {source} does not match the model: " + "; ".join(problems),
                              "check that the file belongs to this model (pass the right registry name)")
    for key, value in state.items():
        target = expected[key]
        if value.dtype != target.dtype and target.is_floating_point():
            state[key] = value.to(target.dtype)
    model.load_state_dict(state, strict=not kept, assign=assign)
    return kept
