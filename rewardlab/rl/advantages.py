"""Group-relative advantages for online RL (GRPO / Flow-GRPO), one prompt = one group.

``A_i = (r_i - mean_g) / (std + eps)`` where ``mean_g`` is the mean reward of the items sharing item
i's prompt and ``std`` is the population standard deviation (``ddof=0``) of that group — or of the whole
batch with ``global_std=True``. ``eps`` is added to the standard deviation, not to the variance, so a
group whose rewards are all equal gets advantages of exactly 0. This is the computation of Flow-GRPO's
``PerPromptStatTracker`` for one batch (its tracker is cleared every epoch).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import NonFiniteError, UsageError


def _as_rewards(prompts: Sequence[str], rewards) -> tuple[np.ndarray, np.ndarray]:
    values = np.asarray(rewards.detach().cpu() if hasattr(rewards, "detach") else rewards, dtype=np.float64)
    if values.ndim != 1:
        raise UsageError(f"rewards must be one number per item, got shape {values.shape}")
    keys = list(prompts)
    if len(keys) != values.shape[0]:
        raise UsageError(f"{len(keys)} prompts for {values.shape[0]} rewards", "pass one prompt per reward")
    bad = np.flatnonzero(~np.isfinite(values))
    if bad.size:
        raise NonFiniteError(f"rewards of items {bad[:10].tolist()} are not finite",
                             "drop or fix those items before computing advantages")
    _, inverse = np.unique(np.asarray(keys, dtype=object).astype(str), return_inverse=True)
    return values, inverse.reshape(-1)


def group_advantages(prompts: Sequence[str], rewards, global_std: bool = False, eps: float = 1e-4) -> np.ndarray:
    """Per-prompt standardised rewards: ``(r - mean of its prompt) / (std + eps)`` (population std;
    of the prompt's group, or of the whole batch with ``global_std=True``). Returns float64 [N]."""
    if not (eps >= 0 and np.isfinite(eps)):
        raise UsageError(f"eps={eps} must be a finite number >= 0")
    values, group = _as_rewards(prompts, rewards)
    advantages = np.zeros_like(values)
    batch_std = values.std() if values.size else 0.0
    for g in np.unique(group):
        members = group == g
        own = values[members]
        std = batch_std if global_std else own.std()
        advantages[members] = (own - own.mean()) / (std + eps)
    return advantages


@dataclass(frozen=True)
class GroupStats:
    """``zero_std_ratio``: share of prompts whose rewards are all equal (they give no learning signal);
    ``mean_std``: mean per-prompt population std; ``groups``: number of distinct prompts."""

    zero_std_ratio: float
    mean_std: float
    groups: int


def group_stats(prompts: Sequence[str], rewards) -> GroupStats:
    """Zero-std ratio and mean within-prompt std of a batch (Flow-GRPO logs both)."""
    values, group = _as_rewards(prompts, rewards)
    stds = np.array([values[group == g].std() for g in np.unique(group)])
    if stds.size == 0:
        return GroupStats(0.0, 0.0, 0)
    return GroupStats(float(np.count_nonzero(stds == 0) / stds.size), float(stds.mean()), int(stds.size))
