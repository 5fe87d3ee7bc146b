"""Finding weight files: a local path, the huggingface_hub cache, or a download."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import WeightsNotFoundError
from ..registry import ModelSpec, WeightSource


def _hub_cache_dir() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def _fetch(source: WeightSource) -> str:
    """Return a local path for ``source``, downloading it unless HF_HUB_OFFLINE is set."""
    if source.kind == "hf":
        from huggingface_hub import hf_hub_download

        return hf_hub_download(source.location, source.filename, revision=source.revision)
    if source.kind == "url":
        from huggingface_hub import constants

        target = _hub_cache_dir() / "rewardlab-url" / source.filename
        if target.is_file():
            return str(target)
        if constants.HF_HUB_OFFLINE:
            raise OSError(f"HF_HUB_OFFLINE is set and {target} is not cached")
        from huggingface_hub.file_download import http_get

        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(target.suffix + ".incomplete")
        with open(partial, "wb") as out:
            http_get(source.location, out)
        os.replace(partial, target)
        return str(target)
    raise ValueError(f"unknown weight source kind {source.kind!r}")


def resolve_weights(spec: ModelSpec, checkpoint: str | os.PathLike | None = None) -> str:
    """Path of the weight file for ``spec``: ``checkpoint`` if given, else the cache or a download.

    Sources are tried in the registry's order; when none works the error names every file and place
    tried and how to pass a local file instead.
    """
    if checkpoint is not None:
        path = Path(checkpoint).expanduser()
        if not path.is_file():
            raise WeightsNotFoundError(f"checkpoint for {spec.name} not found: {path}")
        return str(path)
    failures = []
    for source in spec.sources:
        try:
            return _fetch(source)
        except Exception as exc:  # offline, 404, no network: try the next source
            where = f"hub repo {source.location}" if source.kind == "hf" else source.location
            failures.append(f"{source.filename} from {where}: {type(exc).__name__}: {exc}")
    tried = "\n  ".join(failures)
    raise WeightsNotFoundError(
        f"cannot get weights for {spec.name}. Tried:\n  {tried}\n"
        f"Download the file elsewhere and pass it with rewardlab.load({spec.name!r}, checkpoint=PATH) "
        f"or `--checkpoint PATH`, or put it in the huggingface_hub cache (HF_HOME={os.environ.get('HF_HOME', '~/.cache/huggingface')})."
    )
