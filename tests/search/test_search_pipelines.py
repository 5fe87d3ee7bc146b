"""Search on real SDXL, SD3 and FLUX diffusers pipelines (tiny random weights, 16x16 px, offline): the noise
given is the noise the denoiser starts from (FLUX's 2x2 packing checked element by element), best-of-N is
exact and reproducible, NFEs are counted per sample (CFG 2, guidance-distilled 1), zero-order neighbours
keep their exact geometry in the unpacked latent shape, the CLI runs on a saved FLUX folder and resumes,
and search over paths runs on FLUX, SD3 and SDXL with DDIM (the pipeline's own loop, flow-matching
re-noising by hand) and is refused with one clear line where re-noising is not closed form."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from rewardlab.errors import UsageError
from rewardlab.scoring.ensemble import RewardEnsemble
from rewardlab.search import (
    DiffusersGenerator,
    PromptItem,
    SearchConfig,
    cosine,
    load_candidates,
    regenerate,
    run_search,
    seed_noise,
    seed_noises,
)
from rewardlab.search.generator import PathState

STEPS = 2
KINDS = ("sdxl", "sd3", "flux")
# denoiser inputs per image per step at the pipeline's default guidance: SDXL (5.0) and SD3 (7.0) run
# classifier-free guidance (conditional + unconditional); FLUX is guidance-distilled (guidance is an input)
PER_STEP = {"sdxl": 2, "sd3": 2, "flux": 1}


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    from rewardlab.testing import diffusion

    built: dict = {}

    def get(kind: str):
        if kind not in built:
            builder = getattr(diffusion, f"tiny_{kind}_pipeline")
            built[kind] = builder(tmp_path_factory.mktemp(kind), seed=0)
        return built[kind]

    return get


@pytest.fixture(scope="module")
def colour():
    from rewardlab.testing.rewards import colour_scorer

    return colour_scorer(size=16)


def _generator(pipe, **options) -> DiffusersGenerator:
    return DiffusersGenerator(pipe, num_inference_steps=STEPS, height=16, width=16, **options)


def _first_denoiser_input(generator: DiffusersGenerator, prompt: str, noises: torch.Tensor) -> torch.Tensor:
    seen: list[torch.Tensor] = []

    def hook(module, args, kwargs):
        if not seen:
            seen.append((args[0] if args else kwargs["hidden_states"]).detach().clone())

    handle = generator.denoiser.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        generator.generate(prompt, noises)
    finally:
        handle.remove()
    return seen[0]


def _png(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def test_default_size_and_latent_shape_come_from_the_pipeline(pipes):
    # SDXL: unet sample_size 8 x VAE factor 2; SD3: transformer sample_size 8 x 2; FLUX: the pipeline's own
    # default_sample_size 128 x 2 (FLUX.1's config gives 128 x 8 = 1024)
    expected = {"sdxl": 16, "sd3": 16, "flux": 256}
    for kind in KINDS:
        generator = DiffusersGenerator(pipes(kind), num_inference_steps=STEPS)
        assert (generator.height, generator.width) == (expected[kind], expected[kind])
        assert generator.latent_shape == (4, expected[kind] // 2, expected[kind] // 2)
        generator.close()
    flux = DiffusersGenerator(pipes("flux"), num_inference_steps=STEPS, height=32, width=48)
    assert flux.latent_shape == (4, 16, 24)  # unpacked: 16 packed channels / (2x2) = 4
    flux.close()


@pytest.mark.parametrize("kind", KINDS)
def test_the_denoiser_starts_from_the_given_noise(pipes, kind):
    generator = _generator(pipes(kind))
    noises = seed_noises([3, 4], generator.latent_shape)
    first = _first_denoiser_input(generator, "a red circle", noises)
    if kind == "flux":
        # FLUX packs each 2x2 latent patch into one token: token i*W/2+j, feature c*4+di*2+dj
        b, c, h, w = noises.shape
        assert first.shape == (b, (h // 2) * (w // 2), c * 4)
        for n in range(b):
            for i in range(h // 2):
                for j in range(w // 2):
                    for ch in range(c):
                        for di in range(2):
                            for dj in range(2):
                                assert first[n, i * (w // 2) + j, ch * 4 + di * 2 + dj] == noises[n, ch, 2 * i + di,
                                                                                                   2 * j + dj]
        return
    halves = first.chunk(2)  # classifier-free guidance: unconditional and conditional copies
    assert len(first) == 2 * len(noises)
    if kind == "sd3":  # rectified flow starts at sigma 1: x_1 is the noise itself
        for half in halves:
            assert torch.equal(half, noises)
        return
    # SDXL + Euler ("leading" spacing, steps_offset 1): 2 steps -> timesteps 501, 1. The pipeline starts
    # from noise * init_noise_sigma = noise * sqrt(sigma_501^2 + 1) and the UNet sees it divided by the same
    betas = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=np.float64) ** 2
    alpha = np.cumprod(1.0 - betas)[501]
    sigma = math.sqrt((1.0 - alpha) / alpha)
    scheduler = pipes(kind).scheduler
    assert [int(t) for t in scheduler.timesteps] == [501, 1]
    assert float(scheduler.init_noise_sigma) == pytest.approx(math.sqrt(sigma ** 2 + 1.0), rel=1e-5)
    for half in halves:
        assert torch.allclose(half, noises, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_best_of_n_is_exact_and_reproducible(tmp_path, pipes, colour, kind):
    generator = _generator(pipes(kind))
    prompt = "a red circle"
    summary = run_search(generator, RewardEnsemble([colour]), [PromptItem(prompt, "p0")], tmp_path / "run",
                         SearchConfig(num_candidates=4, batch_size=1), gallery=False)
    folder = tmp_path / "run" / "prompts" / "p0"
    cands = load_candidates(folder)
    pixels = [_png(folder / c.image).astype(np.float64) / 255.0 for c in cands]
    truth = [float(p[..., 0].mean() - (p[..., 1].mean() + p[..., 2].mean()) / 2) for p in pixels]  # red contrast
    assert [c.scores[colour.label] for c in cands] == pytest.approx(truth, abs=1e-6)
    assert [c.seed for c in cands] == [0, 1, 2, 3]
    result = summary.results[0]
    assert result.best == int(np.argmax(truth)) and result.best_noise_seed == result.best
    assert result.best_score == pytest.approx(max(truth), abs=1e-6)
    assert result.nfe == 4 * STEPS * PER_STEP[kind]
    assert all(c.nfe == STEPS * PER_STEP[kind] for c in cands)
    again = regenerate(generator, tmp_path / "run", "p0", result.best)
    assert again.shape == (16, 16, 3)
    assert np.array_equal(again, _png(folder / cands[result.best].image))
    by_hand = generator.generate(prompt, seed_noise(result.best_noise_seed, (4, 8, 8))[None])[0]
    assert np.array_equal(by_hand, again)
    generator.close()


@pytest.mark.parametrize("kind", KINDS)
def test_random_search_nfes_are_steps_times_candidates_times_guidance(tmp_path, pipes, colour, kind):
    generator = _generator(pipes(kind))
    run_search(generator, RewardEnsemble([colour]), [PromptItem("a blue square", "p0")], tmp_path / "run",
               SearchConfig(method="random", rounds=2, batch_size=4), gallery=False)
    rows = [json.loads(line) for line in (tmp_path / "run" / "rounds.jsonl").read_text().splitlines()]
    assert [r["num_noises"] for r in rows] == [2, 4]
    assert [r["nfe"] for r in rows] == [2 * STEPS * PER_STEP[kind], 6 * STEPS * PER_STEP[kind]]
    generator.close()


def test_guidance_settings_change_the_nfe_count(pipes):
    noises = seed_noises([0, 1, 2], (4, 8, 8))
    sdxl = _generator(pipes("sdxl"), guidance_scale=1.0)  # scale 1: no unconditional pass
    sdxl.generate("a cat", noises)
    assert sdxl.nfe == 3 * STEPS * 1
    sdxl.close()
    flux = _generator(pipes("flux"), guidance_scale=7.0)  # distilled guidance is an input, not a second pass
    flux.generate("a cat", noises)
    assert flux.nfe == 3 * STEPS * 1
    flux.close()
    true_cfg = _generator(pipes("flux"), negative_prompt="blurry", call_kwargs={"true_cfg_scale": 2.0})
    true_cfg.generate("a cat", noises)  # FluxPipeline's true CFG: a separate negative-prompt call per step
    assert true_cfg.nfe == 3 * STEPS * 2
    true_cfg.close()


def test_zero_order_on_flux_keeps_norm_and_cosine_in_the_unpacked_shape(tmp_path, pipes, colour):
    generator = _generator(pipes("flux"))
    threshold = 0.9
    summary = run_search(generator, RewardEnsemble([colour]), [PromptItem("a green field", "p0")], tmp_path / "run",
                         SearchConfig(method="zero-order", rounds=2, num_neighbors=2, threshold=threshold),
                         gallery=False)
    folder = tmp_path / "run" / "prompts" / "p0"
    cands = load_candidates(folder)
    assert [c.origin for c in cands] == ["seed", "neighbour", "neighbour", "neighbour", "neighbour"]
    assert summary.results[0].nfe == 5 * STEPS * 1

    def noise(cand) -> torch.Tensor:
        if cand.noise is None:
            return seed_noise(cand.seed, (4, 8, 8))
        from safetensors.torch import load_file

        return load_file(str(folder / cand.noise))["noise"]

    for cand in cands[1:]:
        mine, pivot = noise(cand), noise(cands[cand.parent])
        assert mine.shape == (4, 8, 8)  # stored unpacked, as FLUX's VAE latents are laid out
        assert abs(float(mine.double().norm()) / float(pivot.double().norm()) - 1.0) <= 1e-6
        assert abs(cosine(mine, pivot) - threshold) <= 1e-6
    # what the transformer sees is the packed neighbour: packing only permutes entries, so the cosine holds
    last = cands[-1]
    packed = _first_denoiser_input(generator, "a green field", noise(last)[None])
    packed_pivot = _first_denoiser_input(generator, "a green field", noise(cands[last.parent])[None])
    assert abs(cosine(packed, packed_pivot) - threshold) <= 1e-6
    assert np.array_equal(regenerate(generator, tmp_path / "run", "p0", last.index), _png(folder / last.image))
    generator.close()


def test_search_over_paths_refuses_schedulers_without_closed_form_renoising(tmp_path, pipes, colour):
    from diffusers import DPMSolverMultistepScheduler

    pipe = pipes("sdxl")
    original = pipe.scheduler
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(original.config)  # multistep: no closed form here
    try:
        generator = _generator(pipe)
        with pytest.raises(UsageError) as caught:
            run_search(generator, RewardEnsemble([colour]), [PromptItem("a cat", "p0")], tmp_path / "run",
                       SearchConfig(method="paths"), gallery=False)
        assert str(caught.value) == ("search over paths on StableDiffusionXLPipeline needs a DDIM or Euler "
                                     "scheduler, not DPMSolverMultistepScheduler — pass --scheduler ddim "
                                     "(Python: load_pipeline(..., scheduler='ddim'))")
        assert not (tmp_path / "run").exists()  # refused before any file is written
        generator.close()
    finally:
        pipe.scheduler = original
    true_cfg = _generator(pipes("flux"), negative_prompt="blurry", call_kwargs={"true_cfg_scale": 2.0})
    with pytest.raises(UsageError, match="^search over paths on FluxPipeline does not support true_cfg_scale > 1"):
        true_cfg.check_paths()
    true_cfg.close()


def test_sdxl_euler_paths_renoise_by_hand_and_run(tmp_path, pipes, colour):
    """SDXL's own Euler scheduler (variance exploding: x_t = x_0 + sigma_t eps): the stepped loop gives the
    pipeline's pixels, re-noising is x_s = x_t + sqrt(sigma_s^2 - sigma_t^2) eps, and a paths run completes."""
    generator = DiffusersGenerator(pipes("sdxl"), num_inference_steps=3, height=16, width=16)
    generator.check_paths()
    noises = seed_noises([5, 6], generator.latent_shape)
    direct = generator.generate("a cat", noises)
    half, _ = generator.run_steps("a cat", generator.start_paths(noises), 2)
    final, _ = generator.run_steps("a cat", half, 3)
    assert all(np.array_equal(a, b) for a, b in zip(direct, generator.decode(final.latents), strict=True))
    sigmas = generator.sigmas()
    assert len(sigmas) == 4 and float(sigmas[-1]) == 0.0 and bool((sigmas[:-1] > sigmas[1:]).all())
    eps = seed_noises([9, 10], generator.latent_shape)
    s, t = float(sigmas[1]), float(sigmas[2])
    back = generator.renoise(half, 1, eps)
    by_hand = half.latents.double() + math.sqrt(s * s - t * t) * eps.double()
    assert back.step == 1 and torch.allclose(back.latents.double(), by_hand, atol=1e-5)
    back = generator.renoise(final, 2, eps)  # from the clean end (sigma 0): x_0 + sigma_s eps
    assert torch.allclose(back.latents.double(), final.latents.double() + s * eps.double(), atol=1e-5)
    generator.close()
    generator = DiffusersGenerator(pipes("sdxl"), num_inference_steps=4, height=16, width=16)
    start = generator.start_paths(noises)  # the scheduler was last set for 3 steps; Euler's start sigma differs
    assert torch.allclose(start.latents, noises * math.sqrt(float(generator.sigmas()[0]) ** 2 + 1))
    run_search(generator, RewardEnsemble([colour]), [PromptItem("a red circle", "p0")], tmp_path / "run",
               SearchConfig(method="paths", num_candidates=2, rounds=1, branches=2, renoise_steps=1), gallery=False)
    rows = [json.loads(line) for line in (tmp_path / "run" / "rounds.jsonl").read_text().splitlines()]
    # CFG (2 per image per step): 2 paths x 2 steps (8), then 4 branches re-noised to step 1, run to 4 (24)
    assert [r["nfe"] for r in rows] == [8, 32]
    generator.close()


