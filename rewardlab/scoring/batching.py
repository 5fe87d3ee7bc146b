"""The one collate step: (prompts, images) -> a model batch, with per-item errors.

Every consumer (``Scorer``, the trainer, the server, Ray) turns inputs into model batches here. Distinct
images are decoded and encoded once (a path or byte string repeated in the batch is one image), distinct
prompts are tokenized once, and ``image_index`` / ``text_index`` pair them into rows.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from ..errors import ImageLoadError
from ..io.images import ImageInput, describe, open_image
from ..registry import Preprocess
from .preprocess import image_to_unit_tensor, normalize

logger = logging.getLogger(__name__)

Decoded = torch.Tensor | ImageLoadError


def image_key(image: ImageInput) -> tuple:
    """Identity of an input image for de-duplication inside a batch."""
    if isinstance(image, (str, os.PathLike)):
        return ("path", os.fspath(image))
    if isinstance(image, (bytes, bytearray)):
        return ("bytes", hashlib.blake2b(image, digest_size=16).digest())
    return ("object", id(image))


def worker_count(workers: int | None) -> int:
    """Decoding threads: the given count, else one per CPU core up to 8."""
    return max(1, workers or min(8, os.cpu_count() or 1))


def decode_one(image: ImageInput, index: int, preprocess: Preprocess) -> Decoded:
    """Open and preprocess one input to a (3, S, S) tensor in [0, 1]; failures become an ImageLoadError."""
    try:
        return image_to_unit_tensor(open_image(image, index), preprocess)
    except ImageLoadError as exc:
        return exc
    except Exception as exc:  # decoder bugs, truncated data found at resize time, ...
        return ImageLoadError(describe(image, index), f"{type(exc).__name__}: {exc}")


@dataclass
class Batch:
    """A model batch. ``rows[k]`` is the input position of row k; failed positions are in ``errors``."""

    rows: list[int]
    pixels: torch.Tensor | None  # distinct images, normalised (n, 3, S, S)
    text: dict[str, torch.Tensor] | None  # distinct prompts, tokenized
    image_index: torch.Tensor | None
    text_index: torch.Tensor | None
    errors: dict[int, str] = field(default_factory=dict)

    @property
    def empty(self) -> bool:
        return not self.rows


def collate(prompts: Sequence[str], decoded: Sequence[Decoded], positions: Sequence[int], keys: Sequence[tuple],
            preprocess: Preprocess, tokenizer, device: torch.device) -> Batch:
    """Build a :class:`Batch` from decoded items. ``keys`` identify equal images (see :func:`image_key`)."""
    rows, errors = [], {}
    image_slot: dict[tuple, int] = {}
    text_slot: dict[str, int] = {}
    tensors, texts, image_index, text_index = [], [], [], []
    for prompt, item, position, key in zip(prompts, decoded, positions, keys, strict=True):
        if isinstance(item, ImageLoadError):
            errors[position] = str(item)
            continue
        if key not in image_slot:
            image_slot[key] = len(tensors)
            tensors.append(item)
        if prompt not in text_slot:
            text_slot[prompt] = len(texts)
            texts.append(prompt)
        rows.append(position)
        image_index.append(image_slot[key])
        text_index.append(text_slot[prompt])
    if not rows:
        return Batch([], None, None, None, None, errors)
    pixels = normalize(torch.stack(tensors).to(device, non_blocking=True), preprocess)
    text = tokenizer(texts, device)
    identity = list(range(len(rows)))
    return Batch(
        rows, pixels, text,
        None if image_index == identity else torch.tensor(image_index, device=device),
        None if text_index == identity else torch.tensor(text_index, device=device),
        errors,
    )


class Collator:
    """Decodes inputs in a thread pool (the next chunk while the model runs the current one) and collates."""

    def __init__(self, preprocess: Preprocess, tokenizer, device: torch.device):
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.device = device

    def decode_all(self, images: Sequence[ImageInput], workers: int) -> list[Decoded]:
        """Every input decoded (in parallel), in input order; failures are :class:`ImageLoadError` items."""
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            return list(pool.map(lambda item: decode_one(item[1], item[0], self.preprocess), enumerate(images)))

    def batches(self, prompts: Sequence[str], images: Sequence[ImageInput], batch_size: int, workers: int
                ) -> Iterator[Batch]:
        """Yield one :class:`Batch` per ``batch_size`` inputs, in input order."""
        starts = list(range(0, len(images), batch_size))
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            def submit(start: int) -> tuple[list[int], list[tuple], list[Future]]:
                positions = list(range(start, min(start + batch_size, len(images))))
                keys = [image_key(images[i]) for i in positions]
                first: dict[tuple, Future] = {}
                futures = []
                for i, key in zip(positions, keys, strict=True):
                    if key not in first:
                        first[key] = pool.submit(decode_one, images[i], i, self.preprocess)
                    futures.append(first[key])
                return positions, keys, futures

            pending = submit(starts[0]) if starts else None
            for n, _ in enumerate(starts):
                positions, keys, futures = pending
                if n + 1 < len(starts):
                    pending = submit(starts[n + 1])
                decoded = [f.result() for f in futures]
                yield collate([prompts[i] for i in positions], decoded, positions, keys, self.preprocess,
                              self.tokenizer, self.device)
