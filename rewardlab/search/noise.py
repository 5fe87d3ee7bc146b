"""Initial noises for search: seeded Gaussian pools and zero-order neighbours on the pivot's sphere.

Every noise is drawn on the CPU with its own ``torch.Generator`` seeded by an integer, so a recorded seed
reproduces the same tensor on any device and in any batch composition.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ..errors import UsageError


def seed_noise(seed: int, shape: Sequence[int]) -> torch.Tensor:
    """Standard normal noise of ``shape`` (float32, CPU) from ``seed`` alone."""
    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    return torch.randn(tuple(shape), generator=generator, dtype=torch.float32)


def seed_noises(seeds: Sequence[int], shape: Sequence[int]) -> torch.Tensor:
    """A batch ``(len(seeds), *shape)``: one :func:`seed_noise` per seed."""
    return torch.stack([seed_noise(s, shape) for s in seeds]) if seeds else torch.empty((0, *shape))


def neighbours(pivot: torch.Tensor, count: int, threshold: float = 0.95, seed: int = 0) -> torch.Tensor:
    """``count`` noises with exactly the pivot's norm and cosine similarity ``threshold`` to it (float64).

    Each neighbour is ``|p| (t p/|p| + sqrt(1 - t^2) u)`` with ``u`` a random unit direction orthogonal
    to the pivot (a seeded Gaussian with its pivot component removed), so both properties hold exactly
    up to float64 rounding. Cast to the pipeline's dtype only when generating.
    """
    if not 0.0 < threshold < 1.0:
        raise UsageError(f"threshold {threshold} must lie strictly between 0 and 1",
                         "it is the cosine similarity of a neighbour to its pivot (0.95 is the usual value)")
    if count < 1:
        raise UsageError(f"num_neighbors {count} must be at least 1")
    flat = pivot.detach().double().flatten().cpu()
    norm = flat.norm()
    if not math.isfinite(float(norm)) or float(norm) == 0.0:
        raise UsageError("the pivot noise has zero or non-finite norm", "start from a seeded Gaussian noise")
    unit = flat / norm
    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    directions = torch.randn((count, flat.numel()), generator=generator, dtype=torch.float64)
    directions = directions - (directions @ unit)[:, None] * unit[None, :]
    directions = directions - (directions @ unit)[:, None] * unit[None, :]  # second pass: rounding residue
    directions = directions / directions.norm(dim=1, keepdim=True)
    out = norm * (threshold * unit[None, :] + math.sqrt(1.0 - threshold * threshold) * directions)
    return out.reshape((count, *pivot.shape))


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine similarity of two noises (float64)."""
    a, b = a.double().flatten(), b.double().flatten()
    return float(a @ b / (a.norm() * b.norm()))
