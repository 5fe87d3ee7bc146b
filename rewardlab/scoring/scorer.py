"""The scorer: batched, parallel-decoded, mixed-precision scoring behind one API."""

from __future__ import annotations

import logging
import math
import os
import warnings
from collections.abc import Callable, Iterable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from PIL import Image

from ..errors import DeviceError, ImageLoadError, NonFiniteError, UsageError
from ..io.images import ImageInput
from ..models.base import RewardModel
from ..registry import ModelSpec
from .batching import Batch, Collator, worker_count
from .preprocess import tensor_preprocess, unit_tensors_to_batch

logger = logging.getLogger(__name__)

DTYPES = {
    "fp32": torch.float32, "float32": torch.float32,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16,
}


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None``/``auto``: CUDA when available, else CPU. A device this machine lacks is a :class:`DeviceError`."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise DeviceError(f"unknown device {device!r}", "use cpu, cuda, cuda:N or mps") from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"device {device!r} asked for, but this machine has no CUDA GPU",
                              "use --device cpu (or leave it unset)")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise DeviceError(f"device {device!r}: only {torch.cuda.device_count()} CUDA GPU(s) here")
    if resolved.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise DeviceError(f"device {device!r} asked for, but MPS is not available here", "use --device cpu")
    return resolved


def cpu_has_fast_bf16() -> bool | None:
    """Whether this CPU multiplies bf16 in hardware (AMX or AVX512-BF16); None when it cannot be told."""
    try:
        with open("/proc/cpuinfo") as handle:
            flags = next((line for line in handle if line.startswith("flags")), "").split()
    except OSError:
        return None
    return bool({"amx_bf16", "avx512_bf16"} & set(flags)) if flags else None


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """Compute dtype. Default: bf16 on CUDA GPUs that support it (fast, |Δ| ≤ 0.05), else fp32 (exact)."""
    if dtype is None or dtype == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise UsageError(f"unsupported dtype {dtype}", "use fp32, bf16 or fp16")
        resolved = dtype
    else:
        try:
            resolved = DTYPES[str(dtype).lower()]
        except KeyError:
            raise UsageError(f"unknown dtype {dtype!r}", "use one of fp32, bf16, fp16") from None
    if resolved == torch.bfloat16 and device.type == "cpu" and cpu_has_fast_bf16() is False:
        warnings.warn("this CPU has neither AMX nor AVX512-BF16: bf16 runs slower than fp32 here", stacklevel=3)
    return resolved


@dataclass
class ScoreResult:
    """Scores in input order; failed items are NaN and listed in ``errors`` (index -> message)."""

    scores: list[float]
    errors: dict[int, str] = field(default_factory=dict)


@dataclass
class Ranking:
    """``ranks[i]`` is image i's rank (1 = best); ``order`` lists image indices best first."""

    ranks: list[int]
    scores: list[float]
    order: list[int]
    errors: dict[int, str] = field(default_factory=dict)


def ranks_from_scores(scores: Sequence[float]) -> tuple[list[int], list[int]]:
    """Ranks (1 = highest score) and best-first order; ties keep input order, NaN ranks last."""
    keyed = [(-s if not math.isnan(s) else math.inf, i) for i, s in enumerate(scores)]
    order = [i for _, i in sorted(keyed)]
    ranks = [0] * len(scores)
    for position, index in enumerate(order, start=1):
        ranks[index] = position
    return ranks, order


def _as_image_list(images: ImageInput | Iterable[ImageInput]) -> list[ImageInput]:
    """One image or any iterable of images (lists, tuples, generators) -> a list."""
    if isinstance(images, (str, os.PathLike, bytes, bytearray, Image.Image, np.ndarray)):
        return [images]
    try:
        return list(images)
    except TypeError:
        raise UsageError(f"images must be an image or an iterable of images, not {type(images).__name__}") from None


def _check_prompts(prompts: str | Sequence[str], count: int) -> list[str]:
    """One prompt per image (a single string is repeated); every prompt must be a string."""
    if isinstance(prompts, str):
        return [prompts] * count
    if not isinstance(prompts, Iterable):
        raise UsageError(f"prompts must be a string or a sequence of strings, not {type(prompts).__name__}")
    prompts = list(prompts)
    if len(prompts) != count:
        raise UsageError(f"got {len(prompts)} prompts for {count} images", "pass one prompt or one per image")
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise UsageError(f"prompt #{i} is {type(prompt).__name__}, not a string: {prompt!r}")
    return prompts


