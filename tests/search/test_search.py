"""Search: exact neighbour noises, exact best-of-N (arg-max, reproducible pixels), random/zero-order/paths
bookkeeping (pool sizes, NFEs, pivots), resume, NaN/ties, verifier fusion, and the scaling of best-of-N."""

from __future__ import annotations

import json
import math
from itertools import combinations

import numpy as np
import pytest
import torch
from PIL import Image

from rewardlab.errors import ConfigError, UsageError
from rewardlab.scoring.ensemble import RewardEnsemble
from rewardlab.scoring.scorer import ScoreResult
from rewardlab.search import (
    DiffusersGenerator,
    PromptItem,
    SearchConfig,
    cosine,
    load_candidates,
    neighbours,
    regenerate,
    run_search,
    seed_noise,
    seed_noises,
)

STEPS = 2


# -- fakes with known truth (fast): a generator that turns noise into pixels, a verifier on pixels ----------

class FakeGenerator:
    """Images are a fixed function of the noise; every image costs STEPS NFEs."""

    latent_shape = (3, 4, 4)
    num_inference_steps = STEPS

    def __init__(self):
        self.nfe = 0

    def describe(self) -> dict:
        return {"fake": True}

    def generate(self, prompt: str, noises: torch.Tensor) -> list[np.ndarray]:
        self.nfe += STEPS * len(noises)
        pixels = 255.0 / (1.0 + torch.exp(-noises.double()))
        return [p.permute(1, 2, 0).numpy().round().astype(np.uint8) for p in pixels]


class RedVerifier:
    """Score = mean red value / 255, rounded to ``digits`` (to make ties); NaN when the top-left red is
    below ``nan_below``."""

    name = "red"

    def __init__(self, label="red", digits=None, nan_below=-1, sign=1.0):
        self.label, self.digits, self.nan_below, self.sign, self.calls = label, digits, nan_below, sign, 0

    def truth(self, image) -> float:
        array = np.asarray(image)
        if array[0, 0, 0] < self.nan_below:
            return math.nan
        value = self.sign * float(array[..., 0].mean()) / 255.0
        return round(value, self.digits) if self.digits is not None else value

    def score_detailed(self, prompts, images, batch_size=None) -> ScoreResult:
        self.calls += 1
        return ScoreResult([self.truth(Image.open(i) if isinstance(i, str) else i) for i in images])


def _run(tmp_path, verifiers=None, prompts=("a red circle",), normalize="none", **config):
    verifiers = verifiers or [RedVerifier()]
    ensemble = RewardEnsemble(verifiers, normalize=normalize)
    generator = FakeGenerator()
    items = [PromptItem(p, f"p{i}") for i, p in enumerate(prompts)]
    summary = run_search(generator, ensemble, items, tmp_path / "run", SearchConfig(**config), gallery=False)
    return summary, generator, ensemble


def _rounds(tmp_path) -> list[dict]:
    return [json.loads(line) for line in (tmp_path / "run" / "rounds.jsonl").read_text().splitlines()]


# -- noise ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(4, 8, 8), (4, 64, 64), (16, 128, 128)])
@pytest.mark.parametrize("threshold", [0.95, 0.5])
def test_neighbours_have_the_pivot_norm_and_exact_cosine(shape, threshold):
    pivot = seed_noise(7, shape)
    found = neighbours(pivot, 4, threshold, seed=3)
    assert found.shape == (4, *shape)
    for n in found:
        assert abs(float(n.double().norm()) - float(pivot.double().norm())) <= 1e-6 * float(pivot.double().norm())
        assert abs(cosine(n, pivot) - threshold) <= 1e-6
    assert max(abs(cosine(a, b)) for a, b in combinations(found, 2)) < 0.99  # distinct directions
    assert torch.equal(found, neighbours(pivot, 4, threshold, seed=3))  # reproducible from the seed
    assert torch.equal(seed_noises([7], shape)[0], pivot)
    with pytest.raises(UsageError, match="threshold"):
        neighbours(pivot, 2, 1.0)


