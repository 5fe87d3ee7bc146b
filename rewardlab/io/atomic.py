"""Crash-safe writes: a temporary file in the target's folder, flushed and fsynced, then renamed over it.

A kill at any instant leaves either the old file or the new one, never a torn one. Folders of several
files (training state) are written as a new folder and published by atomically replacing a small pointer
file, so a reader always sees one complete folder.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

logger = logging.getLogger(__name__)


def fsync_dir(folder: str | os.PathLike) -> None:
    """Make a rename inside ``folder`` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(str(folder), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[IO[Any]]:
    """Open a temporary file next to ``path``; on a clean exit it replaces ``path`` atomically.

    On an exception the temporary file is removed and ``path`` is untouched."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write supports modes 'w' and 'wb', not {mode!r}")
    with atomic_path(path) as tmp, open(tmp, mode, encoding=None if "b" in mode else encoding) as handle:
        yield handle
        handle.flush()
        os.fsync(handle.fileno())


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path next to ``path`` for libraries that write files by name (safetensors, Parquet);
    on a clean exit the file is fsynced, given the target's permissions and renamed over ``path``."""
    target = Path(path)
    folder = target.parent if str(target.parent) else Path(".")
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        mode = target.stat().st_mode & 0o7777 if target.exists() else 0o666 & ~_umask()
        os.chmod(tmp, mode)
        os.replace(tmp, target)
        fsync_dir(folder)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Atomically replace ``path`` with ``data``."""
    with atomic_write(path, "wb") as handle:
        handle.write(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Atomically replace ``path`` with ``text`` (UTF-8)."""
    with atomic_write(path, "w") as handle:
        handle.write(text)


def write_json(path: str | os.PathLike, value: Any, indent: int | None = 1) -> None:
    """Atomically write ``value`` as JSON; NaN and infinities are refused (they are not JSON)."""
    write_text(path, json.dumps(value, indent=indent, allow_nan=False) + "\n")


# -- folders published through a pointer file --------------------------------------------------------

POINTER_NAME = "LATEST"


def new_version_dir(root: str | os.PathLike, stem: str) -> Path:
    """A fresh, empty folder ``root/.stem.<random>`` to fill before :func:`publish_version`."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{stem}.", dir=root))


def publish_version(root: str | os.PathLike, filled: Path, name: str) -> Path:
    """Make ``filled`` (from :func:`new_version_dir`) the current version ``root/name``.

    Every file in it is fsynced, it is renamed to ``root/name``, then ``root/LATEST`` is atomically
    replaced with ``name``; the other versions and unfinished folders of killed runs are removed afterwards.
    A kill before the pointer is replaced leaves the previous version current; after, the new one. An
    existing ``root/name`` (an export published again) is exchanged with the new folder in one step, so
    ``root/name`` always holds a complete old or new version."""
    root = Path(root)
    for file in filled.rglob("*"):
        if file.is_file():
            with open(file, "rb") as handle:
                os.fsync(handle.fileno())
    fsync_dir(filled)
    final = root / name
    if final.exists():
        _swap_in(filled, final)  # the old folder now sits at ``filled`` and is removed below
    else:
        os.replace(filled, final)
    fsync_dir(root)
    write_text(root / POINTER_NAME, name + "\n")
    for stale in root.iterdir():  # older versions, and hidden unfinished versions of killed runs
        if stale.is_dir() and stale.name != name:
            shutil.rmtree(stale, ignore_errors=True)
    return final


def exchange(a: str | os.PathLike, b: str | os.PathLike) -> None:
    """Swap two paths in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``); OSError where unsupported."""
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        raise OSError(errno.ENOSYS, "renameat2 is not available")
    at_cwd, rename_exchange = -100, 2
    if renameat2(at_cwd, os.fsencode(a), at_cwd, os.fsencode(b), rename_exchange) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), str(a))


def _swap_in(filled: Path, final: Path) -> None:
    """Put ``filled`` at ``final`` and the old ``final`` at ``filled``: atomically where the system can
    exchange two paths; elsewhere the old folder is first moved aside (a kill in between leaves it there,
    hidden, instead of at ``final``)."""
    try:
        exchange(filled, final)
    except OSError:
        aside = Path(tempfile.mkdtemp(prefix=f".{final.name}.old.", dir=final.parent))
        os.replace(final, aside / final.name)
        os.replace(filled, final)
        os.replace(aside / final.name, filled)
        aside.rmdir()


def current_version(root: str | os.PathLike) -> Path | None:
    """The folder ``root/LATEST`` names, or None when nothing was published yet."""
    pointer = Path(root) / POINTER_NAME
    if not pointer.is_file():
        return None
    name = pointer.read_text().strip()
    if not name or "/" in name or name.startswith("."):
        return None
    folder = Path(root) / name
    return folder if folder.is_dir() else None