@pytest.mark.parametrize("kind", ("sdxl", "sd3"))
def test_stepped_paths_reproduce_the_pipeline_on_sdxl_and_sd3(pipes, kind):
    """The step-by-step loop (two pieces, with classifier-free guidance and a negative prompt) gives the
    pipeline call's pixels; SDXL runs with DDIM, whose re-noising is closed form."""
    pipe = pipes(kind)
    if kind == "sdxl":
        from diffusers import DDIMScheduler

        original = pipe.scheduler
        pipe.scheduler = DDIMScheduler.from_config(original.config)
    try:
        generator = DiffusersGenerator(pipe, num_inference_steps=3, height=16, width=16, negative_prompt="blurry")
        generator.check_paths()
        noises = seed_noises([5, 6], generator.latent_shape)
        direct = generator.generate("a cat", noises)
        half, _ = generator.run_steps("a cat", generator.start_paths(noises), 2)
        final, _ = generator.run_steps("a cat", half, 3)
        assert generator.nfe == 2 * (2 * 3) * 2  # CFG: 2 inputs per image per step, pipeline + stepped
        stepped = generator.decode(final.latents)
        assert all(np.array_equal(a, b) for a, b in zip(direct, stepped, strict=True))
        generator.close()
    finally:
        if kind == "sdxl":
            pipe.scheduler = original


