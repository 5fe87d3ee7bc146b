"""Model architectures: each maps a registry spec to a reward module, a tokenizer and its checkpoint hooks."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from ..errors import CheckpointError
from ..registry import ModelSpec, get_spec
from . import blip_reward, blip_score, clip
from .base import RewardModel


def _same(state: dict, spec: ModelSpec, backbone: dict | None = None) -> dict:
    return state


def _never(keys: set[str], name: str) -> ModelSpec | None:
    return None


@dataclass(frozen=True)
class Architecture:
    """How to build one family of models.

    ``build`` makes the module, ``tokenizer`` its text tokenizer, ``validate`` checks a spec's options (types,
    ranges, known names), ``convert`` renames a released checkpoint's keys to the module's (renames only),
    ``detect`` recognises a checkpoint of this family from its keys and returns its spec, ``ignored_keys``
    are non-persistent buffers some checkpoints carry."""

    build: Callable[[ModelSpec], RewardModel]
    tokenizer: Callable[[ModelSpec], object]
    validate: Callable[[dict, str], None]
    ignored_keys: tuple[str, ...] = ()
    convert: Callable[..., dict] = _same
    detect: Callable[[set[str], str], ModelSpec | None] = _never


def _detect_blip_reward(keys: set[str], name: str) -> ModelSpec | None:
    head = blip_reward.detect(keys)
    if head == "linear":
        return get_spec("imagereward-v1.0")
    if head == "gelu":
        return replace(get_spec("cyclereward-combo"), name=f"cyclereward:{name}", sources=(),
                       description="CycleReward-architecture checkpoint")
    return None


ARCHITECTURES: dict[str, Architecture] = {
    "blip-reward": Architecture(blip_reward.build, blip_reward.tokenizer, blip_reward.validate,
                                blip_reward.IGNORED_KEYS, detect=_detect_blip_reward),
    "blip-score": Architecture(blip_score.build, blip_reward.tokenizer, blip_score.validate, blip_reward.IGNORED_KEYS,
                               blip_score.convert_state),
    "clip": Architecture(clip.build, clip.tokenizer, clip.validate, ("position_ids",), clip.convert_state),
}


def get_architecture(name: str) -> Architecture:
    try:
        return ARCHITECTURES[name]
    except KeyError:
        raise CheckpointError(f"unknown architecture {name!r}", f"known: {', '.join(ARCHITECTURES)}") from None


def detect_spec(keys: set[str], name: str) -> ModelSpec | None:
    """The spec of the first architecture that recognises a checkpoint with these keys, else None."""
    for arch in ARCHITECTURES.values():
        spec = arch.detect(keys, name)
        if spec is not None:
            return spec
    return None


def validate_spec(spec: ModelSpec, where: str = "spec") -> None:
    """Check a spec's architecture and options before anything is built."""
    get_architecture(spec.architecture).validate(spec.options, f"{where} ({spec.name})")


def build_on_meta(spec: ModelSpec) -> RewardModel:
    """Build ``spec``'s module with its parameters on the meta device: no memory and no random
    initialisation; buffers stay real. Load real weights with ``load_state_dict(..., assign=True)``."""
    validate_spec(spec)
    with parameters_on_meta():
        return get_architecture(spec.architecture).build(spec)


_INIT_FUNCTIONS = ("uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "eye_", "dirac_",
                   "xavier_uniform_", "xavier_normal_", "kaiming_uniform_", "kaiming_normal_", "orthogonal_", "sparse_")


class parameters_on_meta:  # noqa: N801 - used as a context manager
    """While active, every parameter registered on a module goes to the meta device (buffers stay real) and
    ``torch.nn.init`` does nothing: the model costs no memory and no initialisation, and no operator runs on
    a meta tensor (the first one imports torch's meta kernels, seconds of cold start). The same idea as
    accelerate's ``init_empty_weights(include_buffers=False)`` plus transformers' ``no_init_weights``, without
    importing either. Not thread-safe: it patches torch globally while a model is being built."""

    def __enter__(self):
        self._register = torch.nn.Module.register_parameter
        self._padding = torch.nn.Embedding._fill_padding_idx_with_zero
        self._init = {name: getattr(torch.nn.init, name) for name in _INIT_FUNCTIONS}
        register = self._register

        def register_on_meta(module, name, param):
            register(module, name, param)
            if param is not None and not param.is_meta:
                module._parameters[name] = torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

        def skip(tensor, *args, **kwargs):
            return tensor

        torch.nn.Module.register_parameter = register_on_meta
        torch.nn.Embedding._fill_padding_idx_with_zero = lambda module: None
        for name in _INIT_FUNCTIONS:
            setattr(torch.nn.init, name, skip)
        return self

    def __exit__(self, *exc) -> None:
        torch.nn.Module.register_parameter = self._register
        torch.nn.Embedding._fill_padding_idx_with_zero = self._padding
        for name, function in self._init.items():
            setattr(torch.nn.init, name, function)
