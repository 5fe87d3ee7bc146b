"""Finding weight files: a local path, the huggingface_hub cache, or a download.

Download locations come only from the registry (never from a checkpoint or data file). When the network
is unreachable (DNS failure, connection refused) the cache is consulted and a missing file fails within
seconds instead of after the hub client's retry loops.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import time
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

from ..errors import WeightsNotFoundError

if TYPE_CHECKING:
    from ..registry import WeightSource

logger = logging.getLogger(__name__)

_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,200}$")
_REACHABLE: dict[tuple[str, int], tuple[float, bool]] = {}
PROBE_TIMEOUT_S = 2.0


def _hub_cache_dir() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def host_reachable(url: str, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Whether a TCP connection to ``url``'s host can be opened (cached for 60 s per host)."""
    parsed = urlparse(url)
    host, port = parsed.hostname or "", parsed.port or (443 if parsed.scheme == "https" else 80)
    cached = _REACHABLE.get((host, port))
    if cached and time.monotonic() - cached[0] < 60:
        return cached[1]
    try:
        with socket.create_connection((host, port), timeout=timeout):
            ok = True
    except OSError:
        ok = False
    _REACHABLE[(host, port)] = (time.monotonic(), ok)
    if not ok:
        logger.info("%s:%s is unreachable: using cached files only", host, port)
    return ok


def safe_file_name(name: str) -> str:
    """A cache file name that cannot leave its folder (no separators, no leading dot, no '..')."""
    if not _SAFE_NAME.match(name) or ".." in name:
        raise WeightsNotFoundError(f"refusing weight file name {name!r}", "file names must be plain names")
    return name


def _fetch(source: WeightSource) -> str:
    """Return a local path for ``source``, downloading it unless offline."""
    from huggingface_hub import constants

    if source.kind == "hf":
        from huggingface_hub import hf_hub_download

        offline = constants.HF_HUB_OFFLINE or not host_reachable(constants.ENDPOINT)
        return hf_hub_download(source.location, source.filename, revision=source.revision, local_files_only=offline)
    if source.kind == "url":
        if urlparse(source.location).scheme != "https":
            raise WeightsNotFoundError(f"refusing non-HTTPS weight URL {source.location}")
        folder = _hub_cache_dir() / "rewardlab-url"
        target = folder / safe_file_name(source.filename)
        if target.is_file():
            return str(target)
        if constants.HF_HUB_OFFLINE:
            raise OSError(f"HF_HUB_OFFLINE is set and {target} is not cached")
        if not host_reachable(source.location):
            raise OSError(f"{urlparse(source.location).hostname} is unreachable and {target} is not cached")
        from huggingface_hub.file_download import http_get

        from .atomic import atomic_write

        folder.mkdir(parents=True, exist_ok=True)
        with atomic_write(target, "wb") as out:
            http_get(source.location, out)
        return str(target)
    raise WeightsNotFoundError(f"unknown weight source kind {source.kind!r}")


def resolve_weights(name: str, sources: tuple[WeightSource, ...], checkpoint: str | os.PathLike | None = None) -> str:
    """Path of the weight file of model ``name``: ``checkpoint`` if given, else the cache or a download.

    ``sources`` are tried in the registry's order; when none works the error names every file and place
    tried and how to pass a local file instead.
    """
    if checkpoint is not None:
        path = Path(checkpoint).expanduser()
        if not path.is_file():
            raise WeightsNotFoundError(f"checkpoint for {name} not found or not a regular file: {path}",
                                       "check the path given with checkpoint= / --checkpoint")
        return str(path)
    failures = []
    for source in sources:
        try:
            return _fetch(source)
        except Exception as exc:  # offline, 404, no network: try the next source
            where = f"hub repo {source.location}" if source.kind == "hf" else source.location
            failures.append(f"{source.filename} from {where}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
    if not failures:
        raise WeightsNotFoundError(f"{name} has no download source", "pass checkpoint=PATH / --checkpoint PATH")
    tried = "; ".join(failures)
    raise WeightsNotFoundError(
        f"cannot get weights for {name} (tried: {tried})",
        f"download the file elsewhere and pass it with rewardlab.load({name!r}, checkpoint=PATH) or "
        f"`--checkpoint PATH`, or put it in the huggingface_hub cache "
        f"(HF_HOME={os.environ.get('HF_HOME', '~/.cache/huggingface')})")
