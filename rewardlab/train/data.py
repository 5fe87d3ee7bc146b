"""Preference pairs for training: files and datasets -> (preferred, rejected) candidates, split by group.

A pair is two (prompt, image) candidates. Text-to-image pairs share the prompt (two images);
image-to-text pairs share the image (two captions). Rankings become all their non-tied pairs.
"""

from __future__ import annotations

import random
from pathlib import Path

from ..data.pairs import Pair, read_pair_file
from ..data.sources import load_pairs


def load_pair_file(path: str | Path, image_root: str | Path | None = None, allow_outside: bool = False) -> list[Pair]:
    """Pairs of a pair file in any layout of :mod:`rewardlab.data.pairs`."""
    return read_pair_file(path, image_root, allow_outside)


def load_training_pairs(spec: str, image_root: str | None = None, split: str = "train",
                        include_ties: bool = False, allow_outside: bool = False) -> list[Pair]:
    """``KIND:PATH`` -> pairs (see :mod:`rewardlab.data.sources`); rankings give all their ordered pairs,
    and their tied pairs too with ``include_ties``."""
    return load_pairs(spec, image_root, split, allow_outside, include_ties)


def split_by_group(pairs: list[Pair], valid_fraction: float, seed: int) -> tuple[list[Pair], list[Pair]]:
    """Deterministic train/valid split by ``group_id`` (no prompt/image appears on both sides)."""
    groups = sorted({p.group_id for p in pairs})
    random.Random(seed).shuffle(groups)
    n_valid = int(round(len(groups) * valid_fraction))
    valid_groups = set(groups[:n_valid])
    return [p for p in pairs if p.group_id not in valid_groups], [p for p in pairs if p.group_id in valid_groups]
