"""Validation of architecture options: what a spec (possibly embedded in an untrusted checkpoint) may say.

Every option has a type and a range; unknown options are refused. Sizes are bounded so that a spec can
never describe an absurd model (the model is built on the meta device and checked against the checkpoint's
tensors before any memory is allocated, so these bounds are a second line of defence).
"""

from __future__ import annotations

import math
from typing import Any

from ..errors import CheckpointError

# name -> (type, low, high) for numbers, or (str, allowed values)
INT = int
FLOAT = float

BLIP_VISION = {"image_size": (INT, 16, 1024), "patch_size": (INT, 2, 64), "width": (INT, 8, 4096),
               "depth": (INT, 1, 64), "heads": (INT, 1, 64), "mlp_ratio": (FLOAT, 0.5, 16.0),
               "layer_norm_eps": (FLOAT, 1e-12, 1e-2), "drop_path": (FLOAT, 0.0, 0.9)}
BLIP_TEXT = {"vocab_size": (INT, 16, 300_000), "hidden_size": (INT, 8, 4096), "layers": (INT, 1, 64),
             "heads": (INT, 1, 64), "intermediate_size": (INT, 8, 16_384), "max_positions": (INT, 8, 4096),
             "layer_norm_eps": (FLOAT, 1e-15, 1e-2), "dropout": (FLOAT, 0.0, 0.9), "encoder_width": (INT, 8, 4096)}
CLIP_TOWER = {"hidden_size": (INT, 8, 4096), "intermediate_size": (INT, 8, 16_384),
              "num_hidden_layers": (INT, 1, 64), "num_attention_heads": (INT, 1, 64), "patch_size": (INT, 2, 64),
              "image_size": (INT, 16, 1024), "hidden_act": (str, ("quick_gelu", "gelu")),
              "max_position_embeddings": (INT, 8, 4096), "vocab_size": (INT, 16, 300_000),
              "layer_norm_eps": (FLOAT, 1e-12, 1e-2)}


def _check_value(where: str, key: str, value: Any, rule: tuple) -> Any:
    kind = rule[0]
    if kind is str:
        if value not in rule[1]:
            raise CheckpointError(f"{where}: option {key} must be one of {', '.join(rule[1])}, got {value!r}")
        return value
    _, low, high = rule
    ok_type = isinstance(value, int) if kind is INT else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type or not math.isfinite(value) or not low <= value <= high:
        raise CheckpointError(f"{where}: option {key} must be {'an integer' if kind is INT else 'a number'} "
                              f"in {low}..{high}, got {value!r}")
    return value


def check_section(where: str, name: str, values: Any, rules: dict[str, tuple]) -> dict:
    """Validate one nested options object against ``rules`` (unknown keys refused)."""
    if not isinstance(values, dict):
        raise CheckpointError(f"{where}: option {name} must be an object")
    unknown = sorted(set(values) - set(rules))
    if unknown:
        raise CheckpointError(f"{where}: unknown option(s) {name}.{', '.join(unknown)}")
    return {key: _check_value(where, f"{name}.{key}", value, rules[key]) for key, value in values.items()}


def check_keys(where: str, options: dict, allowed: set[str], required: set[str] = frozenset()) -> None:
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise CheckpointError(f"{where}: unknown option(s) {', '.join(unknown)}")
    missing = sorted(required - set(options))
    if missing:
        raise CheckpointError(f"{where}: missing option(s) {', '.join(missing)}")


def check_number(where: str, key: str, value: Any, low: float = -1e6, high: float = 1e6) -> float:
    return _check_value(where, key, value, (FLOAT, low, high))


def check_heads(where: str, width: int, heads: int, what: str) -> None:
    if width % heads:
        raise CheckpointError(f"{where}: {what} width {width} is not divisible by its {heads} heads")
