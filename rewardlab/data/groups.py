"""One internal format for human judgements: a group of (prompt, image) candidates with a ranking.

Text-to-image data (several images for one prompt) and image-to-text data (several captions for one
image) both become groups; a preference pair is a group of two. ``ranking`` follows ImageRewardDB:
lower is better, equal values are ties.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path
from typing import Any

from ..errors import DataError
from ..io.records import Record, read_records, resolve_image


@dataclass
class Group:
    """Candidates judged together. ``images[i]`` is a path, bytes or PIL image; ``prompts[i]`` its text."""

    group_id: str
    prompts: list[str]
    images: list[Any]
    ranking: list[float]

    def __post_init__(self) -> None:
        if not (len(self.prompts) == len(self.images) == len(self.ranking)):
            raise DataError(f"group {self.group_id}: {len(self.prompts)} prompts, {len(self.images)} images and "
                            f"{len(self.ranking)} ranks differ in length")

    @property
    def size(self) -> int:
        return len(self.ranking)

    @property
    def prompt(self) -> str:
        """The shared prompt (text-to-image groups) or the first one."""
        return self.prompts[0]


def ranked_pairs(ranking: Sequence[float]) -> Iterator[tuple[int, int]]:
    """(better, worse) index pairs of a ranking (lower is better); tied pairs are left out."""
    for i, j in combinations(range(len(ranking)), 2):
        if ranking[i] < ranking[j]:
            yield i, j
        elif ranking[j] < ranking[i]:
            yield j, i


def count_pairs(groups: Iterable[Group]) -> tuple[int, int]:
    """(non-tied, tied) candidate pairs over all groups."""
    untied = tied = 0
    for group in groups:
        for i, j in combinations(range(group.size), 2):
            if group.ranking[i] == group.ranking[j]:
                tied += 1
            else:
                untied += 1
    return untied, tied


def _check_ranking(ranking: Any, count: int, where: str) -> list[float]:
    if not isinstance(ranking, (list, tuple)) or len(ranking) != count:
        raise DataError(f"{where}: ranking must be a list of {count} numbers, got {ranking!r:.120}")
    for value in ranking:
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
            raise DataError(f"{where}: ranking holds {value!r}, not a finite number",
                            "rankings are finite numbers, lower is better")
    return [float(v) for v in ranking]


def _images(record: Record, key: str, root: Path, allow_outside: bool) -> list[Any]:
    values = record.row[key]
    if not isinstance(values, (list, tuple)) or not values:
        raise record.error(f"{key!r} must be a non-empty list of images")
    return [resolve_image(v, root, allow_outside, f"{record.where} {key}") for v in values]


def load_imagereward(path: str | Path, image_root: str | Path | None = None, allow_outside: bool = False) -> list[Group]:
    """ImageRewardDB test format: a JSON list of ``{id, prompt, generations, ranking}``.

    Generation paths are relative to ``image_root`` (default: the JSON file's folder)."""
    records = read_records(path)
    root = Path(image_root) if image_root else Path(path).parent
    groups = []
    for record in records:
        record.require("prompt", "generations", "ranking")
        images = _images(record, "generations", root, allow_outside)
        ranking = _check_ranking(record.row["ranking"], len(images), record.where)
        groups.append(Group(str(record.row.get("id", record.line)), [record.text("prompt")] * len(images), images,
                            ranking))
    return groups


def load_rankings(path: str | Path, image_root: str | Path | None = None, allow_outside: bool = False) -> list[Group]:
    """Ranking rows ``{prompt, images, ranking}`` (lower is better) from JSONL or Parquet."""
    root = Path(image_root) if image_root else Path(path).parent
    groups = []
    for record in read_records(path):
        record.require("prompt", "images", "ranking")
        images = _images(record, "images", root, allow_outside)
        ranking = _check_ranking(list(record.row["ranking"]) if isinstance(record.row["ranking"], (list, tuple))
                                 else record.row["ranking"], len(images), record.where)
        groups.append(Group(str(record.row.get("id", record.line)), [record.text("prompt")] * len(images), images,
                            ranking))
    return groups
