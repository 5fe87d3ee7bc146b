"""Scoring groups through the cache, then the metrics."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

from ..data.groups import Group
from .cache import ScoreCache, image_hash
from .metrics import PairwiseAccuracy, RecallFilterAtK

logger = logging.getLogger(__name__)


@dataclass
class EvalResult:
    model: str
    metrics: dict
    by_group_size: dict
    scores: list[list[float]]  # per group, per candidate (NaN where the image failed)
    errors: list[str] = field(default_factory=list)
    skipped_groups: int = 0
    scored: int = 0  # candidates actually run through the model (the rest came from the cache)


def score_groups(scorer, groups: list[Group], cache: ScoreCache | None = None, batch_size: int | None = None,
                 progress: bool = False) -> tuple[list[list[float]], dict[tuple[int, int], str], int]:
    """Scores of every candidate; each distinct (image content, prompt) is scored once, cached ones never.

    Returns (scores per group, errors keyed by (group index, candidate index), number scored now).
    """
    flat = [(g, c) for g, group in enumerate(groups) for c in range(group.size)]
    hashes = [image_hash(groups[g].images[c]) for g, c in flat]
    keys = [(h, groups[g].prompts[c]) if h else None for h, (g, c) in zip(hashes, flat, strict=True)]
    model_key = ScoreCache.model_key(scorer) if cache else ""
    known = cache.get_many(model_key, [k for k in keys if k]) if cache else {}

    todo: dict = {}  # key (or candidate position for unhashable inputs) -> first flat index
    for n, key in enumerate(keys):
        marker = key if key else ("unhashable", n)
        if key not in known and marker not in todo:
            todo[marker] = n
    order = list(todo.values())
    result = scorer.score_detailed([groups[flat[n][0]].prompts[flat[n][1]] for n in order],
                                   [groups[flat[n][0]].images[flat[n][1]] for n in order],
                                   batch_size=batch_size, progress=progress)
    fresh, failed = {}, {}
    for position, n in enumerate(order):
        marker = keys[n] if keys[n] else ("unhashable", n)
        if position in result.errors:
            failed[marker] = result.errors[position]
        else:
            fresh[marker] = result.scores[position]
    if cache:
        cache.put_many(model_key, {k: v for k, v in fresh.items() if k[0] != "unhashable"})

    scores = [[math.nan] * group.size for group in groups]
    errors = {}
    for n, (g, c) in enumerate(flat):
        marker = keys[n] if keys[n] else ("unhashable", n)
        if marker in failed:
            errors[(g, c)] = failed[marker]
        else:
            scores[g][c] = known[marker] if marker in known else fresh[marker]
    logger.info("%s: %d candidates, %d scored now, %d from the cache, %d unreadable", getattr(scorer, "label", scorer.name),
                len(flat), len(order), len(flat) - len(order), len(errors))
    return scores, errors, len(order)


def accumulate(groups: list[Group], scores: list[list[float]], errors: dict[tuple[int, int], str],
               ks: tuple[int, ...] = (1, 2, 4)) -> tuple[PairwiseAccuracy, RecallFilterAtK]:
    """Metric accumulators over the groups without an unreadable image (those are left out)."""
    accuracy, selection = PairwiseAccuracy(), RecallFilterAtK(ks)
    bad_groups = {g for g, _ in errors}
    for g, group in enumerate(groups):
        if g not in bad_groups:
            accuracy.update(scores[g], group.ranking)
            selection.update(scores[g], group.ranking)
    return accuracy, selection


def eval_result(model: str, groups: list[Group], scores: list[list[float]], errors: dict[tuple[int, int], str],
                scored: int, accuracy: PairwiseAccuracy, selection: RecallFilterAtK) -> EvalResult:
    """The :class:`EvalResult` of filled (or merged) accumulators."""
    messages = [f"group {groups[g].group_id}: {message}" for (g, _), message in sorted(errors.items())]
    return EvalResult(model, {**accuracy.compute(), **selection.compute()}, accuracy.by_group_size(),
                      scores, messages, len({g for g, _ in errors}), scored)


def evaluate(scorer, groups: list[Group], cache: ScoreCache | None = None, batch_size: int | None = None,
             progress: bool = False, ks: tuple[int, ...] = (1, 2, 4)) -> EvalResult:
    """Score ``groups`` with ``scorer`` and compute agreement with the human rankings.

    A group with an unreadable image is left out of the metrics and reported in ``errors``.
    """
    scores, errors, scored = score_groups(scorer, groups, cache, batch_size, progress)
    accuracy, selection = accumulate(groups, scores, errors, ks)
    return eval_result(getattr(scorer, "label", scorer.name), groups, scores, errors, scored, accuracy, selection)
