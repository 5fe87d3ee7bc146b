"""Training reward models from preference pairs (Bradley–Terry, the architectures' freeze recipes, accelerate)."""

from ..data.sources import pairs_from_groups
from .data import Pair, load_pair_file, load_training_pairs, split_by_group
from .loss import bradley_terry_loss

__all__ = ["Pair", "load_pair_file", "load_training_pairs", "pairs_from_groups", "split_by_group",
           "bradley_terry_loss", "TrainConfig", "Trainer"]


def __getattr__(name: str):
    if name in ("TrainConfig", "Trainer"):
        from . import trainer

        return getattr(trainer, name)
    raise AttributeError(name)
