"""`rewardlab models`, `rewardlab score` and `rewardlab rank`."""

from __future__ import annotations

import csv
import io
import json
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import click

from ..errors import ImageLoadError, UsageError
from ..integrations.ray_cli import MANIFEST_ONLY, RAY_ONLY, manifest_options, ray_options, run_score
from ..io.atomic import write_json, write_text
from ..io.images import expand_paths
from ..io.paths import check_output_path
from ..io.png_text import set_png_text
from ..io.records import read_records, resolve_image
from ..io.safe_text import csv_cell, for_terminal
from .scorer import ranks_from_scores


@dataclass
class Row:
    image: str
    prompt: str
    score: float
    rank: int | None = None
    error: str | None = None

    def as_dict(self) -> dict:
        out = {"image": self.image, "prompt": self.prompt, "score": None if math.isnan(self.score) else self.score}
        if self.rank is not None:
            out["rank"] = self.rank
        if self.error:
            out["error"] = self.error
        return out


@click.command("models")
@click.option("--format", "fmt", type=click.Choice(["table", "jsonl"]), default="table")
def models_command(fmt: str) -> None:
    """List the registered reward models with their source, preprocessing and output."""
    from ..registry import all_specs

    rows = [spec.to_row() for spec in all_specs()]
    if fmt == "jsonl":
        for row in rows:
            click.echo(json.dumps(row))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title="rewardlab models")
    for column in rows[0]:
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(*row.values())
    Console(width=200).print(table)


