"""Bradley–Terry preference loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def bradley_terry_loss(preferred: torch.Tensor, rejected: torch.Tensor, margin: float = 0.0,
                       tie: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of −log σ(r⁺ − r⁻ − margin) over pairs.

    Tied pairs (``tie`` True) are pulled together instead: −½[log σ(Δ) + log σ(−Δ)], minimal at Δ = 0.
    """
    delta = preferred - rejected
    losses = -F.logsigmoid(delta - margin)
    if tie is not None and bool(tie.any()):
        tied = -0.5 * (F.logsigmoid(delta) + F.logsigmoid(-delta))
        losses = torch.where(tie, tied, losses)
    return losses.mean()
