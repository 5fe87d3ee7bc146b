"""Reward functions with the signature online-RL trainers call: ``fn(images, prompts, metadata)``.

How a batch is scored depends on what the trainer hands over:

- **float tensors** ``(B, 3, H, W)`` in [0, 1] on any device (a VAE decode): each model's
  :meth:`Scorer.score_tensors` — tensor-space resize on the model's device, no CPU round trip and no
  8-bit quantisation. Scores differ slightly (|Δ| ~1e-2 for ImageReward-size models) from scoring the
  same pictures saved as 8-bit files, because the resize runs on floats instead of PIL's 8-bit path.
- **uint8 arrays** ``(B, H, W, 3)`` (numpy or torch), or a list of paths / PIL images / encoded bytes:
  each model's :meth:`Scorer.score_detailed` — the exact path of :meth:`Scorer.score`, so the numbers
  equal ``rewardlab score`` on the same pixels. An unreadable item raises :class:`ImageLoadError` naming
  every failed item (a NaN reward would poison the advantages).

Several models are combined by :mod:`rewardlab.scoring.ensemble` (weights, ``zscore`` with calibration
statistics from ``rewardlab calibrate``, ``rank``) — the same code as everywhere else in rewardlab.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from ..errors import UsageError
from ..scoring.ensemble import RewardEnsemble, parse_reward

logger = logging.getLogger(__name__)

AVG_KEY = "avg"
ModelArg = Any  # str (name, NAME:WEIGHT or checkpoint path), Scorer, or a sequence of them


def _load_scorers(models: ModelArg, weights, load_kwargs: dict) -> tuple[list, list[float]]:
    from ..scoring.loader import load

    if isinstance(models, Mapping):  # Flow-GRPO style {name: weight}
        if weights is not None:
            raise UsageError("weights given twice: as the models mapping and as weights=")
        models, weights = list(models), [float(w) for w in models.values()]
    if isinstance(models, (str, os.PathLike)) or not isinstance(models, Sequence):
        models = [models]
    scorers, parsed_weights = [], []
    for item in models:
        if isinstance(item, (str, os.PathLike)):
            term = parse_reward(str(item))
            scorers.append(load(term.model, **load_kwargs))
            parsed_weights.append(term.weight)
        else:
            scorers.append(item)
            parsed_weights.append(1.0)
    if weights is None:
        return scorers, parsed_weights
    if isinstance(weights, Mapping):
        labels = [getattr(s, "label", s.name) for s in scorers]
        unknown = set(weights) - set(labels) - {s.name for s in scorers}
        if unknown:
            raise UsageError(f"weights for unknown models {sorted(unknown)}", f"models are {labels}")
        return scorers, [float(weights.get(label, weights.get(s.name, 1.0))) for label, s in zip(labels, scorers, strict=True)]
    weights = [float(w) for w in weights]
    if len(weights) != len(scorers):
        raise UsageError(f"{len(weights)} weights for {len(scorers)} models", "give one weight per model")
    return scorers, weights


def split_images(images) -> tuple[str, Any]:
    """Classify a batch: ``("tensor", Tensor(B, 3, H, W) float)`` or ``("items", list for score_detailed)``."""
    if isinstance(images, np.ndarray) and np.issubdtype(images.dtype, np.floating):
        images = torch.from_numpy(images)
        if images.ndim == 4 and images.shape[-1] == 3 and images.shape[1] != 3:
            images = images.permute(0, 3, 1, 2)
    if isinstance(images, torch.Tensor):
        if images.is_floating_point():
            if images.ndim != 4 or images.shape[1] != 3:
                raise UsageError(f"float images must have shape (B, 3, H, W), got {tuple(images.shape)}")
            return "tensor", images
        if images.dtype != torch.uint8:
            raise UsageError(f"image tensors must be float in [0, 1] or uint8, got {images.dtype}")
        images = images.detach().cpu().numpy()
    if isinstance(images, np.ndarray):
        if images.dtype != np.uint8:
            raise UsageError(f"image arrays must be uint8 (B, H, W, 3) or float (B, 3, H, W), got {images.dtype}")
        if images.ndim == 4 and images.shape[1] == 3 and images.shape[-1] != 3:
            images = images.transpose(0, 2, 3, 1)  # (B, 3, H, W) uint8 -> (B, H, W, 3)
        if images.ndim != 4 or images.shape[-1] != 3:
            raise UsageError(f"uint8 images must have shape (B, H, W, 3), got {images.shape}")
        return "items", [np.ascontiguousarray(image) for image in images]
    if isinstance(images, (list, tuple)):
        return "items", list(images)
    raise UsageError(f"unsupported images of type {type(images).__name__}",
                     "pass a float tensor (B, 3, H, W) in [0, 1], a uint8 array (B, H, W, 3) or a list of images")


def _prompt_list(prompts, count: int) -> list[str] | str:
    if isinstance(prompts, str):
        return prompts
    prompts = list(prompts)
    if len(prompts) != count:
        raise UsageError(f"{len(prompts)} prompts for {count} images", "pass one prompt per image")
    return prompts


class MultiReward:
    """Several reward models as one RL reward.

    ``MultiReward({"imagereward-v1.0": 1.0, "pickscore-v1": 0.5}, normalize="zscore",
    calibration="calib.json")``; calling it with ``(images, prompts, metadata)`` returns
    ``({model: [...], ..., "avg": [...]}, {})`` — the schema of Flow-GRPO's ``multi_score`` (``avg`` is
    the weighted combination, not a mean). ``weights`` may also be a list of ``NAME[:WEIGHT]`` strings,
    loaded scorers, or a :class:`RewardEnsemble`; loading keyword arguments (device, dtype) go to
    :func:`rewardlab.load`.
    """

    def __init__(self, weights: Mapping[str, float] | Sequence | RewardEnsemble, normalize: str = "none",
                 calibration: str | os.PathLike | Mapping | None = None, batch_size: int | None = None,
                 **load_kwargs):
        if isinstance(weights, RewardEnsemble):
            self.ensemble = weights
        else:
            scorers, values = _load_scorers(weights, None, load_kwargs)
            self.ensemble = RewardEnsemble(scorers, values, normalize or "none", calibration)
        if AVG_KEY in self.ensemble.labels:
            raise UsageError(f"a model may not be labelled {AVG_KEY!r}", "rename the checkpoint file")
        self.batch_size = batch_size

    @property
    def labels(self) -> list[str]:
        return list(self.ensemble.labels)

    def scores(self, images, prompts) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """(combined float64 [B], {model: float64 [B]}) without gradients (see the module docstring)."""
        kind, batch = split_images(images)
        if kind == "tensor":
            prompts = _prompt_list(prompts, batch.shape[0])
            with torch.inference_mode():
                per_model = {label: scorer.score_tensors(batch, prompts).double().cpu()
                             for label, scorer in zip(self.ensemble.labels, self.ensemble.scorers, strict=True)}
                total = self.ensemble.combine(per_model)
            return total.double().cpu().numpy(), {k: v.numpy() for k, v in per_model.items()}
        total, per_model = self.ensemble.score(_prompt_list(prompts, len(batch)), batch, batch_size=self.batch_size)
        return np.asarray(total, dtype=np.float64), {k: np.asarray(v, dtype=np.float64) for k, v in per_model.items()}

    def differentiable(self, pixels01: torch.Tensor, prompts) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Differentiable (total[B], {model: scores[B]}) of float pixels in [0, 1] (normalize none/zscore)."""
        kind, batch = split_images(pixels01)
        if kind != "tensor":
            raise UsageError("the differentiable reward needs float tensors (B, 3, H, W) in [0, 1]")
        return self.ensemble.score_tensors(batch, _prompt_list(prompts, batch.shape[0]))

    def __call__(self, images, prompts, metadata=None) -> tuple[dict[str, list[float]], dict]:
        total, per_model = self.scores(images, prompts)
        details = {label: values.tolist() for label, values in per_model.items()}
        details[AVG_KEY] = total.tolist()
        return details, {}


