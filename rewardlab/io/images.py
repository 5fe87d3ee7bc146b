"""Opening images from paths, PIL images or arrays, and turning every mode into RGB."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from ..errors import ImageLoadError

ImageInput = str | os.PathLike | Image.Image | np.ndarray | bytes
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}




def describe(image: ImageInput, index: int) -> str:
    """A name for an input in messages: its path, or its position in the list."""
    if isinstance(image, (str, os.PathLike)):
        return str(image)
    return f"image #{index} ({type(image).__name__})"


def _from_array(array: np.ndarray, name: str) -> Image.Image:
    if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
        array = np.moveaxis(array, 0, -1)  # CHW -> HWC
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        raise ImageLoadError(name, f"array of shape {array.shape} is not HxW, HxWx3 or HxWx4")
    if array.dtype == np.uint8:
        return Image.fromarray(array)
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise ImageLoadError(name, "float array contains NaN or inf")
        low, high = float(array.min(initial=0.0)), float(array.max(initial=0.0))
        if low < 0.0 or high > 1.0:
            hint = "divide 0-255 values by 255" if high > 1.0 and low >= 0.0 else "map [-1, 1] images with (x + 1) / 2"
            raise ImageLoadError(name, f"float array spans [{low:.3g}, {high:.3g}], outside [0, 1]", hint)
        return Image.fromarray((array * 255.0 + 0.5).astype(np.uint8))
    if array.dtype == np.uint16:
        return Image.fromarray(((array.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8))
    if array.dtype == bool:
        return Image.fromarray(array.astype(np.uint8) * 255)
    raise ImageLoadError(name, f"unsupported array dtype {array.dtype}")


def to_8bit_mode(image: Image.Image) -> Image.Image:
    """Bring any PIL mode to one whose resize is well defined: L, LA, RGB or RGBA.

    Modes the reference resizes verbatim (L, LA, RGB, RGBA) are kept so that results match it; palette
    images become RGB(A) (PIL would resize their indices with nearest neighbour), 16/32-bit integer and
    float images are rescaled to 8 bits (PIL's plain conversion clips them to white), CMYK and YCbCr
    become RGB.
    """
    mode = image.mode
    if mode in ("L", "LA", "RGB", "RGBA"):
        return image
    if mode in ("P", "PA"):
        return image.convert("RGBA" if "transparency" in image.info or mode == "PA" else "RGB")
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if mode.startswith("I;16") or array.max(initial=0) > 255 else 255.0
        if mode == "F" and array.max(initial=0) <= 1.0:
            top = 1.0
        return Image.fromarray((np.clip(array / top, 0, 1) * 255 + 0.5).astype(np.uint8), "L")
    if mode == "1":
        return image.convert("L")
    return image.convert("RGB")  # CMYK, YCbCr, LAB, HSV, RGBX, La, RGBa


def open_image(image: ImageInput, index: int = 0) -> Image.Image:
    """Open one input as a PIL image in an 8-bit mode (L, LA, RGB or RGBA); EXIF rotation applied."""
    name = describe(image, index)
    if isinstance(image, Image.Image):
        pil = image
    elif isinstance(image, (bytes, bytearray)):
        try:
            with Image.open(io.BytesIO(image)) as handle:
                handle.load()
                pil = ImageOps.exif_transpose(handle)
        except Exception as exc:
            raise ImageLoadError(name, f"cannot decode image bytes ({type(exc).__name__}: {exc})") from exc
    elif isinstance(image, np.ndarray):
        pil = _from_array(image, name)
    elif isinstance(image, (str, os.PathLike)):
        path = Path(image)
        if not path.exists():
            raise ImageLoadError(name, "file not found")
        if not path.is_file():
            raise ImageLoadError(name, "not a file")
        try:
            with Image.open(path) as handle:
                handle.load()
                pil = ImageOps.exif_transpose(handle)
        except Exception as exc:
            raise ImageLoadError(name, f"cannot decode image ({type(exc).__name__}: {exc})") from exc
    else:
        raise ImageLoadError(name, f"unsupported input type {type(image).__name__}; pass a path, PIL image or array")
    if pil.width == 0 or pil.height == 0:
        raise ImageLoadError(name, f"empty image ({pil.width}x{pil.height})")
    return to_8bit_mode(pil)


def expand_paths(items: list[str]) -> list[str]:
    """Expand directories into their image files (sorted); files are kept in the given order."""
    out: list[str] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            out.extend(str(p) for p in sorted(path.rglob("*")) if p.suffix.lower() in IMAGE_SUFFIXES)
        else:
            out.append(item)
    return out
