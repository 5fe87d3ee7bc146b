"""The scorer: batched, parallel-decoded, mixed-precision scoring behind one API."""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from torch import nn

from ..io.images import ImageInput, ImageLoadError, describe, open_image
from ..registry import ModelSpec
from .preprocess import image_to_unit_tensor, tensor_preprocess, unit_tensors_to_batch

DTYPES = {
    "fp32": torch.float32, "float32": torch.float32,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16,
}


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


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
            raise ValueError(f"unsupported dtype {dtype}; use fp32, bf16 or fp16")
        resolved = dtype
    else:
        try:
            resolved = DTYPES[dtype.lower()]
        except KeyError:
            raise ValueError(f"unknown dtype {dtype!r}; use one of fp32, bf16, fp16") from None
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


def _check_prompts(prompts: str | Sequence[str], count: int) -> list[str] | str:
    if isinstance(prompts, str):
        return prompts
    prompts = list(prompts)
    if len(prompts) != count:
        raise ValueError(f"got {len(prompts)} prompts for {count} images; pass one prompt or one per image")
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise TypeError(f"prompt #{i} is {type(prompt).__name__}, not str: {prompt!r}")
    return prompts


class Scorer:
    """A loaded reward model. ``score``, ``rank`` and ``score_tensors`` are the only ways in."""

    def __init__(self, spec: ModelSpec, model: nn.Module, tokenizer, device: torch.device, dtype: torch.dtype,
                 checkpoint: str | None = None, label: str | None = None):
        self.spec = spec
        self.label = label or spec.name  # distinct display name (a checkpoint's file name when loaded from a path)
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self.dtype = dtype
        self.checkpoint = checkpoint
        self.default_batch_size = 64 if device.type == "cuda" else 16

    @property
    def name(self) -> str:
        return self.spec.name

    def __repr__(self) -> str:
        return f"Scorer({self.spec.name!r}, device={self.device}, dtype={self.dtype})"

    def _autocast(self):
        if self.dtype == torch.float32:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def _forward(self, pixels: torch.Tensor, prompts: str | Sequence[str]) -> torch.Tensor:
        """Model forward on normalised pixels; one prompt is tokenized once and shared by the batch."""
        batch = pixels.shape[0]
        if isinstance(prompts, str):
            text = self.tokenizer([prompts], self.device)
            text = {k: v.expand(batch, -1) for k, v in text.items()}
        else:
            text = self.tokenizer(list(prompts), self.device)
        with self._autocast():
            return self.model(pixels, text).float()

    def score_tensors(self, pixels01: torch.Tensor, prompts: str | Sequence[str]) -> torch.Tensor:
        """Differentiable scores of (B, 3, H, W) float tensors in [0, 1] of any size: Tensor[B].

        Resize (antialiased, same geometry as ``score``), crop and normalisation run in tensor space, so
        gradients reach the pixels (ReFL and other reward fine-tuning).
        """
        prompts = _check_prompts(prompts, pixels01.shape[0] if pixels01.ndim == 4 else 1)
        pixels = tensor_preprocess(pixels01.to(self.device), self.spec.preprocess)
        return self._forward(pixels, prompts)

    def _load_one(self, image: ImageInput, index: int) -> torch.Tensor | ImageLoadError:
        try:
            return image_to_unit_tensor(open_image(image, index), self.spec.preprocess)
        except ImageLoadError as exc:
            return exc
        except Exception as exc:  # decoder bugs, truncated data found at resize time, ...
            return ImageLoadError(describe(image, index), f"{type(exc).__name__}: {exc}")

    def _decoded_batches(self, images: Sequence[ImageInput], batch_size: int, workers: int
                         ) -> Iterator[tuple[int, list[torch.Tensor | ImageLoadError]]]:
        """Yield (start, decoded items) per batch; the next batch decodes while the current one runs."""
        starts = range(0, len(images), batch_size)
        with ThreadPoolExecutor(max_workers=workers) as pool:
            def submit(start: int) -> list[Future]:
                return [pool.submit(self._load_one, images[i], i) for i in range(start, min(start + batch_size, len(images)))]

            pending = submit(0) if len(images) else []
            for n, start in enumerate(starts):
                current = pending
                if n + 1 < len(starts):
                    pending = submit(starts[n + 1])
                yield start, [f.result() for f in current]

    @torch.inference_mode()
    def score_detailed(self, prompts: str | Sequence[str], images: Sequence[ImageInput], batch_size: int | None = None,
                       workers: int | None = None, progress: bool | Callable[[int], None] = False) -> ScoreResult:
        """Score every image; an image that cannot be read gets NaN and an entry in ``errors``."""
        images = list(images)
        prompts = _check_prompts(prompts, len(images))
        batch_size = batch_size or self.default_batch_size
        workers = workers or min(8, os.cpu_count() or 1)
        scores = [math.nan] * len(images)
        errors: dict[int, str] = {}
        bar = _progress_bar(len(images), progress)
        for start, items in self._decoded_batches(images, batch_size, workers):
            good = [i for i, item in enumerate(items) if not isinstance(item, ImageLoadError)]
            for i, item in enumerate(items):
                if isinstance(item, ImageLoadError):
                    errors[start + i] = str(item)
            if good:
                pixels = unit_tensors_to_batch([items[i] for i in good], self.spec.preprocess, self.device)
                batch_prompts = prompts if isinstance(prompts, str) else [prompts[start + i] for i in good]
                values = self._forward(pixels, batch_prompts).cpu().tolist()
                for i, value in zip(good, values, strict=True):
                    scores[start + i] = value
            bar(len(items))
        return ScoreResult(scores, errors)

    def score(self, prompts: str | Sequence[str], images: ImageInput | Sequence[ImageInput], batch_size: int | None = None,
              errors: str = "raise", **kwargs) -> list[float]:
        """Reward of each image for its prompt (one prompt for all images, or one per image).

        ``errors="raise"`` (default) raises :class:`ImageLoadError` naming every unreadable image after
        the batch is done; ``errors="nan"`` returns NaN for them instead.
        """
        if not isinstance(images, (list, tuple)):
            images = [images]
        result = self.score_detailed(prompts, images, batch_size, **kwargs)
        if result.errors and errors == "raise":
            listing = "; ".join(result.errors[i] for i in sorted(result.errors))
            raise ImageLoadError(listing, f"{len(result.errors)} of {len(images)} images could not be read")
        return result.scores

    def rank(self, prompt: str, images: Sequence[ImageInput], batch_size: int | None = None, **kwargs) -> Ranking:
        """Scores and ranks (1 = best, ImageReward's convention) of ``images`` for one ``prompt``."""
        if not isinstance(prompt, str):
            raise TypeError(f"rank takes one prompt string, got {type(prompt).__name__}")
        result = self.score_detailed(prompt, images, batch_size, **kwargs)
        ranks, order = ranks_from_scores(result.scores)
        return Ranking(ranks, result.scores, order, result.errors)


def _progress_bar(total: int, progress: bool | Callable[[int], None]) -> Callable[[int], None]:
    if callable(progress):
        return progress
    if not progress:
        return lambda n: None
    from tqdm.auto import tqdm

    bar = tqdm(total=total, unit="img", dynamic_ncols=True)

    def advance(n: int) -> None:
        bar.update(n)
        if bar.n >= total:
            bar.close()

    return advance
