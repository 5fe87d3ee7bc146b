"""Random weights and tiny configurations for tests, examples and parity checks.

This file imports only torch so the parity harness can load it inside the official packages' venv.
"""

from __future__ import annotations

import math

import torch

_EMBEDDINGS = ("word_embeddings.weight", "position_embeddings.weight", "pos_embed", "cls_token")


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Seeded weights with a realistic spread: matrices ~ N(0, 1/fan_in), norm scales ~ 1 + N(0, 0.1),
    embeddings and biases ~ N(0, 0.02). Parameters are visited in name order, so two implementations
    with the same names get the same values."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            noise = torch.randn(param.shape, generator=gen)
            if "norm" in name.lower():
                value = 1.0 + 0.1 * noise if name.endswith("weight") else 0.02 * noise
            elif param.ndim >= 2 and not name.endswith(_EMBEDDINGS):
                value = noise / math.sqrt(math.prod(param.shape[1:]))
            else:
                value = 0.02 * noise
            param.copy_(value.to(param.dtype))


TINY_VISION = {"image_size": 32, "patch_size": 8, "width": 48, "depth": 2, "heads": 2, "drop_path": 0.0}
TINY_TEXT = {"hidden_size": 32, "layers": 2, "heads": 2, "intermediate_size": 64, "max_positions": 64}


def tiny_blip_spec(head: str = "linear", name: str = "tiny-blip-reward", max_tokens: int = 35):
    """A BLIP-reward spec small enough to train on CPU in seconds (32 px images, 2+2 layers)."""
    from ..registry import ModelSpec, Preprocess

    return ModelSpec(
        name=name, architecture="blip-reward", sources=(), preprocess=Preprocess(size=32), max_tokens=max_tokens,
        normalization="raw head output", description="tiny test configuration",
        options={"head": head, "mean": 0.0, "std": 1.0, "vision": dict(TINY_VISION), "text": dict(TINY_TEXT)},
    )


def make_random_checkpoint(path, spec=None, seed: int = 0) -> str:
    """Build ``spec``'s model (default: tiny BLIP reward), randomise it, save it as a rewardlab
    safetensors checkpoint that ``rewardlab.load(path)`` reads back. Returns the path."""
    from ..models import get_architecture
    from ..scoring.loader import save_checkpoint

    spec = spec or tiny_blip_spec()
    model = get_architecture(spec.architecture).build(spec)
    randomize(model, seed)
    save_checkpoint(model, spec, path)
    return str(path)


TINY_CLIP = {"vision": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 4, "num_attention_heads": 2,
                        "patch_size": 8, "image_size": 32, "hidden_act": "gelu"},
             "text": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 4, "num_attention_heads": 2,
                      "hidden_act": "gelu"},
             "projection_dim": 32}


def tiny_clip_spec(output: str = "cosine", name: str = "tiny-clip", max_tokens: int = 16):
    """A CLIP-family spec (the architecture of CLIPScore, HPS v2.1, PickScore, the aesthetic predictor) small
    enough to train on CPU in seconds: 32 px images, 4+4 layers of width 32."""
    from ..registry import ModelSpec, Preprocess

    return ModelSpec(name=name, architecture="clip", sources=(), preprocess=Preprocess(size=32), max_tokens=max_tokens,
                     uses_prompt=output != "aesthetic", normalization=output, description="tiny test configuration",
                     options={"clip": {k: dict(v) if isinstance(v, dict) else v for k, v in TINY_CLIP.items()},
                              "output": output})
