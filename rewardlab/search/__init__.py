"""Inference-time search with reward verifiers (best-of-N, random, zero-order, paths) and reward-labelled
preference pairs. See ``rewardlab.search.runner`` for the methods and the files a run writes."""

from ..diffusion.loading import load_pipeline
from .generator import DiffusersGenerator
from .noise import cosine, neighbours, seed_noise, seed_noises
from .runner import (
    METHODS,
    Candidate,
    PromptItem,
    PromptResult,
    SearchConfig,
    SearchSummary,
    load_candidates,
    prompt_id,
    read_prompts,
    regenerate,
    run_search,
)

__all__ = ["DiffusersGenerator", "load_pipeline", "cosine", "neighbours", "seed_noise", "seed_noises", "METHODS",
           "Candidate", "PromptItem", "PromptResult", "SearchConfig", "SearchSummary", "load_candidates",
           "prompt_id", "read_prompts", "regenerate", "run_search"]
