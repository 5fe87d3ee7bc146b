"""Faithful PNG text metadata: add or replace one ``tEXt`` entry, keep every other chunk byte for byte.

The image data is never decoded or re-encoded: chunks are copied as they are (eXIf, pHYs, iCCP, other
text chunks, ...), only rewardlab's own ``tEXt`` chunk with the given keyword is replaced. Files that
cannot be rewritten faithfully are refused: animated PNGs (``acTL``), files that are not PNGs (a JPEG
named ``.png``), and files with a broken chunk structure or CRC. The new file replaces the old
atomically (temporary file, fsync, rename).
"""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

from ..errors import ImageLoadError
from .atomic import write_bytes

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MAX_PNG_BYTES = 512 * 1024 * 1024


def read_chunks(data: bytes, name: str) -> list[tuple[bytes, bytes, bytes]]:
    """``[(type, payload, raw bytes of the whole chunk)]`` of a PNG; a broken structure is an error."""
    if not data.startswith(PNG_SIGNATURE):
        raise ImageLoadError(name, "not a PNG file (wrong signature)", "metadata is only written into real PNGs")
    chunks, offset = [], len(PNG_SIGNATURE)
    while offset < len(data):
        if offset + 12 > len(data):
            raise ImageLoadError(name, "truncated PNG chunk")
        (length,) = struct.unpack(">I", data[offset : offset + 4])
        kind = data[offset + 4 : offset + 8]
        end = offset + 12 + length
        if length > 2**31 - 1 or end > len(data):
            raise ImageLoadError(name, f"PNG chunk {kind!r} runs past the end of the file")
        payload = data[offset + 8 : offset + 8 + length]
        (crc,) = struct.unpack(">I", data[end - 4 : end])
        if zlib.crc32(kind + payload) & 0xFFFFFFFF != crc:
            raise ImageLoadError(name, f"PNG chunk {kind!r} has a bad CRC")
        chunks.append((kind, payload, data[offset:end]))
        offset = end
        if kind == b"IEND":
            break
    if not chunks or chunks[0][0] != b"IHDR" or chunks[-1][0] != b"IEND":
        raise ImageLoadError(name, "PNG without IHDR first and IEND last")
    return chunks


def make_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF)


def _text_keyword(payload: bytes) -> bytes:
    return payload.split(b"\x00", 1)[0]


def set_png_text(path: str | os.PathLike, keyword: str, text: str) -> None:
    """Set ``keyword`` = ``text`` in the PNG at ``path`` (a ``tEXt`` chunk before the first ``IDAT``)."""
    name = str(path)
    key = keyword.encode("latin-1", errors="replace")[:79]
    if not key or b"\x00" in key:
        raise ImageLoadError(name, f"invalid PNG text keyword {keyword!r}")
    value = text.encode("latin-1", errors="replace")
    file = Path(path)
    if not file.is_file():
        raise ImageLoadError(name, "not a regular file")
    if file.stat().st_size > MAX_PNG_BYTES:
        raise ImageLoadError(name, "PNG larger than 512 MB; refusing to rewrite it")
    data = file.read_bytes()
    chunks = read_chunks(data, name)
    kinds = {kind for kind, _, _ in chunks}
    if b"acTL" in kinds:
        raise ImageLoadError(name, "animated PNG (APNG)", "rewardlab does not rewrite animations; use a sidecar file")
    out = [PNG_SIGNATURE]
    inserted = False
    for kind, payload, raw in chunks:
        if kind == b"tEXt" and _text_keyword(payload) == key:
            continue  # our previous value
        if kind == b"IDAT" and not inserted:
            out.append(make_chunk(b"tEXt", key + b"\x00" + value))
            inserted = True
        out.append(raw)
    if not inserted:
        raise ImageLoadError(name, "PNG without image data (IDAT)")
    write_bytes(file, b"".join(out))


def get_png_text(path: str | os.PathLike) -> dict[str, str]:
    """All ``tEXt`` entries of a PNG (keyword -> text)."""
    entries = {}
    for kind, payload, _ in read_chunks(Path(path).read_bytes(), str(path)):
        if kind == b"tEXt":
            key, _, value = payload.partition(b"\x00")
            entries[key.decode("latin-1")] = value.decode("latin-1")
    return entries
