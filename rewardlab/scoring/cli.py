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

from ..integrations.ray_cli import MANIFEST_ONLY, RAY_ONLY, manifest_options, ray_options, run_score
from ..io.images import expand_paths


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
        click.option("--prompts-file", type=click.Path(exists=True, dir_okay=False),
                     help="JSONL with one {\"prompt\": ..., \"image\": ...} object per line."),
        click.option("--model", "-m", default="imagereward-v1.0", show_default=True,
                     help="Registry name (see `rewardlab models`) or a checkpoint path."),
        click.option("--checkpoint", type=click.Path(exists=True, dir_okay=False), help="Local weights file."),
        click.option("--batch-size", "-b", type=int, default=None, help="Images per forward pass."),
        click.option("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)."),
        click.option("--dtype", type=click.Choice(["fp32", "bf16", "fp16"]), default=None,
                     help="Compute precision (default: fp32 on CPU, bf16 on CUDA)."),
        click.option("--format", "fmt", type=click.Choice(["table", "jsonl", "csv"]), default="table", show_default=True),
        click.option("--output", "-o", type=click.Path(),
                     help="Write results here instead of stdout (with --ray: a folder of Parquet shards)."),
        click.option("--min-score", type=float, default=None, help="Keep only images scoring at least this."),
        click.option("--top-k", type=int, default=None, help="Keep only the K best images per prompt."),
        click.option("--write-metadata", is_flag=True,
                     help="Store the score in each PNG's text chunks (other formats: a .rewardlab.json sidecar)."),
        click.option("--no-progress", is_flag=True, help="Hide the progress bar."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _read_jobs(prompt: str | None, prompts_file: str | None, images: tuple[str, ...]) -> list[tuple[str, str]]:
    """(prompt, image) pairs from the arguments, in input order."""
    if prompts_file:
        if prompt or images:
            raise click.UsageError("use either --prompts-file or --prompt with IMAGES, not both")
        jobs = []
        for number, line in enumerate(Path(prompts_file).read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                jobs.append((str(row["prompt"]), str(row["image"])))
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise click.UsageError(f"{prompts_file} line {number}: expected {{\"prompt\", \"image\"}} ({exc})") from None
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
    from .scorer import ranks_from_scores

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
    return rows, scorer.name


def _write_metadata(row: Row, model: str) -> None:
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    path = Path(row.image)
    key = f"rewardlab:{model}"
    if path.suffix.lower() == ".png":
        with Image.open(path) as image:
            image.load()
            info = PngInfo()
            for name, value in image.text.items():
                if name != key:
                    info.add_text(name, value)
            info.add_text(key, f"{row.score:.6f}")
            image.save(path, pnginfo=info)
    else:
        sidecar = path.with_name(path.name + ".rewardlab.json")
        data = json.loads(sidecar.read_text()) if sidecar.exists() else {}
        data[model] = row.score
        sidecar.write_text(json.dumps(data, indent=1))


def _emit(rows: list[Row], fmt: str, output: str | None, show_rank: bool) -> None:
    if fmt == "jsonl":
        text = "".join(json.dumps(r.as_dict()) + "\n" for r in rows)
    elif fmt == "csv":
        buffer = io.StringIO()
        fields = ["image", "prompt", "score"] + (["rank"] if show_rank else []) + ["error"]
        writer = csv.DictWriter(buffer, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(r.as_dict() for r in rows)
        text = buffer.getvalue()
    else:
        from rich.console import Console
        from rich.table import Table

        table = Table()
        if show_rank:
            table.add_column("rank", justify="right")
        for column in ("score", "image", "prompt"):
            table.add_column(column, justify="right" if column == "score" else "left", overflow="fold")
        for r in rows:
            score = "error" if r.error else f"{r.score:.4f}"
            table.add_row(*([str(r.rank)] if show_rank else []), score, r.image, r.prompt)
        buffer = io.StringIO()
        Console(file=buffer, width=160).print(table)
        text = buffer.getvalue()
    if output:
        Path(output).write_text(text)
    else:
        click.echo(text, nl=False)


def _run(ranked: bool, images, prompt, prompts_file, model, checkpoint, batch_size, device, dtype, fmt, output,
         min_score, top_k, write_metadata, no_progress) -> None:
    if output and Path(output).is_dir():
        raise click.BadParameter(f"{output} is a folder; give a file", param_hint="--output")
    jobs = _read_jobs(prompt, prompts_file, images)
    rows, model_name = _score_jobs(jobs, model, checkpoint, batch_size, device, dtype, progress=not no_progress)
    failed = [r for r in rows if r.error]
    for r in failed:
        click.echo(f"error: {r.error}", err=True)
    if write_metadata:
        for r in rows:
            if not r.error:
                _write_metadata(r, model_name)
    kept = [r for r in rows if not r.error]
    if min_score is not None:
        kept = [r for r in kept if r.score >= min_score]
    if top_k is not None:
        kept = [r for r in kept if r.rank is not None and r.rank <= top_k]
    if ranked:
        kept.sort(key=lambda r: (r.prompt, r.rank))
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
