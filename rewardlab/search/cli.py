"""`rewardlab search` (best-of-N and noise search with reward verifiers) and `rewardlab pairs`
(reward-labelled preference pairs). Options are checked before any model loads."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import click

from ..errors import UsageError
from ..io.safe_text import for_terminal
from ..scoring.ensemble import NORMALIZATIONS

logger = logging.getLogger(__name__)


def _reward_options(func):
    options = [
        click.option("--reward", "-r", "rewards", multiple=True, default=("imagereward-v1.0",), show_default=True,
                     help="Verifier NAME[:WEIGHT] (registry name or checkpoint path); repeat for an ensemble."),
        click.option("--normalize", type=click.Choice(NORMALIZATIONS), default="none", show_default=True,
                     help="How several rewards combine: none (weighted sum), zscore, rank (mean rank), borda."),
        click.option("--calibration", type=click.Path(exists=True, dir_okay=False),
                     help="JSON of per-model mean/std for --normalize zscore."),
        click.option("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)."),
        click.option("--dtype", type=click.Choice(["fp32", "bf16", "fp16"]), default=None,
                     help="Reward models' precision (default: fp32 on CPU, bf16 on CUDA)."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _check_rewards(rewards, normalize, calibration):
    from ..scoring.ensemble import load_calibration, parse_reward

    terms = [parse_reward(r) for r in rewards]
    load_calibration(calibration)
    if not terms:
        raise UsageError("no --reward given")
    return terms


def _load_ensemble(terms, normalize, calibration, device, dtype):
    from ..scoring.ensemble import RewardEnsemble

    return RewardEnsemble.load(terms, normalize=normalize, calibration=calibration, device=device, dtype=dtype)


@click.command("search")
@click.option("--pipeline", "pipeline_name", required=True,
              help="diffusers pipeline: hub name or local folder (e.g. stabilityai/sdxl-turbo).")
@click.option("--prompt", "-p", "prompt_texts", multiple=True, help="A prompt (repeatable).")
@click.option("--prompts", "prompts_file", type=click.Path(exists=True, dir_okay=False),
              help="Text file (one prompt per line) or JSONL ({\"prompt\", \"id\"?} per line).")
@click.option("--output", "-o", required=True, type=click.Path(file_okay=False),
              help="Run folder; rerunning with the same settings skips finished prompts.")
@click.option("--method", type=click.Choice(["best-of-n", "random", "zero-order", "paths"]), default="best-of-n",
              show_default=True)
@click.option("--num-candidates", "-n", type=int, default=4, show_default=True,
              help="best-of-n: N noises; paths: paths kept per round.")
@click.option("--rounds", type=int, default=4, show_default=True, help="random / zero-order / paths rounds.")
@click.option("--threshold", type=float, default=0.95, show_default=True, help="zero-order: neighbour cosine.")
@click.option("--num-neighbors", type=int, default=4, show_default=True, help="zero-order: neighbours per round.")
@click.option("--branches", type=int, default=2, show_default=True, help="paths: re-noised copies per path.")
@click.option("--renoise-steps", type=int, default=1, show_default=True, help="paths: steps to re-noise back.")
@click.option("--max-nfe", type=int, default=None, help="Per-prompt budget in denoiser evaluations.")
@click.option("--seed", type=int, default=0, show_default=True, help="First noise seed.")
@click.option("--batch-size", "-b", type=int, default=8, show_default=True, help="Images per pipeline call.")
@click.option("--steps", type=int, default=30, show_default=True, help="Denoising steps.")
@click.option("--guidance-scale", type=float, default=None, help="CFG scale; on FLUX the distilled guidance input (default: the pipeline's).")
@click.option("--height", type=int, default=None)
@click.option("--width", type=int, default=None)
@click.option("--negative-prompt", default=None)
@click.option("--true-cfg-scale", type=float, default=None,
              help="FLUX: classifier-free guidance with --negative-prompt on top of the distilled guidance (2 NFEs "
                   "per step).")
@click.option("--scheduler", type=click.Choice(["default", "ddim"]), default="default", show_default=True,
              help="ddim swaps in a DDIM scheduler (--method paths needs DDIM or Euler on UNet pipelines).")
@click.option("--pipeline-dtype", type=click.Choice(["fp32", "bf16", "fp16"]), default=None,
              help="Pipeline precision (default: fp16 on CUDA, fp32 on CPU).")
@_reward_options
@click.option("--no-gallery", is_flag=True, help="Do not write gallery.html.")
def search_command(pipeline_name, prompt_texts, prompts_file, output, method, num_candidates, rounds, threshold,
                   num_neighbors, branches, renoise_steps, max_nfe, seed, batch_size, steps, guidance_scale, height,
                   width, negative_prompt, true_cfg_scale, scheduler, pipeline_dtype, rewards, normalize, calibration,
                   device, dtype, no_gallery) -> None:
    """Generate candidates per prompt, score them with reward verifiers, keep the best."""
    from .runner import PromptItem, SearchConfig, prompt_id, read_prompts, run_search

    config = SearchConfig(method, num_candidates, rounds, threshold, num_neighbors, branches, renoise_steps, max_nfe,
                          seed, batch_size)
    config.validate()
    if steps < 1:
        raise UsageError(f"--steps {steps} must be at least 1")
    if true_cfg_scale is not None and not (true_cfg_scale > 1.0 and negative_prompt is not None):
        raise UsageError(f"--true-cfg-scale {true_cfg_scale} needs a value above 1 and --negative-prompt",
                         'e.g. --true-cfg-scale 4 --negative-prompt "blurry"')
    if bool(prompt_texts) == bool(prompts_file):
        raise UsageError("give prompts with --prompt TEXT (repeatable) or --prompts FILE, not both or neither")
    items = read_prompts(prompts_file) if prompts_file else [PromptItem(t, prompt_id(t)) for t in prompt_texts]
    terms = _check_rewards(rewards, normalize, calibration)
    from ..diffusion.loading import load_pipeline
    from .generator import DiffusersGenerator

    ensemble = _load_ensemble(terms, normalize, calibration, device, dtype)
    pipe = load_pipeline(pipeline_name, device, pipeline_dtype, scheduler)
    extra = {} if true_cfg_scale is None else {"true_cfg_scale": true_cfg_scale}
    generator = DiffusersGenerator(pipe, steps, guidance_scale, height, width, negative_prompt, call_kwargs=extra)

    def report(result) -> None:
        score = "error" if result.best_score is None else f"{result.best_score:.4f}"
        click.echo(f"{for_terminal(result.prompt_id)}: best {score} (candidate {result.best}, "
                   f"{result.num_candidates} candidates, {result.nfe} NFEs)")

    summary = run_search(generator, ensemble, items, output, config, gallery=not no_gallery, progress=report)
    click.echo(f"{len(summary.results)} prompt(s), {summary.skipped} already done, {summary.nfe} NFEs; "
               f"results in {for_terminal(Path(output) / 'results.jsonl')}")


@click.command("pairs")
@click.argument("source", type=click.Path(exists=True, file_okay=False))
@click.option("--output", "-o", required=True, type=click.Path(file_okay=False), help="Folder for the pair files.")
@click.option("--strategy", type=click.Choice(["best-vs-worst", "all-pairs"]), default="best-vs-worst",
              show_default=True)
@click.option("--min-margin", type=float, default=0.0, show_default=True,
              help="Smallest combined-score difference of a pair (ties are never paired).")
@click.option("--format", "formats", type=click.Choice(["parquet", "jsonl"]), multiple=True,
              default=("parquet", "jsonl"), show_default=True)
@click.option("--seed", type=int, default=0, show_default=True, help="Shuffles which image is jpg_0.")
@click.option("--batch-size", "-b", type=int, default=None)
@_reward_options
@click.option("--no-gallery", is_flag=True)
def pairs_command(source, output, strategy, min_margin, formats, seed, batch_size, rewards, normalize, calibration,
                  device, dtype, no_gallery) -> None:
    """Score SOURCE's candidates (a search run, or prompt folders with prompt.txt + images) and export
    preference pairs (Pick-a-Pic Parquet for Diffusion-DPO; rewardlab pair JSONL for train/eval)."""
    from .pairs import build_pairs, discover_candidates, make_pairs_from_folder

    build_pairs([], strategy, min_margin)
    discover_candidates(source)
    terms = _check_rewards(rewards, normalize, calibration)
    ensemble = _load_ensemble(terms, normalize, calibration, device, dtype)
    export = make_pairs_from_folder(ensemble, source, output, strategy, min_margin, formats, seed, batch_size,
                                    not no_gallery)
    click.echo(json.dumps({"pairs": export.pairs, "prompts": export.prompts, "candidates": export.candidates,
                           "errors": export.errors, "files": export.files}))
