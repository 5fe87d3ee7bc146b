"""`rewardlab eval`: agreement of one or more reward models with human judgements."""

from __future__ import annotations

import contextlib
import json
import math
import sys
from pathlib import Path

import click

from ..data.groups import Group
from ..data.sources import load_groups
from ..errors import UsageError
from ..integrations.ray_cli import RAY_ONLY, check_ray_usage, load_integration, ray_options
from ..io.atomic import write_json
from ..io.paths import check_output_path
from ..io.records import read_records
from ..io.safe_text import for_terminal

DATA_HELP = """Dataset, as KIND:PATH. KIND is one of
imagereward (test.json of ImageRewardDB), pairs (JSONL/Parquet of prompt,image_a,image_b,label),
rankings (JSONL/Parquet of prompt,images,ranking), hf:LAYOUT (LAYOUT = pickapic, hpdv2,
cycleprefdb-i2t, cycleprefdb-t2i; PATH = hub name, saved dataset folder or data file),
generators (folder ROOT/<generator>/<prompt id>.png, with --prompts and optionally --human-ranking).
A bare path ending in .json is read as imagereward."""


def generator_groups(root: str, prompts_file: str) -> tuple[list[Group], list[str]]:
    """One group per benchmark prompt holding each generator's image for it; returns (groups, generators)."""
    prompts = {}
    for record in read_records(prompts_file):
        record.require("id")
        prompts[str(record.row["id"])] = record.text("prompt")
    if not Path(root).is_dir():
        raise UsageError(f"--data generators:{root}: not a folder")
    generators = sorted(p.name for p in Path(root).iterdir() if p.is_dir())
    if not generators:
        raise UsageError(f"--data generators:{root}: no generator sub-folders")
    groups = []
    for pid, prompt in prompts.items():
        images = []
        for gen in generators:
            matches = sorted((Path(root) / gen).glob(f"{pid}.*"))
            images.append(str(matches[0]) if matches else str(Path(root) / gen / f"{pid}.png"))
        groups.append(Group(pid, [prompt] * len(generators), images, [0.0] * len(generators)))
    return groups, generators


def _report_roots(data: str, image_root: str | None, allow_outside: bool) -> list[str]:
    """Folders whose image files the report may embed: the data folder (or image root) only, unless the user
    allowed paths outside it."""
    from ..data.sources import parse_source

    if allow_outside:
        return ["/"]
    if image_root:
        return [image_root]
    if data.startswith("generators:"):
        return [data.partition(":")[2]]
    source = parse_source(data)
    return [] if source.kind == "hf" and not Path(source.path).exists() else [str(Path(source.path).parent)]