def check_batch_size(batch_size: int | None, default: int) -> int:
    if batch_size is None:
        return default
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise UsageError(f"batch_size must be a positive integer, got {batch_size!r}")
    return batch_size


ErrorMode = Literal["raise", "nan"]


class Scorer:
    """A loaded reward model. ``score``, ``rank``, ``score_tensors`` and their batched forms are the ways in.

    One Scorer may be shared by several threads (a warm process serving repeated calls): calls keep no
    state between them."""

    def __init__(self, spec: ModelSpec, model: RewardModel, tokenizer, device: torch.device, dtype: torch.dtype,
                 checkpoint: str | None = None, label: str | None = None):
        self.spec = spec
        self.label = label or spec.name  # distinct display name (a checkpoint's file name when loaded from a path)
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self.dtype = dtype
        self.checkpoint = checkpoint
        self.default_batch_size = 64 if device.type == "cuda" else 16
        self.collator = Collator(spec.preprocess, tokenizer, device)
        self._batched_forward = model

    def compile(self, **options) -> None:
        """Run the batched forward of ``score``/``rank`` through ``torch.compile`` (dynamic shapes)."""
        self._batched_forward = torch.compile(self.model, dynamic=True, **options)

    @property
    def name(self) -> str:
        return self.spec.name

    def __repr__(self) -> str:
        return f"Scorer({self.label!r}, device={self.device}, dtype={self.dtype})"

    def _autocast(self):
        if self.dtype == torch.float32:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def _check_finite(self, values: torch.Tensor, rows: Sequence[int]) -> None:
        bad = [rows[i] for i in (~torch.isfinite(values.detach())).nonzero().flatten().tolist()]
        if bad:
            raise NonFiniteError(f"{self.label} (checkpoint {self.checkpoint or 'in memory'}) returned non-finite "
                                 f"scores for items {bad[:10]}", "the checkpoint's weights are probably corrupt")

    def run_batch(self, batch: Batch) -> torch.Tensor:
        """Scores (float32, on the model's device) of a collated batch's rows."""
        with self._autocast():
            values = self._batched_forward(batch.pixels, batch.text, batch.image_index, batch.text_index).float()
        self._check_finite(values, batch.rows)
        return values

    # -- differentiable ------------------------------------------------------------------------------
    def score_tensors(self, pixels01: torch.Tensor, prompts: str | Sequence[str]) -> torch.Tensor:
        """Differentiable scores of (B, 3, H, W) float tensors in [0, 1] of any size: Tensor[B] (float32).

        Resize (antialiased, same geometry as ``score``), crop and normalisation run in tensor space, so
        gradients reach the pixels (ReFL and other reward fine-tuning). fp16/bf16/fp64 inputs are computed
        in float32."""
        if not isinstance(pixels01, torch.Tensor) or not pixels01.is_floating_point():
            raise UsageError(f"score_tensors takes a float tensor in [0, 1], got "
                             f"{getattr(pixels01, 'dtype', type(pixels01).__name__)}",
                             "convert uint8 images with x.float() / 255")
        # one reduction and one device sync per call (this runs in every fine-tuning step); NaN and inf
        # propagate into the minimum / maximum, so they also answer the finiteness question
        low, high = torch.stack(torch.aminmax(pixels01.detach())).float().tolist()
        if not (math.isfinite(low) and math.isfinite(high)):
            raise NonFiniteError("score_tensors: the pixels contain NaN or inf")
        if low < -1e-3 or high > 1 + 1e-3:
            hint = "divide 0-255 values by 255" if high > 1.5 else "map [-1, 1] images with (x + 1) / 2"
            raise UsageError(f"score_tensors: pixels span [{low:.3g}, {high:.3g}], outside [0, 1]", hint)
        count = pixels01.shape[0] if pixels01.ndim == 4 else 1
        prompt_list = _check_prompts(prompts, count)
        texts = list(dict.fromkeys(prompt_list))
        text = self.tokenizer(texts, self.device)
        slot = {t: i for i, t in enumerate(texts)}
        text_index = None if len(texts) == count else torch.tensor([slot[p] for p in prompt_list], device=self.device)
        pixels = tensor_preprocess(pixels01.to(self.device, torch.float32), self.spec.preprocess)
        with self._autocast():
            values = self.model(pixels, text, None, text_index).float()
        self._check_finite(values, list(range(count)))
        return values

    # -- images from files, bytes, PIL, arrays -------------------------------------------------------
    @torch.inference_mode()
    def score_detailed(self, prompts: str | Sequence[str], images: ImageInput | Iterable[ImageInput], *,
                       batch_size: int | None = None, workers: int | None = None,
                       progress: bool | Callable[[int], None] = False) -> ScoreResult:
        """Score every image; an image that cannot be read gets NaN and an entry in ``errors``."""
        images = _as_image_list(images)
        prompt_list = _check_prompts(prompts, len(images))
        batch_size = check_batch_size(batch_size, self.default_batch_size)
        workers = worker_count(workers)
        scores = [math.nan] * len(images)
        errors: dict[int, str] = {}
        advance = progress_callback(len(images), progress, unit="img")
        for batch in self.collator.batches(prompt_list, images, batch_size, workers):
            errors.update(batch.errors)
            if not batch.empty:
                for position, value in zip(batch.rows, self.run_batch(batch).cpu().tolist(), strict=True):
                    scores[position] = value
            advance(len(batch.rows) + len(batch.errors))
        return ScoreResult(scores, dict(sorted(errors.items())))

    def score(self, prompts: str | Sequence[str], images: ImageInput | Iterable[ImageInput], *,
              batch_size: int | None = None, errors: ErrorMode = "raise", workers: int | None = None,
              progress: bool | Callable[[int], None] = False) -> list[float]:
        """Reward of each image for its prompt (one prompt for all images, or one per image).

        ``errors="raise"`` (default) raises :class:`ImageLoadError` naming every unreadable image after
        the batch is done; ``errors="nan"`` returns NaN for them instead."""
        if errors not in ("raise", "nan"):
            raise UsageError(f"errors must be 'raise' or 'nan', got {errors!r}")
        images = _as_image_list(images)
        result = self.score_detailed(prompts, images, batch_size=batch_size, workers=workers, progress=progress)
        if result.errors and errors == "raise":
            listing = "; ".join(result.errors[i] for i in sorted(result.errors))
            raise ImageLoadError(listing, f"{len(result.errors)} of {len(images)} images could not be read")
        return result.scores

    def score_pairs(self, prompts: str | Sequence[str], images_a: Iterable[ImageInput],
                    images_b: Iterable[ImageInput], *, batch_size: int | None = None
                    ) -> tuple[ScoreResult, ScoreResult]:
        """Scores of two candidate lists for the same prompts, in one batched pass."""
        images_a, images_b = _as_image_list(images_a), _as_image_list(images_b)
        if len(images_a) != len(images_b):
            raise UsageError(f"score_pairs got {len(images_a)} and {len(images_b)} images")
        prompt_list = _check_prompts(prompts, len(images_a))
        both = self.score_detailed(prompt_list * 2, images_a + images_b, batch_size=batch_size)
        n = len(images_a)
        split = (ScoreResult(both.scores[:n], {i: m for i, m in both.errors.items() if i < n}),
                 ScoreResult(both.scores[n:], {i - n: m for i, m in both.errors.items() if i >= n}))
        return split

    def rank(self, prompt: str, images: Iterable[ImageInput], *, batch_size: int | None = None,
             workers: int | None = None, progress: bool | Callable[[int], None] = False) -> Ranking:
        """Scores and ranks (1 = best, ImageReward's convention) of ``images`` for one ``prompt``."""
        if not isinstance(prompt, str):
            raise UsageError(f"rank takes one prompt string, got {type(prompt).__name__}",
                             "use rank_groups for several prompts")
        return self.rank_groups([(prompt, images)], batch_size=batch_size, workers=workers, progress=progress)[0]

    def rank_groups(self, groups: Iterable[tuple[str, Iterable[ImageInput]]], *, batch_size: int | None = None,
                    workers: int | None = None, progress: bool | Callable[[int], None] = False) -> list[Ranking]:
        """Rank the images of each ``(prompt, images)`` group; all groups are scored in one batched pass.
        Unreadable images rank last with NaN scores and an entry in the group's ``errors``."""
        groups = [(prompt, _as_image_list(images)) for prompt, images in groups]
        prompts = [prompt for prompt, images in groups for _ in images]
        flat = [image for _, images in groups for image in images]
        result = self.score_detailed(prompts, flat, batch_size=batch_size, workers=workers, progress=progress)
        out, start = [], 0
        for _, images in groups:
            scores = result.scores[start : start + len(images)]
            errs = {i - start: m for i, m in result.errors.items() if start <= i < start + len(images)}
            ranks, order = ranks_from_scores(scores)
            out.append(Ranking(ranks, scores, order, errs))
            start += len(images)
        return out

    # -- one image, many texts ------------------------------------------------------------------------
    @torch.inference_mode()
    def score_matrix(self, images: ImageInput | Iterable[ImageInput], prompts: Sequence[str], *,
                     batch_size: int | None = None, workers: int | None = None) -> list[list[float]]:
        """Scores of every image against every prompt: ``matrix[i][j]`` for image i and prompt j.

        The vision tower runs once per image and each prompt is tokenized once (CLIP-family and BLIPScore
        models also encode each prompt once and combine embeddings; ImageReward/CycleReward run their
        cross-attending text encoder per pair). Unreadable images raise :class:`ImageLoadError`."""
        images = _as_image_list(images)
        prompts = _check_prompts(list(prompts), len(list(prompts)))
        batch_size = check_batch_size(batch_size, self.default_batch_size)
        decoded = self.collator.decode_all(images, worker_count(workers))
        failed = [item for item in decoded if isinstance(item, ImageLoadError)]
        if failed:
            raise ImageLoadError("; ".join(str(e) for e in failed), f"{len(failed)} images could not be read")
        if not prompts:
            return [[] for _ in images]
        text = self.tokenizer(prompts, self.device)
        matrix: list[list[float]] = []
        for start in range(0, len(images), batch_size):
            chunk = decoded[start : start + batch_size]
            pixels = unit_tensors_to_batch(chunk, self.spec.preprocess, self.device)
            with self._autocast():
                features = self.model.encode_images(pixels)
            rows = [[0.0] * len(prompts) for _ in chunk]
            pairs = [(i, j) for i in range(len(chunk)) for j in range(len(prompts))]
            for p in range(0, len(pairs), batch_size * 4):
                part = pairs[p : p + batch_size * 4]
                texts = sorted({j for _, j in part})
                slot = {j: k for k, j in enumerate(texts)}
                sub_text = {key: value[texts] for key, value in text.items()}
                image_index = torch.tensor([i for i, _ in part], device=self.device)
                text_index = torch.tensor([slot[j] for _, j in part], device=self.device)
                with self._autocast():
                    values = self.model.score_features(features, sub_text, image_index, text_index).float()
                self._check_finite(values, [start + i for i, _ in part])
                for (i, j), value in zip(part, values.cpu().tolist(), strict=True):
                    rows[i][j] = value
            matrix.extend(rows)
        return matrix

    def score_texts(self, image: ImageInput, captions: Sequence[str], *, batch_size: int | None = None) -> list[float]:
        """Scores of one image against each caption (vision tower run once): best-of-N captions, I2T data."""
        return self.score_matrix([image], captions, batch_size=batch_size)[0]


def progress_callback(total: int, progress: bool | Callable[[int], None], unit: str = "item",
                      desc: str | None = None) -> Callable[[int], None]:
    """The one progress helper: a callable is used as is, True shows a tqdm bar, False does nothing."""
    if callable(progress):
        return progress
    if not progress:
        return lambda n: None
    from tqdm.auto import tqdm

    bar = tqdm(total=total, unit=unit, desc=desc, dynamic_ncols=True)

    def advance(n: int) -> None:
        bar.update(n)
        if bar.n >= total:
            bar.close()

    return advance
