"""The one reader of data files (JSONL, JSON lists, Parquet) and the one image-path resolver.

Data files are untrusted: only regular files are opened (a FIFO or a device is named and refused before
any read), every row must be an object, fields are type-checked by :class:`Record`, and every error is a
:class:`DataError` naming the file and line. Relative image paths resolve against the data file's folder
(or an explicit image root); paths that leave that folder are refused unless the caller allows it.
"""

from __future__ import annotations

import json
import math
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import DataError

MAX_DATA_FILE_BYTES = 4 * 1024**3


def check_regular_file(path: str | os.PathLike, what: str = "data file") -> Path:
    """``path`` if it is an existing regular file (symlinks followed); else a DataError naming it."""
    path = Path(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise DataError(f"{what} not found: {path}", "check the path") from None
    except OSError as exc:
        raise DataError(f"cannot access {what} {path}: {exc.strerror}") from None
    if not stat.S_ISREG(mode):
        kind = "folder" if stat.S_ISDIR(mode) else "FIFO" if stat.S_ISFIFO(mode) else \
            "device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "socket" if stat.S_ISSOCK(mode) else "special file"
        raise DataError(f"{what} {path} is a {kind}, not a regular file", "pass a regular file")
    return path


@dataclass(frozen=True)
class Record:
    """One row of a data file, with where it came from for error messages."""

    source: Path
    line: int  # 1-based line (JSONL) or row (JSON list, Parquet)
    row: dict
    unit: str = "line"

    @property
    def where(self) -> str:
        return f"{self.source} {self.unit} {self.line}"

    def error(self, message: str, hint: str | None = None) -> DataError:
        return DataError(f"{self.where}: {message}", hint)

    def text(self, key: str, required: bool = True, default: str | None = None) -> str | None:
        """A non-empty string field (``null`` and numbers are errors, not the text "None" / "12")."""
        if key not in self.row or self.row[key] is None:
            if required:
                raise self.error(f"needs a string {key!r} (has: {', '.join(sorted(self.row)) or 'nothing'})")
            return default
        value = self.row[key]
        if not isinstance(value, str) or not value.strip():
            raise self.error(f"{key!r} must be a non-empty string, got {value!r:.80}")
        return value

    def number(self, key: str, required: bool = True, default: float | None = None) -> float | None:
        """A finite number field (booleans and NaN are errors)."""
        if key not in self.row or self.row[key] is None:
            if required:
                raise self.error(f"needs a number {key!r}")
            return default
        value = self.row[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise self.error(f"{key!r} must be a finite number, got {value!r:.80}")
        return float(value)

    def require(self, *keys: str) -> None:
        missing = [k for k in keys if k not in self.row]
        if missing:
            raise self.error(f"missing field(s) {', '.join(missing)} (has: {', '.join(sorted(self.row)) or 'nothing'})")


def read_records(path: str | os.PathLike, objects_only: bool = True) -> list[Record]:
    """Rows of a ``.jsonl`` (one object per line; blank lines skipped), ``.json`` (a list of objects) or
    ``.parquet`` file. ``objects_only=False`` also keeps rows that are plain values (a list of strings)."""
    path = check_regular_file(path)
    if path.stat().st_size > MAX_DATA_FILE_BYTES:
        raise DataError(f"{path} is larger than 4 GiB", "split it into shards")
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq

            rows = pq.read_table(path).to_pylist()
        except ImportError:
            raise DataError(f"{path}: reading Parquet needs pyarrow", "pip install 'rewardlab[eval]'") from None
        except Exception as exc:
            raise DataError(f"{path}: not a readable Parquet file ({type(exc).__name__}: {exc})") from None
        return [Record(path, n, row, "row") for n, row in enumerate(rows, start=1)]
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc})") from None
    if path.suffix == ".json":
        try:
            items = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: not valid JSON ({exc})") from None
        if not isinstance(items, list):
            raise DataError(f"{path}: expected a JSON list of objects, got {type(items).__name__}")
        records = [Record(path, n, item, "item") for n, item in enumerate(items, start=1)]
    else:
        records = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path} line {number}: not valid JSON ({exc.msg})") from None
            records.append(Record(path, number, item))
    for record in records if objects_only else ():
        if not isinstance(record.row, dict):
            raise record.error(f"expected a JSON object, got {type(record.row).__name__}")
    return records


def is_inside(path: str | os.PathLike, root: str | os.PathLike, strict: bool = False) -> bool:
    """Whether ``path`` lies in ``root`` once both are resolved (``..`` and symlinks followed). With
    ``strict``, a path that does not exist (or cannot be resolved) is not inside."""
    try:
        resolved = Path(path).resolve(strict=strict)
    except OSError:
        return False
    base = Path(root).resolve()
    return resolved == base or base in resolved.parents


def resolve_image(value: Any, root: str | os.PathLike, allow_outside: bool = False, where: str = "") -> Any:
    """A data file's image reference -> what the scorer opens.

    Strings are paths: relative ones resolve against ``root`` (the data file's folder or the image root).
    A path that ends up outside ``root`` (``../``, absolute paths, symlinks leading out) is refused unless
    ``allow_outside``. Bytes, arrays and PIL images pass through unchanged."""
    if not isinstance(value, str):
        if isinstance(value, os.PathLike):
            value = os.fspath(value)
        else:
            return value
    if not value:
        raise DataError(f"{where}: empty image path")
    base = Path(root).resolve()
    candidate = Path(value).expanduser()
    full = candidate if candidate.is_absolute() else base / candidate
    if not allow_outside and not is_inside(full, base):
        raise DataError(f"{where}: image {value!r} is outside the data folder {base}",
                        "move it under that folder, set the image root, or pass --allow-outside-root")
    return str(full)
