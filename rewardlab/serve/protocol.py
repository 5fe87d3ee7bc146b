"""Wire formats of the reward server: request models with explicit limits, base64 images, allowed-root
paths, the ``.npy`` body, and the length-prefixed frames between the server and its device workers.

Nothing here unpickles: JSON, raw bytes, and ``.npy`` headers read by numpy's header parser (a Python
literal, evaluated with ``ast.literal_eval``); ``object`` dtypes are refused before any data is read.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Annotated, Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from ..io.records import is_inside

MAX_PROMPT_CHARS = 4096
MAX_MODELS = 16
MAX_ITEMS = 1024  # hard ceiling of the per-request item limit (the server's own limit is lower)

# one prompt for all images, or one per image (per-item lengths are checked by check_prompts)
Prompts = Annotated[list[str], Field(max_length=MAX_ITEMS)] | Annotated[str, Field(max_length=MAX_PROMPT_CHARS)]


class RequestError(Exception):
    """A request the server refuses: HTTP status, message, and per-item messages (index -> message)."""

    def __init__(self, status: int, message: str, errors: dict[int, str] | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.errors = errors or {}
        self.headers = headers or {}

    def body(self) -> dict:
        out: dict[str, Any] = {"detail": self.message}
        if self.errors:
            out["errors"] = {str(k): v for k, v in sorted(self.errors.items())}
        return out


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ScoreRequest(_Strict):
    """``POST /v1/score``: one prompt per image (or one prompt for all), images as base64 or paths."""

    prompts: Prompts
    images: list[str] | None = Field(default=None, max_length=MAX_ITEMS)
    paths: list[str] | None = Field(default=None, max_length=MAX_ITEMS)
    models: list[str] | None = Field(default=None, min_length=1, max_length=MAX_MODELS)
    weights: dict[str, float] | None = Field(default=None, max_length=MAX_MODELS)


class NpyHeader(_Strict):
    """First line of ``POST /v1/score/npy``; an ``.npy`` uint8 (B, H, W, 3) array follows."""

    prompts: Prompts
    models: list[str] | None = Field(default=None, min_length=1, max_length=MAX_MODELS)
    weights: dict[str, float] | None = Field(default=None, max_length=MAX_MODELS)


class RewardRequest(BaseModel):
    """OpenRLHF's ``POST /get_reward``: ``query`` holds the base64 images, ``prompts`` their texts."""

    model_config = ConfigDict(extra="ignore")
    query: list[str] = Field(max_length=MAX_ITEMS)
    prompts: list[str] | None = Field(default=None, max_length=MAX_ITEMS)
    labels: Any = None


def check_prompts(prompts: list[str] | str, count: int, max_items: int) -> list[str]:
    """One prompt per item (a single string is repeated); lengths checked."""
    if count == 0:
        raise RequestError(400, "no images in the request")
    if count > max_items:
        raise RequestError(413, f"{count} images in one request; the limit is {max_items}",
                           headers={"X-Max-Items": str(max_items)})
    if isinstance(prompts, str):
        prompts = [prompts] * count
    if len(prompts) != count:
        raise RequestError(400, f"{len(prompts)} prompts for {count} images; pass one prompt or one per image")
    long = {i: f"prompt has {len(p)} characters; the limit is {MAX_PROMPT_CHARS}" for i, p in enumerate(prompts)
            if len(p) > MAX_PROMPT_CHARS}
    if long:
        raise RequestError(400, f"{len(long)} prompts are too long", long)
    return list(prompts)


def decode_base64_images(encoded: list[str]) -> list[bytes]:
    """Raw bytes of each base64 image (a ``data:image/...;base64,`` prefix is allowed); every bad item
    is listed in one 400 error. Decoding the image itself happens at scoring time (per-item errors)."""
    out, errors = [], {}
    for i, text in enumerate(encoded):
        if text.startswith("data:"):
            _, _, text = text.partition(",")
        try:
            data = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError) as exc:
            errors[i] = f"image #{i}: not valid base64 ({exc})"
            continue
        if not data:
            errors[i] = f"image #{i}: empty"
        out.append(data)
    if errors:
        raise RequestError(400, f"{len(errors)} of {len(encoded)} images are not valid base64", errors)
    return out


def resolve_paths(paths: list[str], allowed_root: Path | None) -> list[str]:
    """Absolute paths inside ``allowed_root`` (symlinks resolved); paths are refused without a root."""
    if allowed_root is None:
        raise RequestError(400, "image paths are disabled on this server", hint_errors(len(paths),
                           "start the server with --allowed-root DIR, or send base64 images"))
    root = allowed_root.resolve()
    out, errors = [], {}
    for i, raw in enumerate(paths):
        if "\x00" in raw:
            errors[i] = f"path #{i}: contains a NUL byte"
            continue
        if not is_inside(root / raw, root):
            errors[i] = f"path #{i} {raw!r}: outside the allowed root"
            continue
        out.append(str((root / raw).resolve()))
    if errors:
        raise RequestError(400, f"{len(errors)} of {len(paths)} paths are not allowed", errors)
    return out


def hint_errors(count: int, message: str) -> dict[int, str]:
    return dict.fromkeys(range(count), message)


# -- .npy bodies ------------------------------------------------------------------------------------------

@dataclass
class NpyBatch:
    header: NpyHeader
    array: np.ndarray  # read-only (B, H, W, 3) uint8 view over the request body


