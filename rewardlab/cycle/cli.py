"""`rewardlab cycle t2i2t | i2t2i | pairs`."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import click


def _progress(total: int, label: str):
    from ..scoring.scorer import progress_callback

    return progress_callback(total, True, unit="input", desc=label)


def _summary(stats, counts) -> str:
    dropped = ", ".join(f"{k}: {v}" for k, v in sorted(stats.dropped.items())) or "none"
    return (f"inputs {stats.inputs}, candidates {stats.candidates}, pairs kept {stats.kept} "
            f"(train {counts['train']}, valid {counts['valid']}, test {counts['test']}); dropped: {dropped}")


def _shard(value: str | None) -> tuple[int, int] | None:
    if not value:
        return None
    try:
        index, count = (int(x) for x in value.split("/"))
    except ValueError:
        raise click.BadParameter(f"expected INDEX/COUNT such as 0/4, got {value!r}", param_hint="--shard") from None
    return index, count


def _seeds(value: str) -> list[int]:
    try:
        return [int(x) for x in value.split(",")]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers such as 0,1,2, got {value!r}",
                                 param_hint="--seeds") from None


@contextmanager
def _user_errors():
    """Bad inputs, manifests or options end the command with their message, not a traceback."""
    from ..errors import DataError

    try:
        yield
    except FileNotFoundError as exc:  # rewardlab errors reach the CLI group, which prints them as one line
        raise DataError(str(exc)) from None


def _read(path: str, kind: str):
    from .pipeline import read_inputs

    with _user_errors():
        return read_inputs(path, kind)


def _pair_options(func):
    func = click.option("--margin", type=float, default=0.005, show_default=True,
                        help="Drop pairs whose scores differ by less.")(func)
    func = click.option("--floor", type=float, default=None,
                        help="Quality floor of the preferred candidate (default: SBERT ≥ 0.4 for t2i2t, DreamSim ≤ 0.7 "
                             "for i2t2i).")(func)
    func = click.option("--format", "formats", type=click.Choice(["jsonl", "parquet"]), multiple=True,
                        help="Pair file format, repeatable (default jsonl).")(func)
    return click.option("--split-seed", type=int, default=0, show_default=True,
                        help="Seed of the train/valid/test assignment (90/5/5 % of inputs, hashed by input id).")(func)


def _errors(manifest) -> str:
    if not manifest.errors:
        return ""
    first = manifest.errors[0]
    return (f"; {len(manifest.errors)} input(s) could not be read and were skipped (listed in "
            f"{manifest.path.parent / manifest.path.name.replace('manifest', 'errors', 1)}; first: {first['error']})")


@click.group("cycle")
def cycle_group() -> None:
    """Build preference pairs by cycle consistency (CycleReward's recipe), resumably."""


@cycle_group.command("t2i2t")
@click.option("--prompts", required=True, type=click.Path(exists=True), help="Text file (one prompt a line) or JSONL.")
@click.option("--generator", "generators", multiple=True, required=True, help="diffusers:<repo or folder> (repeatable).")
@click.option("--captioner", required=True, help="hf:<repo or folder> or vllm:<repo>.")
@click.option("--seeds", default="0", show_default=True, help="Comma-separated seeds per generator.")
@click.option("--steps", type=int, default=28, show_default=True)
@click.option("--guidance", type=float, default=7.0, show_default=True)
@click.option("--device", default=None)
@click.option("--batch-size", type=int, default=1, show_default=True, help="Prompts per model call.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False))
@click.option("--shard", help="INDEX/COUNT: run every COUNT-th input from INDEX (one process or machine per shard); "
                              "pairs are built once all shards' manifests are in --out (`rewardlab cycle pairs`).")
@_pair_options
def t2i2t_command(prompts, generators, captioner, seeds, steps, guidance, device, batch_size, out_dir, shard, margin,
                  floor, formats, split_seed):
    """Text → image (several generators and seeds) → caption, scored by SBERT cosine to the prompt."""
    from .models import resolve_captioner, resolve_generator
    from .pairs import PairRules
    from .pipeline import export_pairs, run_t2i2t
    from .similarity import SbertSimilarity

    inputs = _read(prompts, "t2i2t")
    seed_list = _seeds(seeds)
    gens = [resolve_generator(g, steps=steps, guidance=guidance, device=device) for g in generators]
    tick = _progress(len(inputs), "t2i2t")
    with _user_errors():
        manifest = run_t2i2t(inputs, gens, resolve_captioner(captioner, device=device), SbertSimilarity(device=device),
                             seed_list, out_dir, tick, _shard(shard), batch_size)
    if shard:
        click.echo(f"shard {shard} done; build pairs with `rewardlab cycle pairs --manifest {out_dir} ...`")
        return
    with _user_errors():
        stats, counts = export_pairs(out_dir, Path(out_dir),
                                     PairRules(True, margin, 0.4 if floor is None else floor), split_seed,
                                     formats or ("jsonl",))
    click.echo(_summary(stats, counts) + _errors(manifest))


@cycle_group.command("i2t2i")
@click.option("--images", required=True, type=click.Path(exists=True), help="Folder of images or JSONL with image paths.")
@click.option("--captioner", "captioners", multiple=True, required=True, help="hf:<repo> or vllm:<repo> (repeatable).")
@click.option("--generator", required=True, help="diffusers:<repo or folder> (SD3 in the paper).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--steps", type=int, default=28, show_default=True)
@click.option("--guidance", type=float, default=7.0, show_default=True)
@click.option("--metric", type=click.Choice(["dreamsim", "ssim"]), default="dreamsim", show_default=True,
              help="Image distance; dreamsim falls back to 1-SSIM when unavailable.")
@click.option("--device", default=None)
@click.option("--batch-size", type=int, default=1, show_default=True, help="Images per model call.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False))
@click.option("--shard", help="INDEX/COUNT: run every COUNT-th input from INDEX (see t2i2t --help).")
@_pair_options
def i2t2i_command(images, captioners, generator, seed, steps, guidance, metric, device, batch_size, out_dir, shard,
                  margin, floor, formats, split_seed):
    """Image → caption (several captioners) → image, scored by DreamSim distance to the input."""
    from .models import resolve_captioner, resolve_generator
    from .pairs import PairRules
    from .pipeline import export_pairs, run_i2t2i
    from .similarity import image_distance

    inputs = _read(images, "i2t2i")
    distance = image_distance(metric, device)
    tick = _progress(len(inputs), "i2t2i")
    with _user_errors():
        manifest = run_i2t2i(inputs, [resolve_captioner(c, device=device) for c in captioners],
                             resolve_generator(generator, steps=steps, guidance=guidance, device=device), distance,
                             seed, out_dir, tick, _shard(shard), batch_size)
    if shard:
        click.echo(f"shard {shard} done{_errors(manifest)}; build pairs with `rewardlab cycle pairs --manifest {out_dir} ...`")
        return
    default_floor = 0.7 if distance.name == "dreamsim" else None
    with _user_errors():
        stats, counts = export_pairs(out_dir, Path(out_dir),
                                     PairRules(False, margin, default_floor if floor is None else floor), split_seed,
                                     formats or ("jsonl",))
    click.echo(_summary(stats, counts) + _errors(manifest))


@cycle_group.command("pairs")
@click.option("--manifest", required=True, type=click.Path(exists=True),
              help="A manifest file, or a run folder (all its shard manifests are read).")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False))
@_pair_options
def pairs_command(manifest, out_dir, margin, floor, formats, split_seed):
    """(Re)build pair files from a finished or partial manifest with other rules."""
    from .pairs import PairRules
    from .pipeline import Manifest, export_pairs, manifest_files

    with _user_errors():
        rows = [row for f in manifest_files(manifest) for row in Manifest(f).rows.values()]
    if not rows:
        raise click.ClickException(f"{manifest} holds no finished items yet")
    first = rows[0]
    higher = first["kind"] == "t2i2t"
    if floor is None:
        floor = 0.4 if higher else (0.7 if first["metric"] == "dreamsim" else None)
    with _user_errors():
        stats, counts = export_pairs(manifest, out_dir, PairRules(higher, margin, floor), split_seed,
                                     formats or ("jsonl",))
    click.echo(_summary(stats, counts))