def _scoring_options(func: Callable) -> Callable:
    options = [
        click.argument("images", nargs=-1, type=click.Path()),
        click.option("--prompt", "-p", help="Prompt for every image."),
        click.option("--prompts-file", type=click.Path(dir_okay=False),
                     help="JSONL with one {\"prompt\": ..., \"image\": ...} object per line (image paths relative "
                          "to the file's folder)."),
        click.option("--allow-outside-root", is_flag=True,
                     help="Allow --prompts-file image paths outside the file's folder (../, absolute paths)."),
        click.option("--model", "-m", default="imagereward-v1.0", show_default=True,
                     help="Registry name (see `rewardlab models`) or a checkpoint path."),
        click.option("--checkpoint", type=click.Path(dir_okay=False), help="Local weights file."),
        click.option("--batch-size", "-b", type=click.IntRange(min=1), default=None, help="Images per forward pass."),
        click.option("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)."),
        click.option("--dtype", type=click.Choice(["fp32", "bf16", "fp16"]), default=None,
                     help="Compute precision (default: fp32 on CPU, bf16 on CUDA)."),
        click.option("--format", "fmt", type=click.Choice(["table", "jsonl", "csv"]), default="table", show_default=True),
        click.option("--output", "-o", type=click.Path(),
                     help="Write results here instead of stdout (with --ray: a folder of Parquet shards)."),
        click.option("--min-score", type=float, default=None, help="Keep only images scoring at least this."),
        click.option("--top-k", type=click.IntRange(min=1), default=None, help="Keep only the K best images per prompt."),
        click.option("--write-metadata", is_flag=True,
                     help="Store the score in each PNG's text chunks, keeping every other chunk byte for byte "
                          "(other formats and animated PNGs: a .rewardlab.json sidecar)."),
        click.option("--report", type=click.Path(dir_okay=False),
                     help="Also write a self-contained HTML gallery: per prompt, images sorted by score."),
        click.option("--no-progress", is_flag=True, help="Hide the progress bar."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _read_jobs(prompt: str | None, prompts_file: str | None, images: tuple[str, ...], allow_outside: bool
               ) -> list[tuple[str, str]]:
    """(prompt, image) pairs from the arguments, in input order."""
    if prompts_file:
        if prompt or images:
            raise click.UsageError("use either --prompts-file or --prompt with IMAGES, not both")
        jobs = []
        root = Path(prompts_file).parent
        for record in read_records(prompts_file):
            image = resolve_image(record.text("image"), root, allow_outside, f"{record.where} image")
            jobs.append((record.text("prompt"), image))
        if not jobs:
            raise UsageError(f"--prompts-file {prompts_file} holds no rows")
        return jobs
    if prompt is None:
        raise click.UsageError("give --prompt TEXT with IMAGES, or --prompts-file FILE")
    paths = expand_paths(list(images))
    if not paths:
        raise click.UsageError("no images given (or the folders hold no images)")
    return [(prompt, path) for path in paths]


def _score_jobs(jobs: list[tuple[str, str]], model: str, checkpoint, batch_size, device, dtype, progress: bool
                ) -> tuple[list[Row], str]:
    from .. import load

    scorer = load(model, checkpoint=checkpoint, device=device, dtype=dtype)
    groups: dict[str, list[int]] = {}
    for index, (prompt, _) in enumerate(jobs):
        groups.setdefault(prompt, []).append(index)
    result = scorer.score_detailed([p for p, _ in jobs], [i for _, i in jobs], batch_size=batch_size, progress=progress)
    rows = [Row(image, prompt, score, error=result.errors.get(i)) for i, ((prompt, image), score)
            in enumerate(zip(jobs, result.scores, strict=True))]
    for members in groups.values():
        ranks, _ = ranks_from_scores([rows[i].score for i in members])
        for i, rank in zip(members, ranks, strict=True):
            rows[i].rank = rank
    return rows, scorer.label


def _write_metadata(row: Row, model: str) -> str | None:
    """Store the score next to the image: inside a PNG (faithfully) or in a sidecar. Returns a warning or None."""
    path = Path(row.image)
    key = f"rewardlab:{model}"
    if path.suffix.lower() == ".png":
        try:
            set_png_text(path, key, f"{row.score:.6f}")
            return None
        except ImageLoadError as exc:
            warning = f"{exc.message}; wrote a sidecar instead"
    else:
        warning = None
    sidecar = path.with_name(path.name + ".rewardlab.json")
    data = {}
    if sidecar.is_file():
        try:
            data = json.loads(sidecar.read_text())
        except (OSError, json.JSONDecodeError):
            data = {}
    data = data if isinstance(data, dict) else {}
    data[model] = row.score
    write_json(sidecar, data)
    return warning


def _emit(rows: list[Row], fmt: str, output: str | None, show_rank: bool) -> None:
    if fmt == "jsonl":
        text = "".join(json.dumps(r.as_dict()) + "\n" for r in rows)
    elif fmt == "csv":
        buffer = io.StringIO()
        fields = ["image", "prompt", "score"] + (["rank"] if show_rank else []) + ["error"]
        writer = csv.DictWriter(buffer, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows({k: csv_cell(v) for k, v in r.as_dict().items()} for r in rows)
        text = buffer.getvalue()
    else:
        from rich.console import Console
        from rich.markup import escape
        from rich.table import Table

        table = Table()
        if show_rank:
            table.add_column("rank", justify="right")
        for column in ("score", "image", "prompt"):
            table.add_column(column, justify="right" if column == "score" else "left", overflow="fold")
        for r in rows:
            score = "error" if r.error else f"{r.score:.4f}"
            table.add_row(*([str(r.rank)] if show_rank else []), score, escape(for_terminal(r.image)),
                          escape(for_terminal(r.prompt)))
        buffer = io.StringIO()
        Console(file=buffer, width=160).print(table)
        text = buffer.getvalue()
    if output:
        write_text(output, text)
    else:
        click.echo(text, nl=False)


def _run(ranked: bool, images, prompt, prompts_file, allow_outside_root, model, checkpoint, batch_size, device, dtype,
         fmt, output, min_score, top_k, write_metadata, report, no_progress) -> None:
    if min_score is not None and not math.isfinite(min_score):
        raise click.BadParameter(f"{min_score} is not a finite number", param_hint="--min-score")
    if checkpoint is not None and not Path(checkpoint).is_file():
        raise click.BadParameter(f"{checkpoint} is not a file", param_hint="--checkpoint")
    jobs = _read_jobs(prompt, prompts_file, images, allow_outside_root)
    if output and Path(output).is_dir():
        raise click.BadParameter(f"{output} is a folder; give a file (folders are for --ray)", param_hint="--output")
    inputs = [image for _, image in jobs] + ([prompts_file] if prompts_file else [])
    if output:
        check_output_path(output, "--output", inputs)
    if report:
        check_output_path(report, "--report", inputs)
    rows, model_name = _score_jobs(jobs, model, checkpoint, batch_size, device, dtype, progress=not no_progress)
    failed = [r for r in rows if r.error]
    for r in failed:
        click.echo(f"error: {for_terminal(r.error)}", err=True)
    if write_metadata:
        for r in rows:
            if not r.error:
                warning = _write_metadata(r, model_name)
                if warning:
                    click.echo(f"warning: {for_terminal(warning)}", err=True)
    kept = [r for r in rows if not r.error]
    if min_score is not None:
        kept = [r for r in kept if r.score >= min_score]
    if top_k is not None:
        kept = [r for r in kept if r.rank is not None and r.rank <= top_k]
    if ranked:
        kept.sort(key=lambda r: (r.prompt, r.rank))
    if report:
        from ..report.gallery import ranking_gallery

        roots = [Path(prompts_file).parent] if prompts_file else [Path(item) for item in images]
        ranking_gallery(report, rows, model_name, allowed_roots=roots)
        click.echo(f"gallery written to {for_terminal(report)}", err=True)
    _emit(kept + ([] if (min_score is not None or top_k is not None) else failed), fmt, output, show_rank=ranked)
    if failed:
        click.echo(f"{len(failed)} of {len(rows)} images could not be scored", err=True)
        sys.exit(1)


@click.command("score")
@_scoring_options
@ray_options
@manifest_options
def score_command(**kwargs) -> None:
    """Score IMAGES (files or folders) against a prompt, in input order; with --ray, a manifest on Ray."""
    if kwargs["use_ray"] or any(kwargs[name] is not None for name in RAY_ONLY + MANIFEST_ONLY):
        run_score(**kwargs)
        return
    _run(False, **{k: v for k, v in kwargs.items() if k not in ("use_ray",) + RAY_ONLY + MANIFEST_ONLY})


@click.command("rank")
@_scoring_options
def rank_command(**kwargs) -> None:
    """Rank IMAGES for each prompt, best first (rank 1 = best)."""
    _run(True, **kwargs)


@click.command("convert")
@click.argument("checkpoint", type=click.Path(dir_okay=False))
@click.argument("output", type=click.Path(dir_okay=False))
@click.option("--model", "-m", default=None,
              help="Registry name, when the checkpoint cannot be recognised from its keys (e.g. CycleReward-T2I).")
def convert_command(checkpoint: str, output: str, model: str | None) -> None:
    """Write CHECKPOINT (.pt/.pth/.bin/.safetensors) as OUTPUT.safetensors with its spec embedded: the fastest
    file to load (memory-mapped, no architecture detection)."""
    from .loader import convert

    check_output_path(output, "OUTPUT", [checkpoint])
    spec = convert(checkpoint, output, model)
    click.echo(f"wrote {for_terminal(output)} ({spec.name}); load it with rewardlab.load({str(output)!r})")
