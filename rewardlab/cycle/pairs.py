"""Preference pairs from cycle-consistency scores, with the right direction for each metric."""

from __future__ import annotations

import hashlib
import math
from collections import Counter
from dataclasses import dataclass, field
from itertools import combinations


@dataclass(frozen=True)
class Candidate:
    """One forward output for an input: ``output`` is a caption (I2T) or an image path (T2I)."""

    input_id: str
    model: str
    seed: int
    output: str
    score: float


@dataclass
class PairRules:
    """``higher_is_better``: True for similarities (SBERT), False for distances (DreamSim).
    ``floor``: the preferred candidate must reach it (≥ for similarities, ≤ for distances)."""

    higher_is_better: bool
    margin: float = 0.005
    floor: float | None = None
    drop_duplicate_outputs: bool = True


@dataclass
class PairStats:
    inputs: int = 0
    candidates: int = 0
    kept: int = 0
    dropped: Counter = field(default_factory=Counter)


def _better(a: Candidate, b: Candidate, higher_is_better: bool) -> tuple[Candidate, Candidate]:
    if (a.score > b.score) == higher_is_better:
        return a, b
    return b, a


def build_pairs(candidates: list[Candidate], rules: PairRules, stats: PairStats | None = None
                ) -> list[tuple[Candidate, Candidate]]:
    """All (preferred, rejected) pairs among one input's candidates that pass the rules.

    Candidates are sorted by (model, seed, output) first, so the result does not depend on their order;
    candidates whose score is NaN or infinite are dropped (a NaN compares false both ways and would
    otherwise pick a side at random); duplicate outputs keep the first after sorting; exact ties and
    |Δ| < margin are dropped, as are pairs whose preferred candidate misses the quality floor.
    """
    stats = stats if stats is not None else PairStats()
    ordered = sorted(candidates, key=lambda c: (c.model, c.seed, c.output))
    stats.inputs += 1
    stats.candidates += len(ordered)
    finite = [c for c in ordered if math.isfinite(c.score)]
    if len(finite) < len(ordered):
        stats.dropped["non-finite score"] += len(ordered) - len(finite)
        ordered = finite
    if rules.drop_duplicate_outputs:
        seen, unique = set(), []
        for c in ordered:
            key = c.output.strip().lower()
            if key in seen:
                stats.dropped["duplicate output"] += 1
                continue
            seen.add(key)
            unique.append(c)
        ordered = unique
    pairs = []
    for a, b in combinations(ordered, 2):
        if a.score == b.score:
            stats.dropped["exact tie"] += 1
            continue
        if abs(a.score - b.score) < rules.margin:
            stats.dropped["below margin"] += 1
            continue
        preferred, rejected = _better(a, b, rules.higher_is_better)
        if rules.floor is not None and (preferred.score < rules.floor if rules.higher_is_better else preferred.score > rules.floor):
            stats.dropped["preferred below quality floor"] += 1
            continue
        pairs.append((preferred, rejected))
    stats.kept += len(pairs)
    return pairs


def split_of(input_id: str, seed: int = 0, fractions: tuple[float, float] = (0.9, 0.05)) -> str:
    """train/valid/test for one input, from a seeded hash of its id alone: an input keeps its split
    when more inputs finish, when shards are added or when the run is resumed (no train/test leak
    between exports of a growing run)."""
    digest = hashlib.sha256(f"{seed}\0{input_id}".encode()).digest()
    position = int.from_bytes(digest[:8], "big") / 2**64  # uniform in [0, 1)
    if position < fractions[0]:
        return "train"
    return "valid" if position < fractions[0] + fractions[1] else "test"


def assign_splits(input_ids: list[str], seed: int = 0, fractions: tuple[float, float] = (0.9, 0.05)) -> dict[str, str]:
    """train/valid/test by input (no input on two sides), seeded; see :func:`split_of`."""
    return {i: split_of(i, seed, fractions) for i in sorted(set(input_ids))}