def _shifted(sigma: float, mu: float) -> float:
    """FLUX's exponential time shift of a noise level (by hand)."""
    return math.exp(mu) / (math.exp(mu) + (1.0 / sigma - 1.0)) if sigma > 0 else 0.0


def test_flux_steps_reproduce_the_pipeline_and_renoise_by_hand(pipes):
    generator = DiffusersGenerator(pipes("flux"), num_inference_steps=3, height=16, width=16)
    generator.check_paths()
    # 16 image tokens = the scheduler's base_image_seq_len, so mu = base_shift = 0.5; sigmas 1, 2/3, 1/3, 0
    sigmas = [_shifted(x, 0.5) for x in (1.0, 2 / 3, 1 / 3, 0.0)]
    assert generator.sigmas().tolist() == pytest.approx(sigmas, abs=1e-6)
    noises = seed_noises([5, 6], generator.latent_shape)
    direct = generator.generate("a cat", noises)
    half, _ = generator.run_steps("a cat", generator.start_paths(noises), 2)
    final, predicted = generator.run_steps("a cat", half, 3)
    assert final.latents.shape == (2, 4, 8, 8)  # path states stay unpacked
    assert generator.nfe == 2 * 3 + 2 * 3  # pipeline call + stepped run, 1 per image per step
    stepped = generator.decode(final.latents)
    assert all(np.array_equal(a, b) for a, b in zip(direct, stepped, strict=True))  # the pipeline's own loop
    assert torch.allclose(predicted, final.latents, atol=1e-6)  # last step to sigma 0: x_0 = x_t - sigma_t v
    eps = seed_noises([9, 10], generator.latent_shape)
    s, t = sigmas[1], sigmas[2]
    back = generator.renoise(half, 1, eps)
    ratio = (1 - s) / (1 - t)
    by_hand = ratio * half.latents.double() + math.sqrt(s * s - ratio * ratio * t * t) * eps.double()
    assert back.step == 1 and torch.allclose(back.latents.double(), by_hand, atol=1e-6)
    back = generator.renoise(final, 1, eps)  # from the end (t = 0): (1 - s) x_0 + s eps with s = sigmas[2]
    by_hand = (1 - t) * final.latents.double() + t * eps.double()
    assert back.step == 2 and torch.allclose(back.latents.double(), by_hand, atol=1e-6)
    # the re-noised latents have the marginal of step s: x_t = (1 - t) x0 + t e  ->  mean (1 - s) x0, std s
    x0, count = 0.7, 4096
    e = seed_noises(range(count), (4, 8, 8))
    moved = generator.renoise(PathState((1 - t) * x0 + t * e, 2), 1, seed_noises(range(count, 2 * count),
                                                                                  (4, 8, 8))).latents.double()
    assert float(moved.mean()) == pytest.approx((1 - s) * x0, abs=4 * s / math.sqrt(moved.numel()))
    assert float(moved.std()) == pytest.approx(s, rel=0.01)
    generator.close()


