"""Loading diffusers pipelines: a local folder or a hub id, offline-aware, on a device, in a dtype."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from ..errors import UsageError, WeightsNotFoundError

logger = logging.getLogger(__name__)

SCHEDULERS = ("default", "ddim")


def load_pipeline(name_or_path: str | os.PathLike, device: str | None = None, dtype: str | None = None,
                  scheduler: str | None = None, revision: str | None = None):
    """``DiffusionPipeline.from_pretrained`` of a diffusers folder or hub id, moved to ``device``.

    ``dtype`` defaults to fp16 on CUDA and fp32 elsewhere; ``scheduler="ddim"`` swaps in DDIM built from the
    pipeline's scheduler config. When the hub cannot be reached (or ``HF_HUB_OFFLINE`` is set) only the
    local cache is read, so an uncached id fails at once with one line instead of retrying the network."""
    import diffusers
    from diffusers import DDIMScheduler, DiffusionPipeline
    from huggingface_hub import constants
    from packaging.version import Version

    from ..io.hub import host_reachable
    from ..scoring.scorer import DTYPES, resolve_device

    if scheduler not in (None, *SCHEDULERS):
        raise UsageError(f"unknown scheduler {scheduler!r}", f"use one of {', '.join(SCHEDULERS)}")
    if dtype is not None and dtype not in DTYPES:
        raise UsageError(f"unknown dtype {dtype!r}", f"use one of {', '.join(DTYPES)}")
    target = resolve_device(device)
    torch_dtype = DTYPES[dtype] if dtype else (DTYPES["fp16"] if target.type == "cuda" else DTYPES["fp32"])
    source = os.fspath(name_or_path)
    local = Path(source).is_dir()
    offline = not local and (constants.HF_HUB_OFFLINE or not host_reachable(constants.ENDPOINT))
    dtype_key = "dtype" if Version(diffusers.__version__) >= Version("0.42") else "torch_dtype"
    try:
        pipe = DiffusionPipeline.from_pretrained(source, revision=revision, local_files_only=offline,
                                                 **{dtype_key: torch_dtype})
    except (OSError, ValueError) as exc:
        where = "folder" if local else ("hub cache (the hub is unreachable)" if offline else "hub")
        raise WeightsNotFoundError(f"diffusers pipeline {source!r} could not be loaded from the {where}: "
                                   f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}",
                                   "give a diffusers folder (model_index.json inside) or a hub id that is "
                                   "cached or reachable") from exc
    if scheduler == "ddim":
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    logger.info("loaded %s (%s) on %s in %s", source, type(pipe).__name__, target, torch_dtype)
    return pipe.to(target)