def _finite_or_none(value):
    """JSON has no NaN: undefined metrics (e.g. no pairs) are written as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(v) for v in value]
    return value


def _table(results, extra) -> str:
    from io import StringIO

    from rich.console import Console
    from rich.table import Table

    table = Table(title="rewardlab eval")
    columns = ["model", "pairs", "accuracy", "95% CI", "macro", "tie-aware", "recall@1", "recall@2", "recall@4",
               "filter@1", "filter@2", "filter@4", "skipped"]
    for c in columns:
        table.add_column(c, justify="left" if c == "model" else "right")
    for r in results:
        m = r.metrics

        def f(v):
            return "–" if isinstance(v, float) and math.isnan(v) else f"{v:.4f}"

        table.add_row(r.model, str(m["pairs"]), f(m["accuracy"]), f"{f(m['ci95'][0])}–{f(m['ci95'][1])}",
                      f(m["macro_accuracy"]), f(m["tie_aware_accuracy"]), *(f(m[k]) for k in columns[6:12]),
                      str(r.skipped_groups))
    buffer = StringIO()
    console = Console(file=buffer, width=180)
    console.print(table)
    for model, info in (extra or {}).items():
        line = f"{model}: generators best first: {', '.join(info['order'])}"
        if "spearman" in info:
            line += f"; Spearman {info['spearman']:.3f}, Kendall {info['kendall']:.3f} vs human"
        console.print(line)
    return buffer.getvalue()


@click.command("eval", help="Evaluate reward models against human judgements.\n\n" + DATA_HELP)
@click.option("--model", "-m", "models", multiple=True, required=True, help="Registry name or checkpoint (repeatable).")
@click.option("--checkpoint", "checkpoints", multiple=True, help="Weights for the --model at the same position.")
@click.option("--data", "-d", required=True, help="KIND:PATH (see above).")
@click.option("--image-root", type=click.Path(file_okay=False), help="Folder the dataset's image paths are relative to.")
@click.option("--allow-outside-root", is_flag=True,
              help="Allow image paths that leave the data folder (../, absolute paths). Off by default: data files "
                   "are untrusted and the report embeds the images it shows.")
@click.option("--split", default="test", show_default=True, help="Split for hf: datasets.")
@click.option("--prompts", "prompts_file", type=click.Path(exists=True, dir_okay=False),
              help="benchmark-prompts.json for generators: data.")
@click.option("--human-ranking", type=click.Path(exists=True, dir_okay=False),
              help="JSON {generator: rank} (1 = best) to correlate the generator ranking with.")
@click.option("--report", type=click.Path(dir_okay=False), help="Write an HTML report here.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), help="Write all metrics as JSON here.")
@click.option("--cache", type=click.Path(dir_okay=False), help="Score cache (default ~/.cache/rewardlab/scores.sqlite).")
@click.option("--no-cache", is_flag=True, help="Score everything afresh and store nothing.")
@click.option("--batch-size", "-b", type=int, default=None)
@click.option("--device", default=None)
@click.option("--dtype", type=click.Choice(["fp32", "bf16", "fp16"]), default=None)
@click.option("--no-progress", is_flag=True)
@ray_options
def eval_command(models, checkpoints, data, image_root, allow_outside_root, split, prompts_file, human_ranking, report,
                 json_out, cache, no_cache, batch_size, device, dtype, no_progress, use_ray, ray_address, workers,
                 gpus_per_worker) -> None:
    from .. import load
    from .cache import ScoreCache
    from .metrics import rank_generators
    from .runner import evaluate

    if checkpoints and len(checkpoints) != len(models):
        raise click.UsageError("give one --checkpoint per --model (in the same order), or none")
    if batch_size is not None and batch_size < 1:
        raise click.BadParameter(f"{batch_size} is not a positive integer", param_hint="--batch-size")
    for option, target in (("--report", report), ("--json", json_out)):
        if target:
            check_output_path(target, option)
    check_ray_usage(use_ray, RAY_ONLY, ("cache",))
    generators = None
    if data.startswith("generators:"):
        if not prompts_file:
            raise click.UsageError("generators: data needs --prompts benchmark-prompts.json")
        groups, generators = generator_groups(data.partition(":")[2], prompts_file)
    else:
        groups = load_groups(data, image_root, split, allow_outside_root)
    store = None if no_cache or use_ray else ScoreCache(cache)
    results, extra = [], {}
    human = {str(k): float(v) for k, v in json.loads(Path(human_ranking).read_text()).items()} if human_ranking else None
    integration = load_integration() if use_ray else None
    session = integration.ray_session(ray_address) if integration else contextlib.nullcontext()
    with session:
        for n, name in enumerate(models):
            checkpoint = checkpoints[n] if checkpoints else None
            if integration:
                result = integration.evaluate_on_ray(
                    name, groups, checkpoint=checkpoint, device=device, dtype=dtype, batch_size=batch_size,
                    workers=workers or 1, gpus_per_worker=gpus_per_worker, progress=not no_progress)
            else:
                scorer = load(name, checkpoint=checkpoint, device=device, dtype=dtype)
                result = evaluate(scorer, groups, store, batch_size, progress=not no_progress)
            results.append(result)
            if generators:
                means = {}
                for position, gen in enumerate(generators):
                    values = [s[position] for s in result.scores if not math.isnan(s[position])]
                    means[gen] = sum(values) / len(values) if values else float("nan")
                extra[result.model] = rank_generators(means, human)
            for message in result.errors:
                click.echo(f"error: {for_terminal(message)}", err=True)
    click.echo(_table(results, extra), nl=False)
    if json_out:
        write_json(json_out, _finite_or_none({"data": data, "results": [
            {"model": r.model, "metrics": r.metrics, "by_group_size": {str(k): v for k, v in r.by_group_size.items()},
             "errors": r.errors, "scored_now": r.scored, **({"generators": extra[r.model]} if r.model in extra else {})}
            for r in results]}))
    if report:
        from .report import write_report

        write_report(report, results, groups, extra=extra or None,
                     allowed_roots=_report_roots(data, image_root, allow_outside_root))
        click.echo(f"report written to {report}")
    if store:
        store.close()
    if any(r.errors for r in results):
        sys.exit(1)