def test_search_over_paths_on_flux(tmp_path, pipes, colour):
    generator = DiffusersGenerator(pipes("flux"), num_inference_steps=4, height=16, width=16)
    summary = run_search(generator, RewardEnsemble([colour]), [PromptItem("a red circle", "p0")], tmp_path / "run",
                         SearchConfig(method="paths", num_candidates=2, rounds=1, branches=2, renoise_steps=1),
                         gallery=False)
    cands = load_candidates(tmp_path / "run" / "prompts" / "p0")
    rows = [json.loads(line) for line in (tmp_path / "run" / "rounds.jsonl").read_text().splitlines()]
    # round 0: 2 paths x steps 0..2 (4 NFEs); round 1: 4 branches re-noised to step 1, run to 4 (12 NFEs)
    assert [r["nfe"] for r in rows] == [4, 16]
    assert [c.final for c in cands] == [False, False, True, True, True, True]
    assert sorted(c.parent for c in cands[2:]) == [0, 0, 1, 1]  # each kept path branched twice
    best = summary.results[0]
    assert best.best in (2, 3, 4, 5) and best.best_score == max(c.score for c in cands[2:])
    generator.close()


def test_cli_on_a_saved_flux_folder_writes_the_run_and_resumes(tmp_path, pipes, tiny_checkpoint):
    from rewardlab.cli import cli

    folder = tmp_path / "flux"
    pipes("flux").save_pretrained(folder)
    run = tmp_path / "run"
    common = ["search", "--pipeline", str(folder), "-p", "a red circle", "-p", "a blue square", "--steps", str(STEPS),
              "--height", "16", "--width", "16", "-n", "2", "-r", tiny_checkpoint, "--device", "cpu", "--no-gallery"]
    args = [*common, "-o", str(run)]
    first = CliRunner().invoke(cli, args)
    assert first.exit_code == 0, first.output
    assert "2 prompt(s), 0 already done, 8 NFEs" in first.output  # 2 prompts x 2 noises x 2 steps x 1
    results = [json.loads(line) for line in (run / "results.jsonl").read_text().splitlines()]
    assert sorted(r["prompt"] for r in results) == ["a blue square", "a red circle"]
    assert all(r["nfe"] == 4 and r["num_candidates"] == 2 for r in results)
    settings = json.loads((run / "run.json").read_text())
    assert settings["generator"]["pipeline"] == "FluxPipeline"
    assert settings["generator"]["latent_shape"] == [4, 8, 8]
    pngs = sorted(run.glob("prompts/*/c*.png"))
    assert len(pngs) == 4 and all(_png(p).shape == (16, 16, 3) for p in pngs)
    stamps = [p.stat().st_mtime_ns for p in pngs]
    second = CliRunner().invoke(cli, args)
    assert second.exit_code == 0, second.output
    assert "2 prompt(s), 2 already done" in second.output
    assert [p.stat().st_mtime_ns for p in pngs] == stamps  # nothing regenerated
    paths = CliRunner().invoke(cli, [*common, "--method", "paths", "--rounds", "1", "-o", str(tmp_path / "paths")])
    assert paths.exit_code == 0, paths.output
    # per prompt: 2 paths run to step 1 (2 NFEs), 4 branches re-noised back to step 0 and run to 2 (8 NFEs)
    assert "2 prompt(s), 0 already done, 20 NFEs" in paths.output
    true_cfg = CliRunner().invoke(cli, [*common, "--true-cfg-scale", "2", "--negative-prompt", "", "-o",
                                        str(tmp_path / "true-cfg")])
    assert true_cfg.exit_code == 0, true_cfg.output
    assert "2 prompt(s), 0 already done, 16 NFEs" in true_cfg.output  # true CFG: 2 transformer inputs per step
    no_negative = CliRunner().invoke(cli, [*common, "--true-cfg-scale", "2", "-o", str(tmp_path / "x")])
    assert no_negative.exit_code == 2 and "--true-cfg-scale 2.0 needs a value above 1 and --negative-prompt" \
        in no_negative.output and not (tmp_path / "x").exists()


def test_options_the_pipeline_does_not_take_are_refused(pipes):
    with pytest.raises(UsageError, match="^StableDiffusionXLPipeline does not take true_cfg_scale"):
        _generator(pipes("sdxl"), call_kwargs={"true_cfg_scale": 2.0})
    with pytest.raises(UsageError, match="^true_cfg_scale > 1 needs a negative prompt"):
        _generator(pipes("flux"), call_kwargs={"true_cfg_scale": 2.0})
