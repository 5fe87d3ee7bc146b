"""`rewardlab finetune`: ReFL, DRaFT-K and AlignProp fine-tuning of a diffusers generator on rewards."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import click

RECIPES = ("refl-sd14", "draft-lora-sd15")


def recipe_path(name_or_path: str) -> str:
    if name_or_path in RECIPES:
        return str(resources.files("rewardlab.align") / "recipes" / f"{name_or_path}.yaml")
    if not Path(name_or_path).is_file():
        raise click.BadParameter(f"{name_or_path} is neither a recipe ({', '.join(RECIPES)}) nor a file",
                                 param_hint="--config")
    return name_or_path


@click.command("finetune")
@click.option("--config", "-c", help=f"YAML config or a built-in recipe: {', '.join(RECIPES)}.")
@click.option("--method", type=click.Choice(["refl", "draft", "alignprop"]), help="Overrides the config's method.")
@click.option("--model", "pretrained_model", help="diffusers pipeline folder or hub id (pretrained_model).")
@click.option("--reward", "-r", multiple=True, metavar="NAME[:WEIGHT]",
              help="Training reward; repeat for a weighted sum (registry name or checkpoint path).")
@click.option("--heldout-reward", multiple=True, metavar="NAME[:WEIGHT]",
              help="Reward tracked on validation images but never trained on (exposes reward hacking).")
@click.option("--prompts", "-p", help="refl_data.json, JSONL or text file of prompts.")
@click.option("--pretrain-data", help="Image-text pairs for the pretraining loss (JSONL/JSON or folder).")
@click.option("--output-dir", "-o", help="Run folder (log.jsonl, gallery.html, state/, lora/ or unet/).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override any config setting.")
def finetune_command(config, method, pretrained_model, reward, heldout_reward, prompts, pretrain_data, output_dir,
                     overrides) -> None:
    """Fine-tune a diffusion generator on differentiable rewards; resumes an interrupted run in place.

    LoRA results load with ``pipeline.load_lora_weights(OUTPUT_DIR/lora/final)``."""
    from .finetune import FinetuneConfig, Finetuner

    options = {"method": method, "pretrained_model": pretrained_model, "prompts": prompts,
               "pretrain_data": pretrain_data, "output_dir": output_dir,
               "reward": list(reward) or None, "heldout_reward": list(heldout_reward) or None}
    cfg = FinetuneConfig.from_yaml(recipe_path(config) if config else None, list(overrides),
                                   {key: value for key, value in options.items() if value})
    tuner = Finetuner(cfg)
    click.echo(f"{cfg.method}: {tuner.trainable_parameters:,} trainable parameters ({cfg.parameters}); "
               f"{len(tuner.prompts)} prompts; output {cfg.output_dir}")
    summary = tuner.train()
    click.echo(json.dumps(summary, indent=1))
