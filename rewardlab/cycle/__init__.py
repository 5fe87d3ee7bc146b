"""Cycle-consistency preference data: I2T2I and T2I2T runs, pair rules, CyclePrefDB export."""

from .models import Captioner, DiffusersGenerator, Generator, TransformersCaptioner
from .pairs import Candidate, PairRules, PairStats, assign_splits, build_pairs, split_of
from .pipeline import CycleInput, CycleInputError, Manifest, export_pairs, read_inputs, run_i2t2i, run_t2i2t
from .similarity import SbertSimilarity, SsimDistance, image_distance

__all__ = ["Captioner", "DiffusersGenerator", "Generator", "TransformersCaptioner", "Candidate", "PairRules",
           "PairStats", "assign_splits", "build_pairs", "split_of", "CycleInput", "CycleInputError", "Manifest",
           "export_pairs", "read_inputs", "run_i2t2i", "run_t2i2t", "SbertSimilarity", "SsimDistance", "image_distance"]
