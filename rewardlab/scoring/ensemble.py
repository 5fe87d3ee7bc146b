"""Several reward models as one reward: weighted sums, z-scores from calibration statistics, rank fusion.

Used by fine-tuning (differentiable weighted rewards), search (verifier ensembles), pair building and
the RL reward functions, so every place that combines rewards combines them the same way.

Normalisations (``normalize``):

- ``none``: ``sum_m w_m * s_m`` on raw scores. Scales differ by orders of magnitude between models
  (ImageReward ~N(0, 1), HPS v2.1 cosine ~0.27, PickScore 100·cos), so raw sums are dominated by one model.
- ``zscore``: ``sum_m w_m * (s_m - mean_m) / std_m`` with each model's calibration statistics
  (``rewardlab calibrate``); without statistics for a model, the batch's own mean/std (population) is used.
- ``rank``: ``sum_m w_m * r_m / (n - 1)`` where ``r_m`` is the 0-based ascending rank of the item among
  the ``n`` items of the call for model ``m`` (ties get their average rank); ``borda`` is the same
  without the division (Borda points). Rank fusion is not differentiable.

Weights are used as given (not renormalised). Non-finite scores raise :class:`NonFiniteError` naming
the model and item: they are never silently combined.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import ConfigError, NonFiniteError, UsageError

logger = logging.getLogger(__name__)

NORMALIZATIONS = ("none", "zscore", "rank", "borda")
DIFFERENTIABLE = ("none", "zscore")


@dataclass(frozen=True)
class RewardTerm:
    """One model of a combined reward: registry name or checkpoint path, and its weight."""

    model: str
    weight: float = 1.0


def parse_reward(text: str) -> RewardTerm:
    """``NAME`` or ``NAME:WEIGHT`` (``pickscore-v1:0.5``); a path containing ``:`` keeps it when the part
    after the last ``:`` is not a number."""
    head, sep, tail = text.rpartition(":")
    if sep and head:
        try:
            weight = float(tail)
        except ValueError:
            return RewardTerm(text)
        if not math.isfinite(weight):
            raise UsageError(f"reward {text!r}: weight {tail} is not finite", "use NAME:WEIGHT with a finite number")
        return RewardTerm(head, weight)
    return RewardTerm(text)


@dataclass(frozen=True)
class Calibration:
    """Score statistics of one model over a reference set (``rewardlab calibrate`` writes them)."""

    mean: float
    std: float
    quantiles: dict[str, float] | None = None
    count: int | None = None

    def __post_init__(self) -> None:
        if not (math.isfinite(self.mean) and math.isfinite(self.std) and self.std > 0):
            raise ConfigError(f"calibration mean {self.mean} / std {self.std} must be finite with std > 0")


def load_calibration(source: str | os.PathLike | Mapping | None) -> dict[str, Calibration]:
    """``{model: Calibration}`` from a JSON file or dict ``{model: {mean, std, quantiles?, count?}}``."""
    if source is None:
        return {}
    where = "calibration"
    if not isinstance(source, Mapping):
        where = str(source)
        try:
            source = json.loads(Path(source).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"{where}: cannot read calibration JSON ({exc})",
                              "write it with `rewardlab calibrate`") from None
    out = {}
    for model, stats in source.items():
        if not isinstance(stats, Mapping) or not {"mean", "std"} <= set(stats):
            raise ConfigError(f"{where}: entry {model!r} needs numbers 'mean' and 'std'")
        try:
            out[model] = Calibration(float(stats["mean"]), float(stats["std"]), stats.get("quantiles"),
                                     stats.get("count"))
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{where}: entry {model!r}: {exc}") from None
    return out


def _check_finite(name: str, values: torch.Tensor) -> None:
    bad = (~torch.isfinite(values.detach())).nonzero().flatten().tolist()
    if bad:
        raise NonFiniteError(f"reward model {name} returned non-finite scores for items {bad[:10]}",
                             "check the checkpoint's weights and the inputs")


def average_ranks(values: torch.Tensor) -> torch.Tensor:
    """0-based ascending ranks along the last dimension; tied values share their average rank."""
    flat = values.detach().double().cpu()
    order = torch.argsort(flat, stable=True)
    ranks = torch.empty_like(flat)
    sorted_vals = flat[order]
    n = flat.numel()
    i = 0
    while i < n:
        j = i
        while j + 1 < n and sorted_vals[j + 1] == sorted_vals[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0
        i = j + 1
    return ranks.to(values.dtype if values.is_floating_point() else torch.float64)


def combine(per_model: Mapping[str, torch.Tensor | Sequence[float]], weights: Mapping[str, float] | None = None,
            normalize: str = "none", calibration: Mapping[str, Calibration] | None = None) -> torch.Tensor:
    """Combine per-model scores of the same items into one score per item (see the module docstring)."""
    if normalize not in NORMALIZATIONS:
        raise UsageError(f"unknown normalize {normalize!r}", f"use one of {', '.join(NORMALIZATIONS)}")
    if not per_model:
        raise UsageError("no reward models to combine")
    weights = dict(weights or {})
    calibration = calibration or {}
    total = None
    for name, raw in per_model.items():
        scores = raw if isinstance(raw, torch.Tensor) else torch.tensor(list(raw), dtype=torch.float64)
        scores = scores.float() if scores.dtype in (torch.float16, torch.bfloat16) else scores
        _check_finite(name, scores)
        weight = float(weights.get(name, 1.0))
        if normalize == "zscore":
            stats = calibration.get(name)
            if stats is not None:
                term = (scores - stats.mean) / stats.std
            else:
                std = scores.std(unbiased=False) if scores.numel() > 1 else scores.new_tensor(0.0)
                term = (scores - scores.mean()) / std if float(std) > 0 else scores - scores.mean()
        elif normalize in ("rank", "borda"):
            ranks = average_ranks(scores).to(scores.device)
            n = scores.numel()
            term = ranks / (n - 1) if normalize == "rank" and n > 1 else ranks
        else:
            term = scores
        total = weight * term if total is None else total + weight * term
    return total


@dataclass
class EnsembleResult:
    """``total[i]``: combined score (NaN for failed items), ``per_model[label][i]``: raw scores,
    ``errors``: index -> message for every item that is NaN in ``total``."""

    total: list[float]
    per_model: dict[str, list[float]]
    errors: dict[int, str]


class RewardEnsemble:
    """Loaded scorers with weights: ``score`` (images/paths), ``score_tensors`` (differentiable pixels).

    ``labels`` are distinct per scorer (two checkpoints of one architecture keep their file names).
    """

    def __init__(self, scorers: Sequence, weights: Sequence[float] | None = None, normalize: str = "none",
                 calibration: str | os.PathLike | Mapping | None = None):
        if not scorers:
            raise UsageError("a reward ensemble needs at least one model")
        if normalize not in NORMALIZATIONS:
            raise UsageError(f"unknown normalize {normalize!r}", f"use one of {', '.join(NORMALIZATIONS)}")
        weights = list(weights) if weights is not None else [1.0] * len(scorers)
        if len(weights) != len(scorers):
            raise UsageError(f"{len(weights)} weights for {len(scorers)} reward models")
        self.scorers = list(scorers)
        self.labels = distinct_labels([getattr(s, "label", s.name) for s in self.scorers])
        self.weights = dict(zip(self.labels, (float(w) for w in weights), strict=True))
        self.normalize = normalize
        self.calibration = load_calibration(calibration)

    @classmethod
    def load(cls, rewards: Sequence[str | RewardTerm], normalize: str = "none", calibration=None,
             **load_kwargs) -> RewardEnsemble:
        """Load each ``NAME[:WEIGHT]`` with :func:`rewardlab.load` (keyword arguments go to it)."""
        from .loader import load

        terms = [r if isinstance(r, RewardTerm) else parse_reward(r) for r in rewards]
        scorers = [load(t.model, **load_kwargs) for t in terms]
        return cls(scorers, [t.weight for t in terms], normalize, calibration)

    def _stats(self) -> dict[str, Calibration]:
        return stats_by_label(self.labels, [s.name for s in self.scorers], self.calibration)

    def combine(self, per_model: Mapping[str, torch.Tensor | Sequence[float]]) -> torch.Tensor:
        return combine(per_model, self.weights, self.normalize, self._stats())

    def score_tensors(self, pixels01: torch.Tensor, prompts: str | Sequence[str]
                      ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Differentiable combined reward of (B, 3, H, W) pixels in [0, 1]: (total[B], {label: scores[B]})."""
        if self.normalize not in DIFFERENTIABLE:
            raise UsageError(f"normalize={self.normalize!r} is not differentiable", "use 'none' or 'zscore'")
        per_model = {}
        for label, scorer in zip(self.labels, self.scorers, strict=True):
            values = scorer.score_tensors(pixels01, prompts)
            per_model[label] = values.to(pixels01.device)
        return self.combine(per_model), per_model

    def score_detailed(self, prompts: str | Sequence[str], images: Sequence, batch_size: int | None = None
                       ) -> EnsembleResult:
        """Score every item with every model (one batched call per model) without raising on bad items.

        An item that a model cannot read or scores non-finite gets NaN in ``total`` and an entry in
        ``errors``; it takes no part in the combination, so rank/z-score fusion of the other items is
        the same as if it had not been given."""
        images = list(images)
        per_model: dict[str, list[float]] = {}
        errors: dict[int, str] = {}
        for label, scorer in zip(self.labels, self.scorers, strict=True):
            result = scorer.score_detailed(prompts, images, batch_size=batch_size)
            per_model[label] = list(result.scores)
            for index, message in result.errors.items():
                errors.setdefault(index, f"{label}: {message}")
            for index, value in enumerate(result.scores):
                if not math.isfinite(value) and index not in errors:
                    errors[index] = f"{label}: non-finite score {value}"
        return EnsembleResult(self.combine_finite(per_model), per_model, errors)

    def combine_finite(self, per_model: Mapping[str, Sequence[float]]) -> list[float]:
        """:meth:`combine` over the items finite for every model; NaN for the others (never ranked)."""
        columns = {k: [float(v) for v in values] for k, values in per_model.items()}
        count = len(next(iter(columns.values()), []))
        good = [i for i in range(count) if all(math.isfinite(col[i]) for col in columns.values())]
        total = [math.nan] * count
        if good:
            combined = self.combine({k: torch.tensor([col[i] for i in good], dtype=torch.float64)
                                     for k, col in columns.items()})
            for i, value in zip(good, combined.tolist(), strict=True):
                total[i] = value
        return total

    def score(self, prompts: str | Sequence[str], images: Sequence, batch_size: int | None = None
              ) -> tuple[list[float], dict[str, list[float]]]:
        """Combined reward of images (paths, PIL, arrays, bytes): (total, {label: scores}). Unreadable
        images raise :class:`ImageLoadError` (combining NaN would be silent)."""
        per_model = {label: scorer.score(prompts, images, batch_size=batch_size)
                     for label, scorer in zip(self.labels, self.scorers, strict=True)}
        total = self.combine({k: torch.tensor(v, dtype=torch.float64) for k, v in per_model.items()})
        return total.tolist(), per_model


def stats_by_label(labels: Sequence[str], names: Sequence[str], calibration: Mapping[str, Calibration]
                   ) -> dict[str, Calibration]:
    """Each model's calibration, looked up by its label first, then by its registry name."""
    by_label = {}
    for label, name in zip(labels, names, strict=True):
        stats = calibration.get(label) or calibration.get(name)
        if stats is not None:
            by_label[label] = stats
    return by_label


def distinct_labels(labels: Sequence[str]) -> list[str]:
    """Labels made unique by appending ``#2``, ``#3`` ... to repeats."""
    seen: dict[str, int] = {}
    out = []
    for label in labels:
        seen[label] = seen.get(label, 0) + 1
        out.append(label if seen[label] == 1 else f"{label}#{seen[label]}")
    return out
