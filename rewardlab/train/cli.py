"""`rewardlab train` (and `python -m rewardlab.train`, for `accelerate launch`)."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import click

from ..errors import ConfigError

RECIPES = ("imagereward", "cyclereward-i2t", "cyclereward-t2i", "cyclereward-combo", "pickscore", "hpsv2")


def recipe_path(name_or_path: str) -> str:
    """A built-in recipe's file, or ``name_or_path`` itself when it is a file."""
    if name_or_path in RECIPES:
        return str(resources.files("rewardlab.train") / "recipes" / f"{name_or_path}.yaml")
    if not Path(name_or_path).is_file():
        raise ConfigError(f"--config {name_or_path}: neither a built-in recipe nor a file",
                          f"recipes: {', '.join(RECIPES)}")
    return name_or_path


@click.command("train")
@click.option("--config", "-c", help=f"YAML config or a built-in recipe: {', '.join(RECIPES)}.")
@click.option("--data", "-d", multiple=True, help="Training data KIND:PATH (repeat to mix sources); overrides the config.")
@click.option("--valid-data", multiple=True, help="Validation data KIND:PATH (default: a split of --data).")
@click.option("--output-dir", "-o", help="Run folder (checkpoints, state, log.jsonl).")
@click.option("--init", help="random, a pretrained backbone file (BLIP model_large.pth, a CLIP checkpoint), "
                             "a reward checkpoint or a registry name.")
@click.option("--resume-mismatch-ok", is_flag=True, default=None,
              help="Resume even if lr, batch size, data ... differ from the saved run's.")
@click.option("--allow-outside-root", is_flag=True, default=None,
              help="Allow image paths that leave the data file's folder (../, absolute paths).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override any config setting.")
def train_command(config, data, valid_data, output_dir, init, resume_mismatch_ok, allow_outside_root, overrides
                  ) -> None:
    """Train a reward model on preference pairs (Bradley–Terry); resumes an interrupted run in place.

    The output folder holds best.safetensors / final.safetensors, which rewardlab.load(path) reads."""
    from .trainer import TrainConfig, Trainer

    options = {"data": list(data), "valid_data": list(valid_data), "output_dir": output_dir, "init": init,
               "resume_mismatch_ok": resume_mismatch_ok, "allow_outside_root": allow_outside_root}
    typed = {key: value for key, value in options.items() if value not in (None, [])}
    cfg = TrainConfig.from_yaml(recipe_path(config) if config else None, list(overrides), typed)
    trainer = Trainer(cfg)
    click.echo(f"trainable parameters: {trainer.trainable['trainable']:,} of {trainer.trainable['parameters']:,} "
               f"({trainer.trainable['trainable_fraction']:.1%}); init: {trainer.init_source}")
    summary = trainer.train()
    click.echo(json.dumps(summary, indent=1))
