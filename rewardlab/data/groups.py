"""One internal format for human judgements: a group of (prompt, image) candidates with a ranking.

Text-to-image data (several images for one prompt) and image-to-text data (several captions for one
image) both become groups; a preference pair is a group of two. ``ranking`` follows ImageRewardDB:
lower is better, equal values are ties.
"""

from __future__ import annotations

import json
import numbers
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path
from typing import Any

from ..errors import DataError


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


def _resolve(image: Any, root: Path | None) -> Any:
    if isinstance(image, str) and root is not None and not Path(image).is_absolute():
        return str(root / image)
    return image


def _check_ranking(ranking: Any, count: int, where: str) -> list[float]:
    if not isinstance(ranking, list) or len(ranking) != count:
        raise DataError(f"{where}: ranking must be a list of {count} numbers, got {ranking!r}")
    for value in ranking:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise DataError(f"{where}: ranking holds a non-number {value!r}")
    return [float(v) for v in ranking]


def _require(row: dict, fields: Sequence[str], where: str) -> None:
    missing = [f for f in fields if f not in row]
    if missing:
        raise DataError(f"{where}: missing field(s) {', '.join(missing)} (has: {', '.join(sorted(row))})")


def load_imagereward(path: str | Path, image_root: str | Path | None = None) -> list[Group]:
    """ImageRewardDB test format: a JSON list of ``{id, prompt, generations, ranking}``.

    Generation paths are relative to ``image_root`` (default: the JSON file's folder).
    """
    path = Path(path)
    root = Path(image_root) if image_root else path.parent
    try:
        items = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON ({exc})") from None
    groups = []
    for n, item in enumerate(items):
        where = f"{path} item {n} (id {item.get('id', '?')})" if isinstance(item, dict) else f"{path} item {n}"
        if not isinstance(item, dict):
            raise DataError(f"{where}: expected an object")
        _require(item, ("prompt", "generations", "ranking"), where)
        generations = item["generations"]
        ranking = _check_ranking(item["ranking"], len(generations), where)
        groups.append(Group(str(item.get("id", n)), [item["prompt"]] * len(generations),
                            [_resolve(g, root) for g in generations], ranking))
    return groups


def read_rows(path: Path) -> list[dict]:
    """Rows of a Parquet or JSONL file as dicts; a bad JSON line is an error naming the file and line."""
    if path.suffix == ".parquet":
        import pandas as pd

        return pd.read_parquet(path).to_dict("records")
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise DataError(f"{path} line {number}: not valid JSON ({exc})") from None
    return rows


_LABELS = {"a": (1.0, 2.0), "b": (2.0, 1.0), "tie": (1.0, 1.0), 0: (1.0, 2.0), 1: (2.0, 1.0), 0.5: (1.0, 1.0)}


def load_pairs(path: str | Path, image_root: str | Path | None = None) -> list[Group]:
    """Pair rows ``{prompt, image_a, image_b, label}`` from JSONL or Parquet.

    ``label``: ``"a"`` or 0 (image_a preferred), ``"b"`` or 1 (image_b preferred), ``"tie"`` or 0.5.
    Rows of rewardlab's own pair files (``prompt, preferred_image, rejected_image``, as written by
    ``rewardlab pairs`` and read by ``rewardlab train``) are read too.
    """
    path = Path(path)
    root = Path(image_root) if image_root else path.parent
    groups = []
    for n, row in enumerate(read_rows(path)):
        where = f"{path} row {n}"
        if "image_a" not in row and {"prompt", "preferred_image", "rejected_image"} <= row.keys():
            tie = bool(row.get("tie", False))
            groups.append(Group(str(row.get("id", n)), [row["prompt"]] * 2,
                                [_resolve(row["preferred_image"], root), _resolve(row["rejected_image"], root)],
                                [1.0, 1.0] if tie else [1.0, 2.0]))
            continue
        _require(row, ("prompt", "image_a", "image_b", "label"), where)
        label = row["label"]
        label = label.lower() if isinstance(label, str) else label
        if label not in _LABELS:
            raise DataError(f"{where}: label {row['label']!r} is not one of 'a', 'b', 'tie', 0, 1, 0.5")
        groups.append(Group(str(row.get("id", n)), [row["prompt"]] * 2,
                            [_resolve(row["image_a"], root), _resolve(row["image_b"], root)], list(_LABELS[label])))
    return groups


def load_rankings(path: str | Path, image_root: str | Path | None = None) -> list[Group]:
    """Ranking rows ``{prompt, images, ranking}`` (lower is better) from JSONL or Parquet."""
    path = Path(path)
    root = Path(image_root) if image_root else path.parent
    groups = []
    for n, row in enumerate(read_rows(path)):
        where = f"{path} row {n}"
        _require(row, ("prompt", "images", "ranking"), where)
        images = list(row["images"])
        ranking = _check_ranking(list(row["ranking"]), len(images), where)
        groups.append(Group(str(row.get("id", n)), [row["prompt"]] * len(images),
                            [_resolve(i, root) for i in images], ranking))
    return groups
