"""Preference pairs: one schema module for every pair layout rewardlab reads or writes.

Layouts (detected from a file's columns):

- ``t2i`` — CyclePrefDB text-to-image / rewardlab pair files: ``prompt, preferred_image, rejected_image``
  (optional ``input_id``, ``tie``). Written by ``rewardlab cycle`` and ``rewardlab pairs``.
- ``i2t`` — CyclePrefDB image-to-text: ``image, preferred_text, rejected_text``.
- ``ab`` — ``prompt, image_a, image_b, label`` with label ``a``/0 (image_a preferred), ``b``/1, ``tie``/0.5.
- ``pickapic`` — Pick-a-Pic / Diffusion-DPO: ``caption, jpg_0, jpg_1, label_0`` (label_0 = 1: jpg_0
  preferred, 0: jpg_1 preferred, 0.5: tie); images as bytes (Parquet) or paths.

Every layout is readable by evaluation (a pair is a group of two) and by training.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..io.records import Record, read_records, resolve_image
from .groups import Group

T2I_COLUMNS = ("prompt", "preferred_image", "rejected_image")
I2T_COLUMNS = ("image", "preferred_text", "rejected_text")
AB_COLUMNS = ("prompt", "image_a", "image_b", "label")
PICKAPIC_COLUMNS = ("caption", "jpg_0", "jpg_1", "label_0")
LAYOUTS = {"t2i": T2I_COLUMNS, "i2t": I2T_COLUMNS, "ab": AB_COLUMNS, "pickapic": PICKAPIC_COLUMNS}

_AB_LABELS = {"a": "a", "b": "b", "tie": "tie", 0: "a", 1: "b", 0.5: "tie"}
_PICKAPIC_LABELS = {1: "a", 0: "b", 0.5: "tie"}


@dataclass(frozen=True)
class Pair:
    """``preferred`` should score above ``rejected``; ``tie`` pairs should score equally."""

    group_id: str
    preferred_prompt: str
    preferred_image: Any
    rejected_prompt: str
    rejected_image: Any
    tie: bool = False

    def as_group(self) -> Group:
        """A group of two (ranking 1 vs 2, or 1 vs 1 for a tie) for evaluation."""
        return Group(self.group_id, [self.preferred_prompt, self.rejected_prompt],
                     [self.preferred_image, self.rejected_image], [1.0, 1.0 if self.tie else 2.0])


def layout_of(record: Record) -> str:
    for name, columns in LAYOUTS.items():
        if set(columns) <= record.row.keys():
            return name
    raise record.error("unknown pair layout: expected columns "
                       + " or ".join("/".join(cols) for cols in LAYOUTS.values()))


def _pair_from(record: Record, root: Path, allow_outside: bool) -> Pair:
    row, where = record.row, record.where
    group = str(row.get("input_id", row.get("id", record.line)))
    layout = layout_of(record)

    def image(key: str) -> Any:
        value = row[key]
        if isinstance(value, dict) and "bytes" in value:  # datasets' Image feature stored in Parquet
            value = value["bytes"] or value.get("path")
        if value is None:
            raise record.error(f"{key!r} is empty")
        return resolve_image(value, root, allow_outside, f"{where} {key}")

    if layout == "t2i":
        prompt = record.text("prompt")
        tie = bool(row.get("tie", False))
        return Pair(group, prompt, image("preferred_image"), prompt, image("rejected_image"), tie)
    if layout == "i2t":
        picture = image("image")
        return Pair(group, record.text("preferred_text"), picture, record.text("rejected_text"), picture,
                    bool(row.get("tie", False)))
    if layout == "ab":
        label = row["label"]
        label = _AB_LABELS.get(label.lower() if isinstance(label, str) else label)
        if label is None:
            raise record.error(f"label {row['label']!r} is not one of 'a', 'b', 'tie', 0, 1, 0.5")
        prompt, a, b = record.text("prompt"), image("image_a"), image("image_b")
        return Pair(group, prompt, b if label == "b" else a, prompt, a if label == "b" else b, label == "tie")
    label = _PICKAPIC_LABELS.get(record.number("label_0"))
    if label is None:
        raise record.error(f"label_0 {row['label_0']!r} is not one of 1, 0, 0.5")
    prompt, a, b = record.text("caption"), image("jpg_0"), image("jpg_1")
    return Pair(group, prompt, b if label == "b" else a, prompt, a if label == "b" else b, label == "tie")


def read_pair_file(path: str | os.PathLike, image_root: str | os.PathLike | None = None,
                   allow_outside: bool = False) -> list[Pair]:
    """Pairs of a JSONL/JSON/Parquet file in any layout above. Image paths resolve against ``image_root``
    (default: the file's folder) and may not leave it unless ``allow_outside``."""
    records = read_records(path)
    root = Path(image_root) if image_root else Path(path).parent
    return [_pair_from(record, root, allow_outside) for record in records]
