"""Datasets of human or automatic judgements, in one internal format (groups of ranked candidates)."""

from .groups import DataError, Group, count_pairs, load_imagereward, load_pairs, load_rankings, ranked_pairs

__all__ = ["DataError", "Group", "count_pairs", "load_imagereward", "load_pairs", "load_rankings", "ranked_pairs"]
