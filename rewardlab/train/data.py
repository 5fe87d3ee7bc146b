"""Preference pairs for training: files and datasets -> (preferred, rejected) candidates, split by group.

A pair is two (prompt, image) candidates. Text-to-image pairs share the prompt (two images);
image-to-text pairs share the image (two captions). Rankings become all their non-tied pairs.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..data.groups import DataError, Group, load_imagereward, load_rankings, ranked_pairs, read_rows


@dataclass(frozen=True)
class Pair:
    """``preferred`` should score above ``rejected``; ``tie`` pairs should score equally."""

    group_id: str
    preferred_prompt: str
    preferred_image: Any
    rejected_prompt: str
    rejected_image: Any
    tie: bool = False


def pairs_from_groups(groups: list[Group], include_ties: bool = False) -> list[Pair]:
    """All non-tied pairs of every group (ImageReward's rule); tied pairs too when asked."""
    pairs = []
    for group in groups:
        for better, worse in ranked_pairs(group.ranking):
            pairs.append(Pair(group.group_id, group.prompts[better], group.images[better],
                              group.prompts[worse], group.images[worse]))
        if include_ties:
            for i in range(group.size):
                for j in range(i + 1, group.size):
                    if group.ranking[i] == group.ranking[j]:
                        pairs.append(Pair(group.group_id, group.prompts[i], group.images[i],
                                          group.prompts[j], group.images[j], tie=True))
    return pairs


def _resolve(value: Any, root: Path) -> Any:
    return str(root / value) if isinstance(value, str) and not Path(value).is_absolute() else value


def load_pair_file(path: str | Path, image_root: str | Path | None = None) -> list[Pair]:
    """JSONL/Parquet pair rows in the CyclePrefDB layout rewardlab writes.

    T2I rows: ``prompt, preferred_image, rejected_image``; I2T rows: ``image, preferred_text,
    rejected_text``. Optional: ``input_id`` (grouping for the split), ``tie``.
    """
    path = Path(path)
    root = Path(image_root) if image_root else path.parent
    pairs = []
    for n, row in enumerate(read_rows(path)):
        group = str(row.get("input_id", n))
        tie = bool(row.get("tie", False))
        if {"prompt", "preferred_image", "rejected_image"} <= row.keys():
            pairs.append(Pair(group, row["prompt"], _resolve(row["preferred_image"], root), row["prompt"],
                              _resolve(row["rejected_image"], root), tie))
        elif {"image", "preferred_text", "rejected_text"} <= row.keys():
            image = _resolve(row["image"], root)
            pairs.append(Pair(group, row["preferred_text"], image, row["rejected_text"], image, tie))
        else:
            raise DataError(f"{path} row {n}: expected columns prompt/preferred_image/rejected_image (T2I) or "
                            f"image/preferred_text/rejected_text (I2T); has {', '.join(sorted(row))}")
    return pairs


def load_training_pairs(spec: str, image_root: str | None = None, split: str = "train",
                        include_ties: bool = False) -> list[Pair]:
    """``KIND:PATH`` with KIND in pairs (pair file), imagereward (ranking JSON), rankings (JSONL),
    hf:LAYOUT:SOURCE (see ``rewardlab.data.hf``). Rankings give all their ordered pairs, and their tied
    pairs too with ``include_ties``."""
    kind, _, path = spec.partition(":")
    if kind == "pairs":
        return load_pair_file(path, image_root)
    if kind == "imagereward":
        return pairs_from_groups(load_imagereward(path, image_root), include_ties)
    if kind == "rankings":
        return pairs_from_groups(load_rankings(path, image_root), include_ties)
    if kind == "hf":
        from ..data.hf import load_hf

        layout, _, source = path.partition(":")
        return pairs_from_groups(load_hf(layout, source, split), include_ties)
    raise DataError(f"unknown training data kind {kind!r} in {spec!r} (pairs, imagereward, rankings, hf)")


def split_by_group(pairs: list[Pair], valid_fraction: float, seed: int) -> tuple[list[Pair], list[Pair]]:
    """Deterministic train/valid split by ``group_id`` (no prompt/image appears on both sides)."""
    groups = sorted({p.group_id for p in pairs})
    random.Random(seed).shuffle(groups)
    n_valid = int(round(len(groups) * valid_fraction))
    valid_groups = set(groups[:n_valid])
    return [p for p in pairs if p.group_id not in valid_groups], [p for p in pairs if p.group_id in valid_groups]
