"""Which denoiser parameters train: LoRA adapters (peft) or the whole network; saving them."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..errors import ConfigError
from ..io.atomic import new_version_dir, publish_version

logger = logging.getLogger(__name__)

DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


def add_lora(denoiser: torch.nn.Module, rank: int = 4, alpha: float | None = None,
             targets: tuple[str, ...] | list[str] = DEFAULT_TARGETS, seed: int = 0) -> None:
    """Freeze ``denoiser`` and add a LoRA adapter (B = 0 at start, so the model is unchanged)."""
    from peft import LoraConfig

    if rank < 1:
        raise ConfigError(f"lora_rank={rank} must be >= 1")
    denoiser.requires_grad_(False)
    config = LoraConfig(r=rank, lora_alpha=float(alpha if alpha is not None else rank),
                        init_lora_weights="gaussian", target_modules=list(targets))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            denoiser.add_adapter(config)
        except ValueError as exc:
            raise ConfigError(f"LoRA targets {list(targets)}: {exc}", "name attention projections such as "
                              "to_q, to_k, to_v, to_out.0") from None


def trainable_state(denoiser: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that train, by name (what resumable state stores)."""
    return {name: p for name, p in denoiser.named_parameters() if p.requires_grad}


def lora_layers(denoiser: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict]:
    """The adapter weights (peft naming; the generator's ``save_lora`` converts what its pipeline class
    expects), and the adapter config (rank, alpha, targets)."""
    from peft.utils import get_peft_model_state_dict

    layers = get_peft_model_state_dict(denoiser)
    layers = {k: v.detach().to("cpu", torch.float32, copy=True).contiguous() for k, v in layers.items()}
    return layers, denoiser.peft_config["default"].to_dict()


def save_lora(generator, denoiser: torch.nn.Module, root: str | Path, name: str = "final") -> Path:
    """Publish ``root/name/pytorch_lora_weights.safetensors`` atomically; ``pipeline.load_lora_weights``
    reads that folder."""
    layers, metadata = lora_layers(denoiser)
    folder = new_version_dir(root, name)
    generator.save_lora(folder, layers, metadata)
    return publish_version(root, folder, name)


def save_full(denoiser: torch.nn.Module, root: str | Path, name: str = "final") -> Path:
    """Publish the whole fine-tuned denoiser as a diffusers model folder (``from_pretrained`` reads it)."""
    folder = new_version_dir(root, name)
    denoiser.save_pretrained(folder, safe_serialization=True)
    return publish_version(root, folder, name)