def parse_npy_body(body: bytes, max_items: int, max_side: int, max_header: int = 1 << 20) -> NpyBatch:
    """Split ``JSON header line + .npy`` and validate the array's header (dtype uint8, C order, shape
    (B, H, W, 3), sizes within limits, exact byte count) before touching the data; the array is a
    zero-copy view of the body."""
    newline = body.find(b"\n", 0, max_header)
    if newline < 0:
        raise RequestError(400, "the body must start with one JSON header line ending in a newline "
                                f"(at most {max_header} bytes)")
    try:
        header = NpyHeader.model_validate_json(body[:newline])
    except ValueError as exc:
        raise RequestError(422, f"bad JSON header line: {first_error(exc)}") from None
    view = memoryview(body)[newline + 1:]
    stream = io.BytesIO(view[:4096].tobytes())  # the .npy header is at most a few KiB
    try:
        version = np.lib.format.read_magic(stream)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(stream, max_header_size=4096)
        elif version in ((2, 0), (3, 0)):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(stream, max_header_size=4096)
        else:
            raise ValueError(f"unsupported .npy version {version}")
    except (ValueError, SyntaxError, EOFError) as exc:
        raise RequestError(400, f"the body after the header line is not a .npy array ({exc})") from None
    if dtype != np.dtype(np.uint8) or dtype.hasobject:
        raise RequestError(400, f"the array has dtype {dtype}; send uint8 pixels (B, H, W, 3)")
    if fortran:
        raise RequestError(400, "the array is in Fortran order; send a C-contiguous array (np.ascontiguousarray)")
    if len(shape) != 4 or shape[3] != 3:
        raise RequestError(400, f"the array has shape {shape}; send (B, H, W, 3) RGB pixels")
    count, height, width = shape[:3]
    if not (1 <= height <= max_side and 1 <= width <= max_side):
        raise RequestError(413 if max(height, width) > max_side else 400,
                           f"images of {height}x{width} px; each side must be 1..{max_side}")
    offset = stream.tell()
    expected = count * height * width * 3
    if len(view) - offset != expected:
        raise RequestError(400, f"the array header promises {expected} bytes of pixels but {len(view) - offset} follow")
    prompts = check_prompts(header.prompts, count, max_items)
    header.prompts = prompts
    array = np.frombuffer(body, dtype=np.uint8, count=expected, offset=newline + 1 + offset).reshape(shape)
    return NpyBatch(header, array)


def encode_npy_body(header: dict, array: np.ndarray) -> bytes:
    """Client side of :func:`parse_npy_body`."""
    buffer = io.BytesIO()
    buffer.write(json.dumps(header).encode() + b"\n")
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def first_error(exc: Exception) -> str:
    errors = getattr(exc, "errors", None)
    if callable(errors):
        try:
            first = errors()[0]
            where = ".".join(str(p) for p in first.get("loc", ()))
            return f"{where}: {first.get('msg')}" if where else str(first.get("msg"))
        except Exception:  # pragma: no cover - best effort message
            pass
    return str(exc).splitlines()[0]




# -- frames between the server and its device workers ----------------------------------------------------

_FRAME = struct.Struct(">QQ")  # header length, payload length
MAX_FRAME_HEADER = 64 << 20


def write_frame(stream: IO[bytes], header: dict, payload: bytes | memoryview = b"") -> None:
    data = json.dumps(header, allow_nan=False).encode()
    stream.write(_FRAME.pack(len(data), len(payload)))
    stream.write(data)
    if payload:
        stream.write(payload)
    stream.flush()


def _read_exact(stream: IO[bytes], size: int) -> bytes:
    chunks, left = [], size
    while left:
        chunk = stream.read(left)
        if not chunk:
            raise EOFError("stream closed")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def read_frame(stream: IO[bytes]) -> tuple[dict, bytes]:
    header_len, payload_len = _FRAME.unpack(_read_exact(stream, _FRAME.size))
    if header_len > MAX_FRAME_HEADER:
        raise EOFError(f"frame header of {header_len} bytes")
    header = json.loads(_read_exact(stream, header_len))
    return header, _read_exact(stream, payload_len) if payload_len else b""


def pack_items(items: list) -> tuple[list[dict], bytes]:
    """Describe images (bytes, uint8 arrays, path strings) for a frame: per-item records + one payload."""
    records, parts, offset = [], [], 0
    for item in items:
        if isinstance(item, (bytes, bytearray, memoryview)):
            data = bytes(item)
            records.append({"kind": "bytes", "offset": offset, "size": len(data)})
        elif isinstance(item, np.ndarray):
            data = np.ascontiguousarray(item, dtype=np.uint8).tobytes()
            records.append({"kind": "array", "offset": offset, "size": len(data), "shape": list(item.shape)})
        elif isinstance(item, (str, os.PathLike)):
            records.append({"kind": "path", "path": str(item)})
            continue
        else:
            raise TypeError(f"cannot send a {type(item).__name__} to a worker")
        parts.append(data)
        offset += len(data)
    return records, b"".join(parts)


def unpack_items(records: list[dict], payload: bytes) -> list:
    out = []
    for record in records:
        if record["kind"] == "path":
            out.append(record["path"])
            continue
        chunk = payload[record["offset"]: record["offset"] + record["size"]]
        if record["kind"] == "array":
            out.append(np.frombuffer(chunk, dtype=np.uint8).reshape(record["shape"]))
        else:
            out.append(chunk)
    return out
