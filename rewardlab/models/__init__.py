"""Model architectures: each maps a registry spec to a torch module and a tokenizer."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from ..registry import ModelSpec
from . import blip_reward, blip_score, clip


def _same(state: dict, spec: ModelSpec) -> dict:
    return state


@dataclass(frozen=True)
class Architecture:
    """How to build one family of models: module, tokenizer, checkpoint conversion, keys to ignore."""

    build: Callable[[ModelSpec], nn.Module]
    tokenizer: Callable[[ModelSpec], object]
    ignored_keys: tuple[str, ...] = ()
    convert: Callable[[dict, ModelSpec], dict] = _same  # a released checkpoint's layout -> the module's keys


ARCHITECTURES: dict[str, Architecture] = {
    "blip-reward": Architecture(blip_reward.build, blip_reward.tokenizer, blip_reward.IGNORED_KEYS),
    "blip-score": Architecture(blip_score.build, blip_reward.tokenizer, blip_reward.IGNORED_KEYS, blip_score.convert_state),
    "clip": Architecture(clip.build, clip.tokenizer, ("position_ids",), clip.convert_state),
}


def get_architecture(name: str) -> Architecture:
    try:
        return ARCHITECTURES[name]
    except KeyError:
        raise KeyError(f"unknown architecture {name!r}; known: {', '.join(ARCHITECTURES)}") from None


# Functions that recognise a checkpoint of another architecture from its keys and return its spec.
DETECTORS: list[Callable[[dict], ModelSpec | None]] = []


def detect_other(state: dict) -> ModelSpec | None:
    for detector in DETECTORS:
        spec = detector(state)
        if spec is not None:
            return spec
    return None
