"""Calibration statistics of one reward model over a reference set of (prompt, image) items.

The record ``{mean, std, quantiles, count}`` is what :func:`rewardlab.scoring.ensemble.load_calibration`
reads (``normalize="zscore"`` divides by ``std`` after subtracting ``mean``). ``std`` is the population
standard deviation; quantiles use linear interpolation (numpy's default).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..errors import DataError, NonFiniteError
from ..io.atomic import write_json

DEFAULT_QUANTILES = (0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99)


def calibration_record(scores: Sequence[float], quantiles: Sequence[float] = DEFAULT_QUANTILES) -> dict:
    """``{mean, std, quantiles: {"0.5": ...}, count}`` of finite scores (non-finite ones are an error)."""
    values = np.asarray(list(scores), dtype=np.float64)
    if values.size < 2:
        raise DataError(f"calibration needs at least 2 scored items, got {values.size}")
    bad = np.flatnonzero(~np.isfinite(values))
    if bad.size:
        raise NonFiniteError(f"scores of items {bad[:10].tolist()} are not finite", "check the model and the images")
    std = float(values.std())
    if not std > 0:
        raise DataError(f"all {values.size} scores are equal ({values[0]}): no spread to calibrate with",
                        "use a reference set of varied images")
    for q in quantiles:
        if not 0 <= q <= 1:
            raise DataError(f"quantile {q} is outside [0, 1]")
    return {"mean": float(values.mean()), "std": std,
            "quantiles": {f"{q:g}": float(np.quantile(values, q)) for q in quantiles}, "count": int(values.size)}


def calibrate(scorer, prompts: Sequence[str], images: Sequence, batch_size: int | None = None,
              quantiles: Sequence[float] = DEFAULT_QUANTILES, progress: bool = False) -> tuple[dict, dict[int, str]]:
    """Score the items with :meth:`Scorer.score_detailed`; (record over the readable ones, {index: error})."""
    result = scorer.score_detailed(list(prompts), list(images), batch_size=batch_size, progress=progress)
    good = [s for i, s in enumerate(result.scores) if i not in result.errors]
    record = calibration_record(good, quantiles)
    if result.errors:
        record["skipped"] = len(result.errors)
    return record, result.errors


def read_items(path: str | os.PathLike, image_root: str | os.PathLike | None = None,
               allow_outside: bool = False) -> tuple[list[str], list[str]]:
    """(prompts, images) from JSONL/JSON/Parquet rows ``{prompt, image}`` or ``{prompt, images: [...]}``,
    or any pair / ranking file of :mod:`rewardlab.data` (every candidate once). Relative image paths are
    resolved against ``image_root`` (default: the file's folder) and may not leave it unless
    ``allow_outside``."""
    from ..data.pairs import LAYOUTS
    from ..data.sources import load_groups
    from ..io.records import read_records, resolve_image

    records = read_records(path)
    if not records:
        raise DataError(f"{path}: no rows")
    if any(set(columns) <= records[0].row.keys() for columns in LAYOUTS.values()):
        groups = load_groups(f"pairs:{path}", image_root, allow_outside=allow_outside)
        return [p for g in groups for p in g.prompts], [i for g in groups for i in g.images]
    root = Path(image_root) if image_root else Path(path).parent
    prompts, images = [], []
    for record in records:
        prompt = record.text("prompt")
        if "image" in record.row:
            found = [record.row["image"]]
        elif isinstance(record.row.get("images"), list):
            found = record.row["images"]
        else:
            raise record.error(f"no 'image' or 'images' field (has: {', '.join(sorted(record.row))})")
        for image in found:
            prompts.append(prompt)
            images.append(resolve_image(image, root, allow_outside, f"{record.where} image"))
    return prompts, images


def write_calibration(path: str | os.PathLike, label: str, record: dict, merge: bool = False) -> dict:
    """Atomically write ``{label: record}``; with ``merge`` keep the other models of an existing file."""
    from ..scoring.ensemble import load_calibration

    path = Path(path)
    data: dict = {}
    if merge and path.exists():
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise DataError(f"{path}: cannot merge into it ({exc})", "fix or remove the file") from None
        if not isinstance(data, dict):
            raise DataError(f"{path}: not a calibration file (expected a JSON object)")
        load_calibration(data)  # validates the existing entries
    data[label] = record
    load_calibration(data)
    write_json(path, data)
    return data
