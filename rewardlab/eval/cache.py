"""A persistent score cache keyed by (model, checkpoint hash, image content hash, prompt)."""

from __future__ import annotations

import hashlib
import io
import os
import sqlite3
from pathlib import Path
from stat import S_ISREG
from typing import Any

from PIL import Image

_FILE_HASHES: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes, remembered per (path, size, mtime) for this process."""
    stat = os.stat(path)
    if not S_ISREG(stat.st_mode):  # a FIFO or /dev/zero would block or never end
        raise OSError(f"{path} is not a regular file")
    key = (os.path.abspath(path), stat.st_size, stat.st_mtime_ns)
    if key not in _FILE_HASHES:
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
        _FILE_HASHES[key] = digest.hexdigest()
    return _FILE_HASHES[key]


def image_hash(image: Any) -> str | None:
    """Content hash of an image input; None when it cannot be read (the scorer then reports it)."""
    try:
        if isinstance(image, (str, os.PathLike)):
            return file_sha256(image)
        if isinstance(image, (bytes, bytearray)):
            return hashlib.sha256(image).hexdigest()
        if isinstance(image, Image.Image):
            buffer = io.BytesIO()
            buffer.write(f"{image.mode}{image.size}".encode())
            buffer.write(image.tobytes())
            return hashlib.sha256(buffer.getvalue()).hexdigest()
        import numpy as np

        if isinstance(image, np.ndarray):
            return hashlib.sha256(f"{image.dtype}{image.shape}".encode() + image.tobytes()).hexdigest()
    except OSError:
        return None
    return None


def default_cache_path() -> Path:
    return Path(os.environ.get("REWARDLAB_CACHE", Path.home() / ".cache" / "rewardlab" / "scores.sqlite"))


class ScoreCache:
    """SQLite store of scores; ``model_key`` identifies a model and its exact weights."""

    def __init__(self, path: str | os.PathLike | None = None):
        self.path = Path(path) if path else default_cache_path()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(self.path))
        self._db.execute("CREATE TABLE IF NOT EXISTS scores (model TEXT, image TEXT, prompt TEXT, score REAL, "
                         "PRIMARY KEY (model, image, prompt))")

    @staticmethod
    def model_key(scorer) -> str:
        weights = file_sha256(scorer.checkpoint) if scorer.checkpoint else "no-checkpoint"
        return f"{scorer.name}|{weights}|{scorer.dtype}"

    def get_many(self, model: str, keys: list[tuple[str, str]]) -> dict[tuple[str, str], float]:
        found = {}
        for image, prompt in set(keys):
            row = self._db.execute("SELECT score FROM scores WHERE model=? AND image=? AND prompt=?",
                                   (model, image, prompt)).fetchone()
            if row is not None:
                found[(image, prompt)] = row[0]
        return found

    def put_many(self, model: str, items: dict[tuple[str, str], float]) -> None:
        with self._db:
            self._db.executemany("INSERT OR REPLACE INTO scores VALUES (?, ?, ?, ?)",
                                 [(model, image, prompt, score) for (image, prompt), score in items.items()])

    def close(self) -> None:
        self._db.close()