# -- runner logic on the fakes ------------------------------------------------------------------------------

def test_best_of_n_keeps_argmax_with_one_batched_call(tmp_path):
    summary, generator, ensemble = _run(tmp_path, num_candidates=6, batch_size=4)
    verifier = ensemble.scorers[0]
    assert verifier.calls == 1  # all 6 candidates scored in one call
    cands = load_candidates(tmp_path / "run" / "prompts" / "p0")
    truth = [verifier.truth(Image.open(tmp_path / "run" / "prompts" / "p0" / c.image)) for c in cands]
    assert [c.seed for c in cands] == list(range(6))
    assert [c.scores["red"] for c in cands] == pytest.approx(truth, abs=1e-12)
    result = summary.results[0]
    assert result.best == int(np.argmax(truth)) and result.best_score == pytest.approx(max(truth))
    assert result.nfe == 6 * STEPS and result.best_noise_seed == result.best
    row = _rounds(tmp_path)[0]
    assert {"prompt", "search_round", "num_noises", "best_noise_seed", "best_score", "verifier_scores",
            "best_image"} <= row.keys()
    assert row["num_noises"] == 6 and row["best_image"] == f"prompts/p0/c{result.best:05d}.png"


def test_random_search_doubles_the_pool_and_counts_nfe(tmp_path):
    summary, _, ensemble = _run(tmp_path, method="random", rounds=3)
    rows = _rounds(tmp_path)
    assert [r["num_noises"] for r in rows] == [2, 4, 8]
    assert [r["nfe"] for r in rows] == [2 * STEPS, 6 * STEPS, 14 * STEPS]
    assert ensemble.scorers[0].calls == 3
    best = [r["best_score"] for r in rows]
    assert best == sorted(best)  # the best so far never gets worse
    cands = load_candidates(tmp_path / "run" / "prompts" / "p0")
    assert sorted(c.seed for c in cands) == list(range(14))  # every noise is new
    assert summary.results[0].best_score == max(c.scores["red"] for c in cands)
    budget, _, _ = _run(tmp_path / "b", method="random", rounds=4, max_nfe=6 * STEPS)
    assert budget.results[0].nfe == 6 * STEPS and budget.results[0].num_candidates == 6


