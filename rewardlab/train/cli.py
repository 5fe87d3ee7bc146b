"""`rewardlab train` (and `python -m rewardlab.train`, for `accelerate launch`)."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import click

RECIPES = ("imagereward", "cyclereward-i2t", "cyclereward-t2i", "cyclereward-combo")


def recipe_path(name_or_path: str) -> str:
    if name_or_path in RECIPES:
        return str(resources.files("rewardlab.train") / "recipes" / f"{name_or_path}.yaml")
    if not Path(name_or_path).is_file():
        raise click.BadParameter(f"{name_or_path} is neither a recipe ({', '.join(RECIPES)}) nor a file",
                                 param_hint="--config")
    return name_or_path


@click.command("train")
@click.option("--config", "-c", help=f"YAML config or a built-in recipe: {', '.join(RECIPES)}.")
@click.option("--data", "-d", multiple=True, help="Training data KIND:PATH (repeat to mix sources); overrides the config.")
@click.option("--valid-data", multiple=True, help="Validation data KIND:PATH (default: a split of --data).")
@click.option("--output-dir", "-o", help="Run folder (checkpoints, state, log.jsonl).")
@click.option("--init", help="random, a BLIP model_large.pth, a registry name or a reward checkpoint.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override any config setting.")
def train_command(config, data, valid_data, output_dir, init, overrides) -> None:
    """Train a reward model on preference pairs (Bradley–Terry); resumes an interrupted run in place.

    The output folder holds best.safetensors / final.safetensors, which rewardlab.load(path) reads."""
    from .trainer import TrainConfig, Trainer

    extra = list(overrides)
    if data:
        extra.append(f"data={json.dumps(list(data))}")
    if valid_data:
        extra.append(f"valid_data={json.dumps(list(valid_data))}")
    if output_dir:
        extra.append(f"output_dir={output_dir}")
    if init:
        extra.append(f"init={init}")
    try:
        cfg = TrainConfig.from_yaml(recipe_path(config) if config else None, extra)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    trainer = Trainer(cfg)
    click.echo(f"trainable parameters: {trainer.trainable['trainable']:,} of {trainer.trainable['parameters']:,} "
               f"({trainer.trainable['trainable_fraction']:.1%}); init: {trainer.init_source}")
    summary = trainer.train()
    click.echo(json.dumps(summary, indent=1))
