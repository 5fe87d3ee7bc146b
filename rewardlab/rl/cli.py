"""`rewardlab calibrate`: score statistics of one model over a prompt/image set."""

from __future__ import annotations

import json
from pathlib import Path

import click

from ..errors import UsageError


def _parse_quantiles(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise UsageError(f"--quantiles {text!r}: not a comma-separated list of numbers") from None
    if not values or any(not 0 <= q <= 1 for q in values):
        raise UsageError(f"--quantiles {text!r}: give numbers in [0, 1], e.g. 0.05,0.5,0.95")
    return values


@click.command("calibrate")
@click.option("--model", "-m", required=True, help="Registry name (see `rewardlab models`) or a checkpoint path.")
@click.option("--checkpoint", type=click.Path(exists=True, dir_okay=False), help="Local weights file.")
@click.option("--data", "data", required=True, type=click.Path(dir_okay=False),
              help="JSONL or Parquet rows {prompt, image} (also {prompt, images} or {prompt, image_a, image_b}).")
@click.option("--image-root", type=click.Path(file_okay=False), help="Folder relative image paths are under "
              "(default: the data file's folder).")
@click.option("--output", "-o", type=click.Path(dir_okay=False), help="Calibration JSON to write (default: stdout).")
@click.option("--merge", is_flag=True, help="Keep the other models already in --output (one file for several models).")
@click.option("--quantiles", default="0.01,0.05,0.1,0.25,0.5,0.75,0.9,0.95,0.99", show_default=True)
@click.option("--batch-size", "-b", type=int, default=None, help="Images per forward pass.")
@click.option("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available).")
@click.option("--dtype", type=click.Choice(["fp32", "bf16", "fp16"]), default=None)
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
def calibrate_command(model, checkpoint, data, image_root, output, merge, quantiles, batch_size, device, dtype,
                      no_progress) -> None:
    """Write {model: {mean, std, quantiles, count}} of MODEL's scores over DATA, for
    normalize="zscore" in MultiReward, reward_fn and `rewardlab serve --calibration`."""
    from .. import load
    from .calibrate import calibrate, read_items, write_calibration

    levels = _parse_quantiles(quantiles)
    if batch_size is not None and batch_size < 1:
        raise UsageError(f"--batch-size {batch_size} must be at least 1")
    if output and not Path(output).resolve().parent.is_dir():
        raise UsageError(f"--output {output}: folder does not exist")
    prompts, images = read_items(data, image_root)
    scorer = load(model, checkpoint=checkpoint, device=device, dtype=dtype)
    record, errors = calibrate(scorer, prompts, images, batch_size=batch_size, quantiles=levels,
                               progress=not no_progress)
    for index in sorted(errors):
        click.echo(f"error: {errors[index]}", err=True)
    if output:
        write_calibration(output, scorer.label, record, merge=merge)
        click.echo(f"{scorer.label}: mean {record['mean']:.6g}, std {record['std']:.6g} over {record['count']} "
                   f"items -> {output}", err=True)
    else:
        click.echo(json.dumps({scorer.label: record}, indent=1))
    if errors:
        click.echo(f"{len(errors)} of {len(images)} images could not be scored (left out of the statistics)", err=True)
        raise SystemExit(1)