def test_zero_order_neighbours_and_pivot_moves_to_the_best(tmp_path):
    summary, _, _ = _run(tmp_path, method="zero-order", rounds=3, num_neighbors=3, threshold=0.9)
    folder = tmp_path / "run" / "prompts" / "p0"
    cands = load_candidates(folder)
    assert [c.search_round for c in cands] == [0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    from safetensors.torch import load

    def noise(c):
        return seed_noise(c.seed, FakeGenerator.latent_shape) if c.noise is None else \
            load((folder / c.noise).read_bytes())["noise"]

    for c in cands[1:]:
        parent = cands[c.parent]
        assert abs(cosine(noise(c), noise(parent)) - 0.9) <= 1e-6
        assert float(noise(c).double().norm()) == pytest.approx(float(noise(parent).double().norm()), rel=1e-6)
        earlier = [p for p in cands if p.search_round < c.search_round]
        assert parent.index == max(earlier, key=lambda p: (p.scores["red"], -p.index)).index  # best so far
    assert summary.results[0].best_score == max(c.scores["red"] for c in cands)


def test_nan_is_an_error_never_chosen_and_ties_go_to_the_first(tmp_path):
    verifier = RedVerifier(digits=1, nan_below=200)
    summary, _, _ = _run(tmp_path, verifiers=[verifier], num_candidates=12)
    cands = load_candidates(tmp_path / "run" / "prompts" / "p0")
    errors = [c for c in cands if c.error]
    assert errors and all(c.score is None and c.scores["red"] is None for c in errors)
    assert "non-finite" in errors[0].error
    good = [c for c in cands if not c.error]
    top = max(c.scores["red"] for c in good)
    tied = [c.index for c in good if c.scores["red"] == top]
    assert summary.results[0].best == tied[0] and summary.results[0].errors == len(errors)
    all_nan, _, _ = _run(tmp_path / "n", verifiers=[RedVerifier(nan_below=256)], num_candidates=3)
    assert all_nan.results[0].best is None and all_nan.results[0].best_score is None


def test_two_verifiers_by_mean_rank_and_borda(tmp_path):
    up, down = RedVerifier("up"), RedVerifier("down", digits=1, sign=-1.0)
    summary, _, _ = _run(tmp_path, verifiers=[up, down], normalize="rank", num_candidates=8)
    cands = load_candidates(tmp_path / "run" / "prompts" / "p0")

    def avg_ranks(values):
        return [sum(v > w for w in values) + (sum(v == w for w in values) - 1) / 2 for v in values]

    a, b = avg_ranks([c.scores["up"] for c in cands]), avg_ranks([c.scores["down"] for c in cands])
    by_hand = [(x + y) / 7 for x, y in zip(a, b, strict=True)]
    assert [c.score for c in cands] == pytest.approx(by_hand, abs=1e-12)
    assert summary.results[0].best == max(range(8), key=lambda i: (by_hand[i], -i))
    borda, _, _ = _run(tmp_path / "b", verifiers=[RedVerifier("up"), RedVerifier("down", digits=1, sign=-1.0)],
                       normalize="borda", num_candidates=8)
    assert borda.results[0].best_score == pytest.approx(max(x + y for x, y in zip(a, b, strict=True)))


def test_resume_skips_finished_prompts_and_redoes_unfinished(tmp_path):
    first, gen1, _ = _run(tmp_path, prompts=("a", "b"), num_candidates=3)
    before = (tmp_path / "run" / "results.jsonl").read_text()
    (tmp_path / "run" / "prompts" / "p1" / "result.json").unlink()  # p1 crashed before finishing
    (tmp_path / "run" / "prompts" / "p1" / "c00009.png").write_bytes(b"torn")
    again, gen2, _ = _run(tmp_path, prompts=("a", "b"), num_candidates=3)
    assert again.skipped == 1 and gen2.nfe == 3 * STEPS  # only p1 was generated again
    assert (tmp_path / "run" / "results.jsonl").read_text() == before
    assert not (tmp_path / "run" / "prompts" / "p1" / "c00009.png").exists()
    with pytest.raises(ConfigError, match="other settings"):
        _run(tmp_path, prompts=("a", "b"), num_candidates=4)


# -- the real tiny diffusers pipeline ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_pipe(tmp_path_factory):
    from rewardlab.testing.diffusion import tiny_pipeline

    return tiny_pipeline(tmp_path_factory.mktemp("pipe"), seed=0)


def test_best_of_n_on_a_pipeline_is_exact_and_reproducible(tmp_path, tiny_pipe, tiny_scorer):
    generator = DiffusersGenerator(tiny_pipe, num_inference_steps=STEPS, guidance_scale=3.0)
    ensemble = RewardEnsemble([tiny_scorer])
    summary = run_search(generator, ensemble, [PromptItem("a red circle", "p0")], tmp_path / "run",
                         SearchConfig(num_candidates=4, batch_size=1), gallery=False)
    folder = tmp_path / "run" / "prompts" / "p0"
    cands = load_candidates(folder)
    direct = tiny_scorer.score("a red circle", [str(folder / c.image) for c in cands])
    assert [c.scores[tiny_scorer.label] for c in cands] == pytest.approx(direct, abs=1e-5)
    best = summary.results[0]
    assert best.best == int(np.argmax(direct))
    assert best.nfe == 4 * STEPS * 2  # classifier-free guidance: two UNet inputs per step
    again = regenerate(generator, tmp_path / "run", "p0", best.best)
    assert np.array_equal(again, np.asarray(Image.open(folder / cands[best.best].image)))
    by_hand = generator.generate("a red circle", seed_noise(best.best_noise_seed, generator.latent_shape)[None])[0]
    assert np.array_equal(by_hand, again)
    batched = generator.generate("a red circle", seed_noises([c.seed for c in cands], generator.latent_shape))
    assert max(int(np.abs(b.astype(int) - np.asarray(Image.open(folder / c.image), dtype=int)).max())
               for b, c in zip(batched, cands, strict=True)) <= 1  # batched kernels: at most 1/255 apart
    generator.close()


def test_search_over_paths_with_ddim(tmp_path, tiny_pipe, tiny_scorer):
    generator = DiffusersGenerator(tiny_pipe, num_inference_steps=4, guidance_scale=1.0)
    ensemble = RewardEnsemble([tiny_scorer])
    summary = run_search(generator, ensemble, [PromptItem("a blue square", "p0")], tmp_path / "run",
                         SearchConfig(method="paths", num_candidates=2, rounds=1, branches=2, renoise_steps=1),
                         gallery=False)
    cands = load_candidates(tmp_path / "run" / "prompts" / "p0")
    # round 0: 2 paths x steps 0..2 (4 NFEs); round 1: 4 branches re-noised to step 1, run to 4 (12 NFEs)
    assert [r["nfe"] for r in _rounds(tmp_path)] == [4, 16]
    assert [c.final for c in cands] == [False, False, True, True, True, True]
    assert {c.parent for c in cands[2:]} <= {0, 1} and summary.results[0].best in (2, 3, 4, 5)
    assert summary.results[0].best_score == max(c.score for c in cands[2:])
    from diffusers import PNDMScheduler

    pndm = DiffusersGenerator(tiny_pipe, num_inference_steps=2)
    original = tiny_pipe.scheduler
    tiny_pipe.scheduler = PNDMScheduler.from_config(original.config)  # multistep: no closed-form re-noising
    try:
        with pytest.raises(UsageError, match="needs a DDIM or Euler scheduler, not PNDMScheduler"):
            pndm.check_paths()
    finally:
        tiny_pipe.scheduler = original
    generator.close()
    pndm.close()


def expected_best_of_n(scores: list[float], n: int) -> float:
    """E[max of n candidates drawn without replacement from ``scores``]: the k-th smallest of M is the
    maximum of C(k-1, n-1) of the C(M, n) subsets."""
    ordered = sorted(scores)
    return sum(s * math.comb(k, n - 1) for k, s in enumerate(ordered)) / math.comb(len(ordered), n)


class CachingGenerator(DiffusersGenerator):
    """Generates each noise once; repeated noises (shared seeds of several runs) come from the cache."""

    cache: dict = {}

    def generate(self, prompt, noises):
        keys = [(prompt, noise.numpy().tobytes()) for noise in noises]
        missing = [i for i, key in enumerate(keys) if key not in self.cache]
        if missing:
            for i, image in zip(missing, super().generate(prompt, noises[missing]), strict=True):
                self.cache[keys[i]] = image
        self.nfe += (len(keys) - len(missing)) * self.num_inference_steps  # a cached image costs the same
        return [self.cache[key] for key in keys]


class CachingScorer:
    """The real scorer, asked once per distinct (prompt, image): later runs of the same seeds reuse it."""

    def __init__(self, scorer):
        self.scorer, self.label, self.name, self.cache = scorer, scorer.label, scorer.name, {}

    def score_detailed(self, prompts, images, batch_size=None) -> ScoreResult:
        keys = [(prompts, np.asarray(i).tobytes()) for i in images]
        missing = [i for i, key in enumerate(keys) if key not in self.cache]
        if missing:
            fresh = self.scorer.score_detailed(prompts, [images[i] for i in missing])
            assert not fresh.errors
            self.cache.update({keys[i]: v for i, v in zip(missing, fresh.scores, strict=True)})
        return ScoreResult([self.cache[key] for key in keys])


@pytest.fixture(scope="module")
def trained_scorer(tmp_path_factory):
    """A tiny BLIP reward trained here on the shapes preference task (prompt colour/shape vs the image)."""
    import rewardlab
    from rewardlab.registry import spec_to_json
    from rewardlab.testing import tiny_blip_spec
    from rewardlab.testing.shapes import make_pairs
    from rewardlab.train.trainer import TrainConfig, Trainer

    out = tmp_path_factory.mktemp("verifier")
    config = TrainConfig(spec_json=spec_to_json(tiny_blip_spec("gelu")), output_dir=str(out), freeze_ratio=0.0,
                         lr=1e-3, batch_size=32, max_steps=120, warmup_steps=10, eval_every=120, save_every=0, seed=0,
                         cpu=True)
    summary = Trainer(config, [make_pairs(800, seed=1)], make_pairs(200, seed=2)).train()
    assert summary["valid_accuracy"] >= 0.7, summary  # it learned something: a trained verifier, not a random one
    return rewardlab.load(out / "final.safetensors")


@pytest.mark.parametrize("verifier", ["fixed", "trained"])
def test_best_of_n_rises_with_n_and_matches_the_expectation(tmp_path, tiny_pipe, verifier, request):
    """Verifier: a fixed random tiny reward, or one trained in this test on the shapes task; the held-out
    prompts below are not among its training prompts (no star, orange or purple there). For each N, the
    mean over prompts and over the 16/N disjoint seed blocks of the best-of-N run's reward rises with N and
    stays within 0.25 pool standard deviations of the exact expectation from the 16 candidates' scores."""
    tiny_scorer = request.getfixturevalue("tiny_scorer" if verifier == "fixed" else "trained_scorer")
    texts = ["a red circle", "a green square", "a blue star"] if verifier == "fixed" else \
        ["a purple star", "an orange hexagon", "a blue star"]
    prompts = [PromptItem(p, f"p{i}") for i, p in enumerate(texts)]
    generator = CachingGenerator(tiny_pipe, num_inference_steps=STEPS, guidance_scale=1.0)
    ensemble = RewardEnsemble([CachingScorer(tiny_scorer)])
    pool = run_search(generator, ensemble, prompts, tmp_path / "pool", SearchConfig(num_candidates=16, batch_size=16),
                      gallery=False)
    scores = {r.prompt_id: [c.scores[tiny_scorer.label] for c in load_candidates(tmp_path / "pool" / "prompts" /
                                                                                 r.prompt_id)] for r in pool.results}
    spread = float(np.mean([np.std(s) for s in scores.values()]))
    assert spread > 0
    measured, expected = [], []
    for n in (1, 2, 4, 8, 16):
        values = []
        for block in range(16 // n):
            run = run_search(generator, ensemble, prompts, tmp_path / f"n{n}_{block}",
                             SearchConfig(num_candidates=n, seed=block * n), gallery=False)
            values += [r.best_score for r in run.results]
        measured.append(float(np.mean(values)))
        expected.append(float(np.mean([expected_best_of_n(s, n) for s in scores.values()])))
    assert all(b > a for a, b in zip(measured, measured[1:], strict=False)), measured
    assert all(b > a for a, b in zip(expected, expected[1:], strict=False)), expected
    assert measured[0] == pytest.approx(expected[0], abs=1e-6) and measured[-1] == pytest.approx(expected[-1], abs=1e-6)
    assert max(abs(m - e) for m, e in zip(measured, expected, strict=True)) <= 0.25 * spread, (measured, expected)
    assert measured[-1] - measured[0] >= 1.0 * spread  # best-of-16 gains at least one pool std over N = 1
    generator.close()
