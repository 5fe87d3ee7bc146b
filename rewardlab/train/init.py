"""Initial weights for training: random, a pretrained backbone file, or a registry reward model."""

from __future__ import annotations

import logging
from pathlib import Path

from ..io.checkpoint import load_strict
from ..models.base import RewardModel

logger = logging.getLogger(__name__)


def load_initial_weights(model: RewardModel, init: str | None) -> str:
    """Fill ``model`` from ``init``: None/"random" (keep), a checkpoint file (the architecture's own
    :meth:`~RewardModel.init_from_pretrained`: a BLIP ``model_large.pth``, an OpenAI/open_clip/transformers
    CLIP file, or a checkpoint in the model's layout), or a registry model name (loaded strictly).

    Returns a description of what was loaded."""
    if init in (None, "", "random"):
        return "random initialisation"
    if Path(init).is_file():
        source = model.init_from_pretrained(init)
    else:
        from .. import load

        load_strict(model, load(init, device="cpu").model.state_dict(), f"registry model {init}")
        source = f"reward model {init}"
    logger.info("initial weights: %s", source)
    return source
