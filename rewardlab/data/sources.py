"""``KIND:PATH`` data sources, parsed once for evaluation, training and every other reader.

Kinds: ``imagereward`` (ImageRewardDB test.json), ``rankings`` (JSONL/Parquet ``prompt, images, ranking``),
``pairs`` (any pair layout of :mod:`rewardlab.data.pairs`), ``hf:LAYOUT:SOURCE`` (Hugging Face datasets, see
:mod:`rewardlab.data.hf`). A bare path ending in ``.json`` is ``imagereward``; ``.jsonl``/``.parquet``
files are sniffed (pair layouts, else rankings).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path

from ..errors import DataError, UsageError
from ..io.records import check_regular_file, read_records
from .groups import Group, load_imagereward, load_rankings, ranked_pairs
from .pairs import LAYOUTS, Pair, read_pair_file

logger = logging.getLogger(__name__)

KINDS = ("imagereward", "rankings", "pairs", "hf")


@dataclass(frozen=True)
class DataSource:
    kind: str
    path: str
    layout: str | None = None  # hf layouts

    def __str__(self) -> str:
        return f"{self.kind}:{self.layout + ':' if self.layout else ''}{self.path}"


def parse_source(spec: str) -> DataSource:
    """``KIND:PATH`` (or a bare path) -> :class:`DataSource`; unknown kinds are a UsageError naming --data."""
    kind, sep, rest = spec.partition(":")
    if sep and kind in KINDS:
        if kind == "hf":
            layout, _, source = rest.partition(":")
            if not layout or not source:
                raise UsageError(f"--data {spec!r}: expected hf:LAYOUT:SOURCE")
            return DataSource("hf", source, layout)
        return DataSource(kind, rest)
    path = Path(spec)
    if path.suffix == ".json":
        return DataSource("imagereward", spec)
    if path.suffix in (".jsonl", ".parquet") and path.is_file():
        records = read_records(path)
        is_pairs = bool(records) and any(set(cols) <= records[0].row.keys() for cols in LAYOUTS.values())
        return DataSource("pairs" if is_pairs else "rankings", spec)
    raise UsageError(f"--data {spec!r}: unknown data kind", f"use KIND:PATH with KIND one of {', '.join(KINDS)}")


def load_groups(spec: str | DataSource, image_root: str | None = None, split: str = "test",
                allow_outside: bool = False) -> list[Group]:
    """Groups of ranked candidates (evaluation's format) from any source."""
    source = spec if isinstance(spec, DataSource) else parse_source(spec)
    logger.info("reading %s (image root %s, split %s)", source, image_root or "the data file's folder", split)
    if source.kind == "hf":
        from .hf import load_hf

        return load_hf(source.layout, source.path, split)
    check_regular_file(source.path)
    if source.kind == "imagereward":
        return load_imagereward(source.path, image_root, allow_outside)
    if source.kind == "rankings":
        return load_rankings(source.path, image_root, allow_outside)
    return [pair.as_group() for pair in read_pair_file(source.path, image_root, allow_outside)]


def pairs_from_groups(groups: list[Group], include_ties: bool = False) -> list[Pair]:
    """All non-tied pairs of every group (ImageReward's rule); tied pairs too when asked."""
    pairs = []
    for group in groups:
        for better, worse in ranked_pairs(group.ranking):
            pairs.append(Pair(group.group_id, group.prompts[better], group.images[better],
                              group.prompts[worse], group.images[worse]))
        if include_ties:
            for i, j in combinations(range(group.size), 2):
                if group.ranking[i] == group.ranking[j]:
                    pairs.append(Pair(group.group_id, group.prompts[i], group.images[i],
                                      group.prompts[j], group.images[j], tie=True))
    return pairs


def load_pairs(spec: str | DataSource, image_root: str | None = None, split: str = "train",
               allow_outside: bool = False, include_ties: bool = False) -> list[Pair]:
    """Preference pairs (training's format) from any source: pair files as they are (ties kept as
    written), rankings and ImageRewardDB groups as all their non-tied pairs."""
    source = spec if isinstance(spec, DataSource) else parse_source(spec)
    if source.kind == "pairs":
        check_regular_file(source.path)
        return read_pair_file(source.path, image_root, allow_outside)
    groups = load_groups(source, image_root, split, allow_outside)
    if not groups:
        raise DataError(f"{source}: no data")
    return pairs_from_groups(groups, include_ties)
