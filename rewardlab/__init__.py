"""rewardlab: fast, faithful image-text reward models.

    >>> import rewardlab
    >>> scorer = rewardlab.load("imagereward-v1.0")
    >>> scorer.score("a red bicycle", ["a.png", "b.png"])
"""

from .api import load, save_checkpoint
from .checkpoint import CheckpointError
from .hub import WeightsNotFoundError
from .images import ImageLoadError
from .registry import ModelSpec, get_spec, list_models
from .scorer import Ranking, Scorer, ScoreResult

__version__ = "0.1.0"
__all__ = [
    "load", "save_checkpoint", "list_models", "get_spec", "ModelSpec", "Scorer", "ScoreResult", "Ranking",
    "ImageLoadError", "CheckpointError", "WeightsNotFoundError", "__version__",
]
