"""Image preprocessing: resize the shorter side and centre crop (or resize the longer side and pad), normalise.

Two resize back ends share the crop geometry and normalisation: PIL (bit-exact with the official
packages' torchvision-on-PIL transform, used by ``score``) and torch (differentiable, used by
``score_tensors``).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..registry import Preprocess

_PIL_RESAMPLE = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST}


def resized_size(width: int, height: int, size: int) -> tuple[int, int]:
    """(width, height) after scaling the shorter side to ``size`` (longer side truncated, as torchvision)."""
    short, long = (width, height) if width <= height else (height, width)
    if short == size:
        return width, height
    new_long = int(size * long / short)
    return (size, new_long) if width <= height else (new_long, size)


def crop_box(width: int, height: int, size: int, rounding: str = "round") -> tuple[int, int]:
    """(left, top) of a centred ``size`` x ``size`` crop: rounded half to even (torchvision) or floored
    (transformers' image processors)."""
    if rounding == "floor":
        return (width - size) // 2, (height - size) // 2
    return int(round((width - size) / 2.0)), int(round((height - size) / 2.0))


def padded_size(width: int, height: int, size: int) -> tuple[int, int]:
    """(width, height) after scaling the longer side to ``size``, each side rounded (open_clip's ResizeMaxSize)."""
    scale = size / float(max(width, height))
    return round(width * scale), round(height * scale)


def pad_box(width: int, height: int, size: int) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) black borders that centre a ``width`` x ``height`` image in a square of ``size``
    (the odd pixel goes to the right / bottom)."""
    pad_w, pad_h = size - width, size - height
    return pad_w // 2, pad_h // 2, pad_w - pad_w // 2, pad_h - pad_h // 2


def _pil_pad(image: Image.Image, spec: Preprocess) -> np.ndarray:
    new_w, new_h = padded_size(image.width, image.height, spec.size)
    if (new_w, new_h) != image.size:
        image = image.resize((new_w, new_h), resample=_PIL_RESAMPLE[spec.resize])
    canvas = Image.new("RGB", (spec.size, spec.size))
    left, top, _, _ = pad_box(new_w, new_h, spec.size)
    canvas.paste(image.convert("RGB"), (left, top))
    return np.array(canvas, dtype=np.uint8)


def pil_to_array(image: Image.Image, spec: Preprocess) -> np.ndarray:
    """Resize + crop (or pad, ``fit="pad"``) in the image's own mode, then convert to RGB: (size, size, 3) uint8."""
    if spec.fit == "pad":
        return _pil_pad(image, spec)
    new_w, new_h = resized_size(image.width, image.height, spec.size)
    if (new_w, new_h) != image.size:
        image = image.resize((new_w, new_h), resample=_PIL_RESAMPLE[spec.resize])
    if new_w < spec.size or new_h < spec.size:
        raise ValueError(f"image of size {image.size} is smaller than the crop {spec.size}")
    left, top = crop_box(new_w, new_h, spec.size, spec.crop)
    image = image.crop((left, top, left + spec.size, top + spec.size))
    return np.array(image.convert("RGB"), dtype=np.uint8)


def image_to_unit_tensor(image: Image.Image, spec: Preprocess) -> torch.Tensor:
    """Resized, cropped (3, S, S) float tensor in [0, 1] by the spec's back end (not yet normalised)."""
    if spec.backend == "tensor":
        pixels = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.uint8).copy()).permute(2, 0, 1)
        return _resize_crop(pixels[None].float() / 255.0, spec)[0]
    return torch.from_numpy(pil_to_array(image, spec)).permute(2, 0, 1).float() / 255.0


def normalize(pixels01: torch.Tensor, spec: Preprocess) -> torch.Tensor:
    """(x - mean) / std per channel on a (B, 3, H, W) float tensor in [0, 1]."""
    mean = torch.tensor(spec.mean, dtype=pixels01.dtype, device=pixels01.device).view(1, 3, 1, 1)
    std = torch.tensor(spec.std, dtype=pixels01.dtype, device=pixels01.device).view(1, 3, 1, 1)
    return (pixels01 - mean) / std


def arrays_to_tensor(arrays: list[np.ndarray], spec: Preprocess, device: torch.device) -> torch.Tensor:
    """Stack preprocessed uint8 HWC arrays into a normalised float32 (B, 3, S, S) batch on ``device``."""
    batch = torch.from_numpy(np.stack(arrays)).to(device, non_blocking=True)
    return normalize(batch.permute(0, 3, 1, 2).float().div(255.0), spec)


def unit_tensors_to_batch(tensors: list[torch.Tensor], spec: Preprocess, device: torch.device) -> torch.Tensor:
    """Stack (3, S, S) [0, 1] tensors into a normalised (B, 3, S, S) batch on ``device``."""
    return normalize(torch.stack(tensors).to(device, non_blocking=True), spec)


def tensor_preprocess(pixels01: torch.Tensor, spec: Preprocess) -> torch.Tensor:
    """Differentiable preprocessing of (B, 3, H, W) [0, 1] tensors: antialiased resize, crop or pad, normalise."""
    if pixels01.ndim == 3:
        pixels01 = pixels01.unsqueeze(0)
    if pixels01.ndim != 4 or pixels01.shape[1] != 3:
        raise ValueError(f"expected pixels of shape (B, 3, H, W) in [0, 1], got {tuple(pixels01.shape)}")
    if not pixels01.is_floating_point():
        raise TypeError(f"expected a float tensor in [0, 1], got {pixels01.dtype}")
    return normalize(_resize_crop(pixels01, spec), spec)


def _resize(x: torch.Tensor, new_w: int, new_h: int, spec: Preprocess) -> torch.Tensor:
    if (new_w, new_h) == (x.shape[-1], x.shape[-2]):
        return x
    return F.interpolate(x, size=(new_h, new_w), mode=spec.resize, antialias=spec.resize != "nearest",
                         align_corners=False if spec.resize != "nearest" else None)


def _resize_crop(x: torch.Tensor, spec: Preprocess) -> torch.Tensor:
    height, width = x.shape[-2:]
    if spec.fit == "pad":
        new_w, new_h = padded_size(width, height, spec.size)
        left, top, right, bottom = pad_box(new_w, new_h, spec.size)
        return F.pad(_resize(x, new_w, new_h, spec), (left, right, top, bottom), value=0.0)
    new_w, new_h = resized_size(width, height, spec.size)
    x = _resize(x, new_w, new_h, spec)
    left, top = crop_box(new_w, new_h, spec.size, spec.crop)
    return x[..., top : top + spec.size, left : left + spec.size]
