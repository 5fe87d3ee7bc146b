"""Output paths checked before any work starts: the folder exists and is writable, no input is overwritten."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from ..errors import UsageError


def check_output_path(path: str | os.PathLike, option: str, inputs: Iterable[str | os.PathLike] = ()) -> Path:
    """``path`` if a file can be written there; else a UsageError naming ``option``."""
    target = Path(path)
    folder = target.parent if str(target.parent) else Path(".")
    if target.is_dir():
        raise UsageError(f"{option} {target} is a folder", "give a file path")
    if not folder.is_dir():
        raise UsageError(f"{option} {target}: folder {folder} does not exist", "create it first")
    if not os.access(folder, os.W_OK):
        raise UsageError(f"{option} {target}: folder {folder} is not writable")
    resolved = target.resolve()
    for item in inputs:
        try:
            if Path(item).resolve() == resolved:
                raise UsageError(f"{option} {target} is one of the inputs", "choose another output path")
        except OSError:
            continue
    return target
