"""Evaluation against human judgements: metrics, score cache, runner, report, CLI."""

from .metrics import PairwiseAccuracy, RecallFilterAtK, rank_generators, tie_calibrated_accuracy
from .runner import EvalResult, evaluate, score_groups

__all__ = ["PairwiseAccuracy", "RecallFilterAtK", "rank_generators", "tie_calibrated_accuracy", "EvalResult", "evaluate",
           "score_groups"]
