"""rewardlab: fast, faithful image-text reward models.

    >>> import rewardlab
    >>> scorer = rewardlab.load("imagereward-v1.0")
    >>> scorer.score("a red bicycle", ["a.png", "b.png"])
"""

from .errors import (
    CheckpointError,
    ConfigError,
    DataError,
    ImageLoadError,
    NonFiniteError,
    RewardLabError,
    UnknownModelError,
    UsageError,
    WeightsNotFoundError,
)
from .registry import ModelSpec, get_spec, list_models
from .scoring.loader import convert, load, save_checkpoint
from .scoring.scorer import Ranking, Scorer, ScoreResult

__version__ = "0.1.0"
__all__ = [
    "load", "convert", "save_checkpoint", "list_models", "get_spec", "ModelSpec", "Scorer", "ScoreResult", "Ranking",
    "RewardLabError", "UsageError", "ConfigError", "UnknownModelError", "DataError", "ImageLoadError",
    "CheckpointError", "WeightsNotFoundError", "NonFiniteError", "__version__",
]