def reward_fn(models: ModelArg, weights: Sequence[float] | Mapping[str, float] | None = None,
              normalize: str | None = None, calibration: str | os.PathLike | Mapping | None = None,
              differentiable: bool = False, batch_size: int | None = None, **load_kwargs
              ) -> Callable[..., tuple[Any, dict[str, Any]]]:
    """A reward callable ``fn(images, prompts, metadata=None) -> (scores, info)``.

    ``models``: a name, ``NAME:WEIGHT``, checkpoint path or loaded :class:`Scorer`, or a list of them (or a
    ``{name: weight}`` mapping). ``scores``: float64 numpy array [B] (the weighted combination when there
    are several models); ``info``: ``{model: float64 array [B]}``. With ``differentiable=True`` the scores
    are a torch tensor with gradients to the float input pixels (reward backpropagation: ReFL, DRaFT,
    AlignProp) and ``info`` holds tensors.
    """
    if isinstance(models, MultiReward):
        reward = models
    else:
        scorers, values = _load_scorers(models, weights, load_kwargs)
        reward = MultiReward(RewardEnsemble(scorers, values, normalize or "none", calibration), batch_size=batch_size)

    if differentiable:
        def fn(images, prompts, metadata=None):
            return reward.differentiable(images, prompts)
    else:
        def fn(images, prompts, metadata=None):
            return reward.scores(images, prompts)
    fn.reward = reward  # the MultiReward behind it (labels, ensemble)
    return fn
