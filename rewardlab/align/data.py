"""Prompts and image–text pairs for reward fine-tuning, validated row by row.

Prompt files (:func:`load_prompts`), chosen by suffix:

- ``.json``: ImageReward's ``refl_data.json`` (a list of ``{"text": ..., "image": ...}``; only ``text``
  is used) or a plain list of strings;
- ``.jsonl``: one object per line with ``text`` or ``prompt`` (or a JSON string per line);
- anything else: plain text, one prompt per line (blank lines and lines starting with ``#`` skipped).

Image–text pairs for the pretraining loss (:func:`load_image_text_pairs`): ``.jsonl`` or ``.json`` rows
with an image path (``image``, ``file_name`` or ``path``) and a caption (``text``, ``prompt`` or
``caption``); relative paths are resolved against ``image_root`` or the data file's folder. A folder
holding ``metadata.jsonl`` (the Hugging Face imagefolder layout) works too.

Every problem raises :class:`DataError` naming the file and line (or list index) and the field.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import DataError
from ..io.records import read_records

PROMPT_KEYS = ("text", "prompt")
IMAGE_KEYS = ("image", "file_name", "path")
CAPTION_KEYS = ("text", "prompt", "caption")


def _check_prompt(value, where: str) -> str:
    if not isinstance(value, str):
        raise DataError(f"{where}: prompt must be a string, got {type(value).__name__}")
    if not value.strip():
        raise DataError(f"{where}: empty prompt", "remove the row or give it a prompt")
    if "\x00" in value:
        raise DataError(f"{where}: prompt contains a NUL character")
    return value


def _prompt_from_row(row, where: str) -> str:
    if isinstance(row, str):
        return _check_prompt(row, where)
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected an object with 'text' or a string, got {type(row).__name__}")
    for key in PROMPT_KEYS:
        if key in row:
            return _check_prompt(row[key], f"{where} field '{key}'")
    raise DataError(f"{where}: no prompt field", f"give each row one of {', '.join(PROMPT_KEYS)}")


def _json_rows(path: Path) -> list[tuple[str, object]]:
    """(location, row) for every row of a .json list or .jsonl file (rows may be objects or strings)."""
    return [(record.where, record.row) for record in read_records(path, objects_only=False)]


def load_prompts(path: str | Path) -> list[str]:
    """Prompts of a refl_data.json / JSONL / plain-text file, in file order (see the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: prompt file not found")
    if path.suffix.lower() in (".json", ".jsonl"):
        prompts = [_prompt_from_row(row, where) for where, row in _json_rows(path)]
    else:
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as exc:
            raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
        prompts = [_check_prompt(line.strip(), f"{path}:{n}") for n, line in enumerate(lines, start=1)
                   if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise DataError(f"{path}: no prompts", "one prompt per line, or refl_data.json / JSONL rows with 'text'")
    return prompts


@dataclass(frozen=True)
class ImageTextPair:
    image: str
    text: str


def load_image_text_pairs(path: str | Path, image_root: str | Path | None = None) -> list[ImageTextPair]:
    """Image–text pairs for the pretraining loss; every image path must exist (checked here)."""
    path = Path(path)
    if path.is_dir():
        path = path / "metadata.jsonl"
    if not path.is_file():
        raise DataError(f"{path}: image-text file not found")
    root = Path(image_root) if image_root else path.parent
    pairs = []
    for where, row in _json_rows(path):
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected an object, got {type(row).__name__}")
        key = next((k for k in IMAGE_KEYS if k in row), None)
        if key is None or not isinstance(row[key], str) or not row[key]:
            raise DataError(f"{where}: no image path", f"give each row one of {', '.join(IMAGE_KEYS)}")
        caption_key = next((k for k in CAPTION_KEYS if k in row), None)
        if caption_key is None:
            raise DataError(f"{where}: no caption", f"give each row one of {', '.join(CAPTION_KEYS)}")
        text = _check_prompt(row[caption_key], f"{where} field '{caption_key}'")
        image = Path(row[key])
        image = image if image.is_absolute() else root / image
        if not image.is_file():
            raise DataError(f"{where} field '{key}': image {image} not found", "check image_root")
        pairs.append(ImageTextPair(str(image), text))
    if not pairs:
        raise DataError(f"{path}: no image-text pairs")
    return pairs


def pixels_for_generator(images: list, height: int, width: int) -> torch.Tensor:
    """Images (paths, PIL, arrays, bytes) -> (B, 3, height, width) floats in [0, 1]: resized so the shorter
    side fits, then centre-cropped, as diffusion training scripts prepare their data."""
    import numpy as np
    from PIL import Image

    from ..io.images import open_image

    tensors = []
    for index, item in enumerate(images):
        image = open_image(item, index).convert("RGB")
        scale = max(height / image.height, width / image.width)
        size = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
        image = image.resize(size, Image.Resampling.BICUBIC)
        left, top = (size[0] - width) // 2, (size[1] - height) // 2
        image = image.crop((left, top, left + width, top + height))
        tensors.append(torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1))
    return torch.stack(tensors)


def batch_indices(count: int, batch_size: int, index: int, seed: int) -> list[int]:
    """Micro-batch ``index`` of a deterministic shuffled stream over ``count`` items (resumable: it
    depends only on its arguments). Epochs are seeded permutations; a batch may span two epochs."""
    out = []
    position = index * batch_size
    while len(out) < batch_size:
        epoch, offset = divmod(position, count)
        order = list(range(count))
        random.Random(seed * 1_000_003 + epoch).shuffle(order)
        take = min(batch_size - len(out), count - offset)
        out += order[offset : offset + take]
        position += take
    return out
