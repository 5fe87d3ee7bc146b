"""Agreement of reward scores with human judgements, as accumulators (``update``/``compute``/``merge``).

Conventions: human ``ranking`` is lower-is-better with ties as equal values; model ``scores`` are
higher-is-better. Evaluation, training validation and distributed runs share these classes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np


@dataclass
class _GroupRecord:
    correct: int  # human-ordered pairs the model orders the same way (strictly)
    total: int  # human-ordered (non-tied) pairs
    size: int  # candidates in the group
    deltas: np.ndarray  # score(i) - score(j) for every pair i<j
    human: np.ndarray  # sign of the human preference for i over j: +1, -1, or 0 (tie)


@dataclass
class PairwiseAccuracy:
    """Pairwise preference accuracy.

    - ``accuracy``: ImageReward's test procedure — all pairs of a group with different human ranks,
      pooled over groups; correct when the scores order the pair the same way; equal scores are wrong.
    - ``macro_accuracy``: the same per group, averaged over groups that have an ordered pair.
    - ``tie_aware_accuracy``: accuracy over all pairs including human ties, where the model calls a tie
      when |Δscore| ≤ ε, with ε chosen to maximise it (tie calibration, Deutsch et al. 2023).
    - ``ci95``: percentile bootstrap over groups (prompts) of ``accuracy``.
    """

    bootstrap: int = 1000
    seed: int = 0
    records: list[_GroupRecord] = field(default_factory=list)

    def update(self, scores: Sequence[float], ranking: Sequence[float]) -> None:
        scores = np.asarray(scores, dtype=np.float64)
        ranking = np.asarray(ranking, dtype=np.float64)
        if scores.shape != ranking.shape:
            raise ValueError(f"{scores.size} scores for {ranking.size} ranked candidates")
        i, j = np.triu_indices(len(scores), k=1)
        deltas = scores[i] - scores[j]
        human = np.sign(ranking[j] - ranking[i])  # +1 when i is ranked better (lower)
        ordered = human != 0
        correct = int(np.sum(np.sign(deltas[ordered]) == human[ordered]))
        self.records.append(_GroupRecord(correct, int(ordered.sum()), len(scores), deltas, human))

    def merge(self, other: PairwiseAccuracy) -> None:
        self.records.extend(other.records)

    def reset(self) -> None:
        self.records.clear()

    def _bootstrap_ci(self, correct: np.ndarray, total: np.ndarray) -> tuple[float, float]:
        if len(correct) < 2 or total.sum() == 0:
            return (float("nan"), float("nan"))
        rng = np.random.default_rng(self.seed)
        picks = rng.integers(0, len(correct), size=(self.bootstrap, len(correct)))
        sums = total[picks].sum(axis=1)
        values = correct[picks].sum(axis=1) / np.where(sums == 0, 1, sums)
        low, high = np.percentile(values, [2.5, 97.5])
        return float(low), float(high)

    def compute(self) -> dict:
        correct = np.array([r.correct for r in self.records], dtype=np.float64)
        total = np.array([r.total for r in self.records], dtype=np.float64)
        with_pairs = total > 0
        tie_acc, epsilon = tie_calibrated_accuracy(
            np.concatenate([r.deltas for r in self.records]) if self.records else np.zeros(0),
            np.concatenate([r.human for r in self.records]) if self.records else np.zeros(0),
        )
        n_pairs = int(total.sum())
        return {
            "accuracy": float(correct.sum() / n_pairs) if n_pairs else float("nan"),
            "ci95": self._bootstrap_ci(correct[with_pairs], total[with_pairs]),
            "macro_accuracy": float(np.mean(correct[with_pairs] / total[with_pairs])) if with_pairs.any() else float("nan"),
            "tie_aware_accuracy": tie_acc,
            "tie_epsilon": epsilon,
            "pairs": n_pairs,
            "tied_pairs": int(sum(int(np.sum(r.human == 0)) for r in self.records)),
            "groups": len(self.records),
        }

    def by_group_size(self) -> dict[int, dict]:
        """Pooled accuracy and pair count per number of candidates in a group."""
        out: dict[int, dict] = {}
        for size in sorted({r.size for r in self.records}):
            rows = [r for r in self.records if r.size == size]
            pairs = sum(r.total for r in rows)
            out[size] = {"groups": len(rows), "pairs": pairs,
                         "accuracy": sum(r.correct for r in rows) / pairs if pairs else float("nan")}
        return out


def tie_calibrated_accuracy(deltas: np.ndarray, human: np.ndarray) -> tuple[float, float]:
    """Best accuracy over all pairs (human ties included) when |Δ| ≤ ε counts as a predicted tie.

    Returns (accuracy, ε). With ε below every |Δ| nothing is a predicted tie.
    """
    if len(deltas) == 0:
        return float("nan"), 0.0
    magnitude = np.abs(deltas)
    order = np.argsort(magnitude, kind="stable")
    magnitude, deltas, human = magnitude[order], deltas[order], human[order]
    right_order = (np.sign(deltas) == human) & (human != 0)
    is_tie = human == 0
    # predicted ties = the first k pairs; k only at boundaries between different |Δ| values
    tie_hits = np.concatenate([[0], np.cumsum(is_tie)])
    order_hits_after = np.concatenate([np.cumsum(right_order[::-1])[::-1], [0]])
    boundaries = np.concatenate([[0], np.nonzero(np.diff(magnitude))[0] + 1, [len(magnitude)]])
    scores = tie_hits[boundaries] + order_hits_after[boundaries]
    best = int(np.argmax(scores))
    k = boundaries[best]
    epsilon = float(magnitude[k - 1]) if k > 0 else 0.0
    return float(scores[best] / len(deltas)), epsilon


@dataclass
class RecallFilterAtK:
    """ImageReward paper's selection metrics, over groups with more than K candidates:

    - Recall@K: fraction of groups where a human-best candidate is among the model's top K.
    - Filter@K: fraction of groups where a human-worst candidate is among the model's bottom K
      (so dropping the model's K lowest removes it).
    Groups whose candidates are all tied are skipped. Model ties are broken by input order.
    """

    ks: tuple[int, ...] = (1, 2, 4)
    hits: dict = field(default_factory=dict)

    def update(self, scores: Sequence[float], ranking: Sequence[float]) -> None:
        scores = np.asarray(scores, dtype=np.float64)
        ranking = np.asarray(ranking, dtype=np.float64)
        if ranking.min() == ranking.max():
            return
        order = np.argsort(-scores, kind="stable")  # model's best first
        best = set(np.nonzero(ranking == ranking.min())[0].tolist())
        worst = set(np.nonzero(ranking == ranking.max())[0].tolist())
        for k in self.ks:
            if len(scores) <= k:
                continue
            recall, filtered, groups = self.hits.get(k, (0, 0, 0))
            recall += bool(best & set(order[:k].tolist()))
            filtered += bool(worst & set(order[-k:].tolist()))
            self.hits[k] = (recall, filtered, groups + 1)

    def merge(self, other: RecallFilterAtK) -> None:
        for k, (r, f, g) in other.hits.items():
            mine = self.hits.get(k, (0, 0, 0))
            self.hits[k] = (mine[0] + r, mine[1] + f, mine[2] + g)

    def reset(self) -> None:
        self.hits.clear()

    def compute(self) -> dict:
        out = {}
        for k in self.ks:
            recall, filtered, groups = self.hits.get(k, (0, 0, 0))
            out[f"recall@{k}"] = recall / groups if groups else float("nan")
            out[f"filter@{k}"] = filtered / groups if groups else float("nan")
        return out


def rank_generators(mean_rewards: dict[str, float], human_ranking: dict[str, float] | None = None) -> dict:
    """Generators ordered by mean reward (best first), and Spearman/Kendall against a human ranking
    (lower is better), as in the ImageReward paper's Table 1."""
    ordered = sorted(mean_rewards, key=lambda g: -mean_rewards[g])
    out: dict = {"order": ordered, "mean_reward": dict(mean_rewards)}
    if human_ranking:
        from scipy.stats import kendalltau, spearmanr

        common = [g for g in ordered if g in human_ranking]
        if len(common) < 2:
            raise ValueError("need at least two generators present in both the rewards and the human ranking")
        rewards = [mean_rewards[g] for g in common]
        human = [-human_ranking[g] for g in common]  # higher = better, like rewards
        out["spearman"] = float(spearmanr(rewards, human).statistic)
        out["kendall"] = float(kendalltau(rewards, human).statistic)
        out["generators"] = common
    return out

