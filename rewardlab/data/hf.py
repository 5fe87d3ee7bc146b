"""Hugging Face ``datasets`` layouts of the field's preference sets, as :class:`Group` lists.

Each loader takes a ``datasets.Dataset`` (or a hub name / saved-dataset folder plus split) and maps its
columns; images may be PIL images, bytes, ``{"bytes", "path"}`` dicts or paths.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from .groups import DataError, Group


def _image(value: Any, where: str) -> Any:
    if isinstance(value, dict):
        if value.get("bytes"):
            return value["bytes"]
        if value.get("path"):
            return value["path"]
        raise DataError(f"{where}: image dict has neither bytes nor path")
    if value is None:
        raise DataError(f"{where}: image is missing")
    return value


def _columns(dataset, needed: tuple[str, ...], layout: str) -> None:
    missing = [c for c in needed if c not in dataset.column_names]
    if missing:
        raise DataError(f"{layout} layout needs column(s) {', '.join(missing)}; the dataset has "
                        f"{', '.join(dataset.column_names)}")


def pickapic(dataset) -> list[Group]:
    """Pick-a-Pic v2: ``caption, jpg_0, jpg_1, label_0, label_1`` (label 1 = preferred, 0.5/0.5 = tie)."""
    _columns(dataset, ("caption", "jpg_0", "jpg_1", "label_0", "label_1"), "Pick-a-Pic v2")
    groups = []
    for n, row in enumerate(dataset):
        where = f"Pick-a-Pic row {n}"
        if "has_label" in row and not row["has_label"]:
            continue
        l0, l1 = float(row["label_0"]), float(row["label_1"])
        ranking = [1.0, 1.0] if l0 == l1 else ([1.0, 2.0] if l0 > l1 else [2.0, 1.0])
        groups.append(Group(str(row.get("ranking_id", n)), [row["caption"]] * 2,
                            [_image(row["jpg_0"], where), _image(row["jpg_1"], where)], ranking))
    return groups


def hpdv2(dataset) -> list[Group]:
    """HPDv2 test: ``prompt, image (list), rank (list, lower is better)``."""
    _columns(dataset, ("prompt", "image", "rank"), "HPDv2")
    groups = []
    for n, row in enumerate(dataset):
        where = f"HPDv2 row {n}"
        images = [_image(i, where) for i in row["image"]]
        if len(row["rank"]) != len(images):
            raise DataError(f"{where}: {len(images)} images but {len(row['rank'])} ranks")
        groups.append(Group(str(n), [row["prompt"]] * len(images), images, [float(r) for r in row["rank"]]))
    return groups


def cycleprefdb_i2t(dataset) -> list[Group]:
    """CyclePrefDB image-to-text pairs: ``image, preferred_text, rejected_text`` (one image, two captions)."""
    _columns(dataset, ("image", "preferred_text", "rejected_text"), "CyclePrefDB I2T")
    return [Group(str(n), [row["preferred_text"], row["rejected_text"]],
                  [_image(row["image"], f"CyclePrefDB I2T row {n}")] * 2, [1.0, 2.0])
            for n, row in enumerate(dataset)]


def cycleprefdb_t2i(dataset) -> list[Group]:
    """CyclePrefDB text-to-image pairs: ``prompt, preferred_image, rejected_image``."""
    _columns(dataset, ("prompt", "preferred_image", "rejected_image"), "CyclePrefDB T2I")
    return [Group(str(n), [row["prompt"]] * 2, [_image(row["preferred_image"], f"CyclePrefDB T2I row {n}"),
                                                 _image(row["rejected_image"], f"CyclePrefDB T2I row {n}")], [1.0, 2.0])
            for n, row in enumerate(dataset)]


LAYOUTS: dict[str, Callable] = {
    "pickapic": pickapic, "hpdv2": hpdv2, "cycleprefdb-i2t": cycleprefdb_i2t, "cycleprefdb-t2i": cycleprefdb_t2i,
}


def load_hf(layout: str, source, split: str = "test") -> list[Group]:
    """Groups from a ``datasets.Dataset``, a saved-dataset folder, a data file, or a hub dataset name."""
    if layout not in LAYOUTS:
        raise DataError(f"unknown dataset layout {layout!r}; known: {', '.join(LAYOUTS)}")
    dataset = source
    if isinstance(source, (str, Path)):
        import datasets

        path = Path(source)
        if path.is_dir() and (path / "dataset_info.json").exists():
            dataset = datasets.load_from_disk(str(path))
        elif path.is_file():
            kind = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".csv": "csv"}.get(path.suffix)
            if kind is None:
                raise DataError(f"{path}: unsupported data file type {path.suffix}")
            dataset = datasets.load_dataset(kind, data_files=str(path), split="train")
        else:
            dataset = datasets.load_dataset(str(source), split=split)
        if isinstance(dataset, datasets.DatasetDict):
            dataset = dataset[split]
    return LAYOUTS[layout](dataset)
