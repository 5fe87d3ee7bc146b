"""Datasets of human or automatic judgements: groups of ranked candidates and preference pairs."""

from ..errors import DataError
from .groups import Group, count_pairs, load_imagereward, load_rankings, ranked_pairs
from .pairs import Pair, read_pair_file
from .sources import DataSource, load_groups, load_pairs, pairs_from_groups, parse_source

__all__ = ["DataError", "Group", "Pair", "DataSource", "count_pairs", "load_imagereward", "load_rankings", "load_groups",
           "load_pairs", "read_pair_file", "pairs_from_groups", "parse_source", "ranked_pairs"]
