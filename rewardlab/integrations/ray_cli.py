"""The ``--ray`` options of ``rewardlab score`` and ``rewardlab eval`` (click only; Ray is imported when used)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from types import ModuleType

import click
from click.core import ParameterSource

from ..errors import UsageError
from ..io.safe_text import for_terminal

RAY_ONLY = ("ray_address", "workers", "gpus_per_worker")
MANIFEST_ONLY = ("manifest", "shard_rows")


def ray_options(func: Callable) -> Callable:
    """``--ray``, ``--ray-address``, ``--workers``, ``--gpus-per-worker``."""
    options = [
        click.option("--ray", "use_ray", is_flag=True,
                     help="Run on Ray: a local instance, or the cluster given by --ray-address."),
        click.option("--ray-address", default=None,
                     help="With --ray: 'auto' (the cluster this machine belongs to) or HOST:PORT of its head."),
        click.option("--workers", type=click.IntRange(min=1), default=None,
                     help="With --ray: number of actors, each holding one model (default 1)."),
        click.option("--gpus-per-worker", type=click.FloatRange(min=0), default=None,
                     help="With --ray: GPUs per actor (default: 1 if the cluster has GPUs, else 0)."),
    ]
    return _apply(options, func)


def manifest_options(func: Callable) -> Callable:
    """``--manifest`` and ``--shard-rows`` of ``rewardlab score --ray``."""
    options = [
        click.option("--manifest", type=click.Path(dir_okay=False), default=None,
                     help="With --ray: JSONL or Parquet of (prompt, image) rows; image = path relative to the "
                          "manifest's folder, or encoded bytes (Parquet). --output is then a folder."),
        click.option("--shard-rows", type=click.IntRange(min=1), default=None,
                     help="With --ray: rows per output Parquet shard, the unit of resuming (default 1024)."),
    ]
    return _apply(options, func)


def _apply(options: list[Callable], func: Callable) -> Callable:
    """Decorate ``func`` with click ``options`` so they show in the listed order."""
    for option in reversed(options):
        func = option(func)
    return func


def _given(name: str) -> bool:
    ctx = click.get_current_context()
    return ctx.get_parameter_source(name) not in (None, ParameterSource.DEFAULT)


def check_ray_usage(use_ray: bool, names: tuple[str, ...], forbidden_with_ray: tuple[str, ...] = ()) -> None:
    """Options that need --ray without it, or options --ray does not support with it, are usage errors."""
    flag = {n: "--" + n.replace("_", "-") for n in names + forbidden_with_ray}
    if not use_ray:
        stray = [flag[n] for n in names if _given(n)]
        if stray:
            raise click.UsageError(f"{', '.join(stray)} only apply with --ray")
        return
    clash = [flag[n] for n in forbidden_with_ray if _given(n)]
    if clash:
        raise click.UsageError(f"{', '.join(clash)} cannot be used with --ray")


def load_integration() -> ModuleType:
    try:
        from . import ray as integration
    except ImportError:
        raise UsageError("--ray needs Ray Data, which is not installed", "pip install 'rewardlab[ray]'") from None
    return integration


def run_score(use_ray: bool, ray_address: str | None, workers: int | None, gpus_per_worker: float | None,
              manifest: str | None, shard_rows: int | None, images: tuple[str, ...], prompt: str | None,
              prompts_file: str | None, model: str, checkpoint: str | None, batch_size: int | None,
              device: str | None, dtype: str | None, output: str | None, no_progress: bool,
              allow_outside_root: bool = False, **_unused) -> None:
    """``rewardlab score --ray --manifest FILE --output DIR``: Parquet shards, resumable."""
    check_ray_usage(use_ray, RAY_ONLY + MANIFEST_ONLY,
                    ("prompt", "prompts_file", "fmt", "min_score", "top_k", "write_metadata", "report"))
    if images:
        raise click.UsageError("with --ray, list the images in --manifest, not as arguments")
    if not manifest or not output:
        raise click.UsageError("--ray needs --manifest FILE.jsonl|FILE.parquet and --output DIR")
    integration = load_integration()
    result = integration.score_manifest(
        manifest, output, model, checkpoint=checkpoint, device=device, dtype=dtype, batch_size=batch_size,
        workers=workers or 1, gpus_per_worker=gpus_per_worker, address=ray_address,
        shard_rows=shard_rows or integration.DEFAULT_SHARD_ROWS, progress=not no_progress,
        allow_outside=allow_outside_root)
    for message in result.first_errors:
        click.echo(f"error: {for_terminal(message)}", err=True)
    if result.errors > len(result.first_errors):
        click.echo(f"... and {result.errors - len(result.first_errors)} more (see the error column)", err=True)
    click.echo(f"{result.rows} rows in {result.shards} shards ({result.shards_scored} scored now, "
               f"{result.shards - result.shards_scored} already done) -> {for_terminal(result.output)}")
    if result.errors:
        click.echo(f"{result.errors} of {result.rows} rows could not be scored", err=True)
        sys.exit(1)
