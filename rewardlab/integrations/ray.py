"""Scoring and evaluation on Ray Data: one model per actor, per-row errors, resumable Parquet shards.

Three entry points, all scoring through :meth:`rewardlab.Scorer.score_detailed` (its decoding, batching
and per-item errors; nothing is re-implemented here):

- :class:`ScoreBatch` / :func:`score_dataset`: a callable class for ``Dataset.map_batches`` that adds
  ``score`` and ``error`` columns to any Ray dataset of (prompt, image) rows.
- :func:`score_manifest`: a JSONL or Parquet manifest -> a folder of Parquet shards, resumable
  (``rewardlab score --ray``).
- :func:`evaluate_on_ray`: groups of candidates scored on actors, metric accumulators merged on the
  driver (``rewardlab eval --ray``).

Needs ``pip install 'rewardlab[ray]'``; nothing else in rewardlab imports this module.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import pickle
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

try:
    import ray
    import ray.data
except ImportError as exc:  # pragma: no cover - depends on the installation
    raise ImportError("rewardlab.integrations.ray needs Ray Data: pip install 'rewardlab[ray]'") from exc

from ..errors import DataError, RewardLabError, UsageError
from ..io.atomic import atomic_write, write_json
from ..io.records import resolve_image

logger = logging.getLogger(__name__)

SHARD_NAME = "part-{:06d}.parquet"
JOB_FILE = "_job.json"
DEFAULT_SHARD_ROWS = 1024  # a shard's rows are in one actor's memory at once (image bytes too)
MANIFEST_SUFFIXES = (".jsonl", ".parquet")
_JOB_VERSION = 1
_MODEL_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")


# -- Ray instance ---------------------------------------------------------------------------------------

def _package_root() -> str:
    """The folder holding the ``rewardlab`` package this process imported."""
    return str(Path(__file__).resolve().parents[2])


def start_local(num_cpus: int | None = None, num_gpus: int | None = None, **init_kwargs: Any) -> None:
    """Start a local Ray instance whose workers import the same ``rewardlab`` as this process."""
    pythonpath = os.pathsep.join(p for p in (_package_root(), os.environ.get("PYTHONPATH")) if p)
    runtime_env = init_kwargs.pop("runtime_env", None) or {}
    runtime_env.setdefault("env_vars", {}).setdefault("PYTHONPATH", pythonpath)
    ray.init(num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False, runtime_env=runtime_env,
             **init_kwargs)


@contextlib.contextmanager
def ray_session(address: str | None = None, num_cpus: int | None = None) -> Iterator[None]:
    """Use the Ray instance this process is already connected to; else connect to ``address``
    (``auto`` or ``HOST:PORT`` of a running cluster), or start a local instance when it is None.
    A connection or instance opened here is shut down on exit."""
    if ray.is_initialized():
        if address:
            logger.warning("already connected to Ray; --ray-address %s is not used", address)
        yield
        return
    try:
        if address:
            ray.init(address=address, include_dashboard=False)
        else:
            start_local(num_cpus=num_cpus)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        where = f"the Ray cluster at {address}" if address else "a local Ray instance"
        raise UsageError(f"cannot connect to {where} ({type(exc).__name__}: {exc})",
                         "start the cluster with `ray start --head` on the head node, or leave out "
                         "--ray-address to use a local instance") from None
    try:
        yield
    finally:
        ray.shutdown()


def cluster_has_gpus() -> bool:
    return ray.cluster_resources().get("GPU", 0) > 0


# -- one row of untrusted input -------------------------------------------------------------------------

def image_input(value: Any, base_dir: str | os.PathLike | None = None, allow_outside: bool = False
                ) -> tuple[Any, str | None]:
    """A dataset or manifest cell as a Scorer image input, or (None, reason) when it is not one.

    Accepts a path (relative paths are resolved against ``base_dir``), encoded bytes, a uint8 array, or
    a Hugging Face ``Image`` struct ``{"bytes": ..., "path": ...}``. With a ``base_dir`` (a manifest's
    folder), paths leaving it are refused unless ``allow_outside``.
    """
    if isinstance(value, dict):
        if value.get("bytes"):
            value = value["bytes"]
        elif value.get("path"):
            value = value["path"]
        else:
            return None, "image struct has neither bytes nor path"
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None, "no image (missing or null)"
    if isinstance(value, str):
        if not value.strip():
            return None, "empty image path"
        if base_dir is not None:
            try:
                return resolve_image(value, base_dir, allow_outside, "image"), None
            except RewardLabError as exc:
                return None, exc.message.removeprefix("image: ")
        return value, None
    if isinstance(value, (bytes, bytearray, memoryview)):
        return (bytes(value), None) if len(value) else (None, "empty image bytes")
    if isinstance(value, np.ndarray) and value.dtype != object:
        return (value, None) if value.size else (None, "empty image array")
    return None, f"image is {type(value).__name__}, not a path, encoded bytes or an array"


def prompt_problem(value: Any) -> str | None:
    if isinstance(value, str):
        return None
    if value is None:
        return "no prompt (missing or null)"
    return f"prompt is {type(value).__name__}, not a string"


def score_rows(scorer, prompts: Sequence[Any], images: Sequence[Any], names: Sequence[str] | None,
               batch_size: int | None = None, base_dir: str | os.PathLike | None = None,
               known_errors: Sequence[str | None] | None = None, allow_outside: bool = False
               ) -> tuple[list[float | None], list[str | None]]:
    """Validate and score rows; returns (score or None, error or None) per row, in order.

    A row whose prompt or image is invalid (or that has an entry in ``known_errors``) keeps its slot in
    the batch as an unreadable image, so the valid rows are batched exactly as
    ``Scorer.score_detailed`` batches the same list. Errors start with the row's name (without
    ``names``: image errors name the image, others the row's place in the list); non-finite scores are
    errors.
    """
    def named(i: int, message: str, from_scorer: bool = False) -> str:
        if names is not None:
            return f"{names[i]}: {message}"
        return message if from_scorer else f"row {i} of the batch: {message}"

    count = len(prompts)
    errors: list[str | None] = list(known_errors) if known_errors is not None else [None] * count
    run_prompts: list[str] = []
    run_images: list[Any] = []
    for i in range(count):
        image, reason = image_input(images[i], base_dir, allow_outside)
        if errors[i] is None:
            reason = prompt_problem(prompts[i]) or reason
            if reason:
                errors[i] = named(i, reason)
        valid = errors[i] is None
        run_prompts.append(prompts[i] if valid else "")
        run_images.append(image if valid else None)  # None fails to load: the slot stays, nothing is run
    result = scorer.score_detailed(run_prompts, run_images, batch_size=batch_size)
    scores: list[float | None] = [None] * count
    for i, value in enumerate(result.scores):
        if errors[i] is not None:
            continue
        if i in result.errors:
            errors[i] = named(i, result.errors[i], from_scorer=True)
        elif not math.isfinite(value):
            errors[i] = named(i, f"the model returned a non-finite score ({value})")
        else:
            scores[i] = float(value)
    return scores, errors


def _cells(column: Any) -> list[Any]:
    """A batch column as a list of Python cells (tensor columns become one array per row)."""
    if isinstance(column, np.ndarray) and column.ndim >= 2:
        return list(column)
    return list(column.tolist()) if hasattr(column, "tolist") else list(column)


# -- map_batches over any dataset -----------------------------------------------------------------------

class ScoreBatch:
    """Callable class for ``Dataset.map_batches``: the model is loaded once per actor, each batch of
    (prompt, image) rows gets a ``score`` column (float, null where the row failed) and an ``error``
    column (null where it was scored). Other columns pass through.

        ds.map_batches(ScoreBatch, fn_constructor_kwargs={"model": "imagereward-v1.0"},
                       batch_size=64, num_gpus=1, concurrency=8)

    Images may be paths (relative ones resolved against ``base_dir``), encoded bytes, uint8 HWC arrays
    (as ``ray.data.read_images`` makes), or ``{"bytes", "path"}`` structs. ``batch_size`` is the model's
    forward batch (default: the Ray batch, one forward pass per Ray batch). ``id_column`` names rows in
    error messages (default: the image path or the row's place in the batch).
    """

    def __init__(self, model: str, checkpoint: str | None = None, device: str | None = None,
                 dtype: str | None = None, prompt_column: str = "prompt", image_column: str = "image",
                 batch_size: int | None = None, id_column: str | None = None, base_dir: str | None = None,
                 drop_image: bool = False, threads: int | None = None):
        if threads:
            import torch

            torch.set_num_threads(threads)
        from .. import load

        self.scorer = None
        self.load_error: RewardLabError | None = None
        try:
            self.scorer = load(model, checkpoint=checkpoint, device=device, dtype=dtype)
        except RewardLabError as exc:  # raised from the first call: Ray keeps a task's error, not an actor's
            self.load_error = exc
        self.prompt_column, self.image_column, self.id_column = prompt_column, image_column, id_column
        self.batch_size, self.base_dir, self.drop_image = batch_size, base_dir, drop_image

    def _column(self, batch: Any, name: str) -> list[Any]:
        try:
            return _cells(batch[name])
        except KeyError:
            columns = ", ".join(map(str, batch.keys() if isinstance(batch, dict) else batch.columns))
            raise DataError(f"the dataset has no column {name!r} (has: {columns})",
                            "pass prompt_column=/image_column= naming its columns") from None

    def loaded(self):
        """The scorer, or the error that loading it raised."""
        if self.load_error is not None:
            raise self.load_error
        return self.scorer

    def __call__(self, batch: Any) -> Any:
        scorer = self.loaded()
        prompts = self._column(batch, self.prompt_column)
        images = self._column(batch, self.image_column)
        names = None
        if self.id_column:
            names = [f"{self.id_column} {value}" for value in self._column(batch, self.id_column)]
        scores, errors = score_rows(scorer, prompts, images, names, self.batch_size or len(prompts), self.base_dir)
        if isinstance(batch, dict):
            out = {k: v for k, v in batch.items() if not (self.drop_image and k == self.image_column)}
            out["score"] = np.array(scores, dtype=object)
            out["error"] = np.array(errors, dtype=object)
            return out
        out = batch.drop(columns=[self.image_column]) if self.drop_image else batch.copy()  # pandas
        return out.assign(score=scores, error=errors)


def default_batch_size(num_gpus: float) -> int:
    return 64 if num_gpus else 16


def score_dataset(ds: ray.data.Dataset, model: str, *, checkpoint: str | None = None,
                  prompt_column: str = "prompt", image_column: str = "image", batch_size: int | None = None,
                  num_gpus: float = 0, num_cpus: float = 1, concurrency: int | tuple[int, int] = 1,
                  device: str | None = None, dtype: str | None = None, id_column: str | None = None,
                  base_dir: str | None = None, drop_image: bool = False) -> ray.data.Dataset:
    """``ds`` with ``score`` and ``error`` columns, scored by ``concurrency`` actors holding one model each.

    ``batch_size`` rows go through the model in one forward pass (default 64 with GPUs, 16 on CPU);
    ``num_gpus=1`` gives each actor a GPU. Lazy, like every Ray dataset: write or iterate it.
    """
    batch_size = batch_size or default_batch_size(num_gpus)
    if batch_size < 1:
        raise UsageError(f"batch_size must be at least 1, got {batch_size}")
    kwargs = {"model": model, "checkpoint": checkpoint, "device": device, "dtype": dtype,
              "prompt_column": prompt_column, "image_column": image_column, "batch_size": batch_size,
              "id_column": id_column, "base_dir": base_dir, "drop_image": drop_image,
              "threads": max(1, int(num_cpus))}
    return ds.map_batches(ScoreBatch, fn_constructor_kwargs=kwargs, batch_size=batch_size, batch_format="numpy",
                          num_gpus=num_gpus or None, num_cpus=num_cpus, compute=actor_pool(concurrency))


def actor_pool(concurrency: int | tuple[int, int]) -> ray.data.ActorPoolStrategy:
    """A fixed pool of ``concurrency`` actors, or an autoscaling one for a (min, max) pair."""
    if isinstance(concurrency, tuple):
        low, high = concurrency
        if not 1 <= low <= high:
            raise UsageError(f"concurrency {concurrency} must be (min, max) with 1 <= min <= max")
        return ray.data.ActorPoolStrategy(min_size=low, max_size=high)
    if concurrency < 1:
        raise UsageError(f"concurrency must be at least 1, got {concurrency}")
    return ray.data.ActorPoolStrategy(size=concurrency)


FATAL_COLUMN = "rewardlab_fatal"


def _fatal(error: RewardLabError) -> dict[str, np.ndarray]:
    """A one-row batch carrying an actor's error to the driver, which raises it (a raised error would
    reach the driver as Ray's wrapper holding only its text)."""
    return {FATAL_COLUMN: np.array([pickle.dumps(error)], dtype=object)}


def _raise_if_fatal(columns: Sequence[str], values: Any) -> None:
    if FATAL_COLUMN in columns:
        raise pickle.loads(values[0])


# -- manifests: planning and reading shards -------------------------------------------------------------

@dataclass(frozen=True)
class Shard:
    """Rows ``first_row .. first_row + rows - 1`` of the manifest. For JSONL, ``start``/``stop`` are byte
    offsets and ``first_line`` the 1-based line of the first row; for Parquet, row indices."""

    index: int
    first_row: int
    rows: int
    start: int
    stop: int
    first_line: int = 0


def _check_manifest(manifest: Path) -> None:
    if manifest.suffix.lower() not in MANIFEST_SUFFIXES:
        raise UsageError(f"manifest {manifest} is neither .jsonl nor .parquet",
                         "write one {\"prompt\": ..., \"image\": ...} object per line (.jsonl) or a Parquet "
                         "file with prompt and image columns")
    if not manifest.is_file():
        raise UsageError(f"manifest {manifest} does not exist or is not a file")


def plan_shards(manifest: str | os.PathLike, shard_rows: int = DEFAULT_SHARD_ROWS,
                prompt_column: str = "prompt", image_column: str = "image") -> list[Shard]:
    """Split a manifest into shards of ``shard_rows`` rows, reading only line offsets or Parquet metadata."""
    manifest = Path(manifest)
    _check_manifest(manifest)
    if shard_rows < 1:
        raise UsageError(f"shard size must be at least 1 row, got {shard_rows}")
    shards: list[Shard] = []
    if manifest.suffix.lower() == ".parquet":
        import pyarrow.parquet as pq

        try:
            handle = pq.ParquetFile(manifest)
        except Exception as exc:
            raise DataError(f"{manifest}: not a readable Parquet file ({type(exc).__name__}: {exc})") from None
        names = handle.schema_arrow.names
        missing = [c for c in (prompt_column, image_column) if c not in names]
        if missing:
            raise DataError(f"{manifest}: no column {', '.join(map(repr, missing))} (has: {', '.join(names)})",
                            "name the columns with --prompt-column/--image-column")
        total = handle.metadata.num_rows
        for index, start in enumerate(range(0, total, shard_rows)):
            stop = min(start + shard_rows, total)
            shards.append(Shard(index, start, stop - start, start, stop))
    else:
        starts: list[tuple[int, int, int]] = []  # (row, byte offset, line) of each shard's first row
        rows = offset = 0
        with open(manifest, "rb") as handle:
            for line_number, line in enumerate(handle, start=1):
                if line.strip():
                    if rows % shard_rows == 0:
                        starts.append((rows, offset, line_number))
                    rows += 1
                offset += len(line)
        for index, (first_row, start, line) in enumerate(starts):
            stop = starts[index + 1][1] if index + 1 < len(starts) else offset
            count = (starts[index + 1][0] if index + 1 < len(starts) else rows) - first_row
            shards.append(Shard(index, first_row, count, start, stop, line))
    if not shards:
        raise DataError(f"{manifest}: no rows")
    return shards


def read_shard(manifest: str | os.PathLike, shard: Shard, prompt_column: str = "prompt",
               image_column: str = "image") -> tuple[list[str], list[Any], list[Any], list[str | None]]:
    """(row names, prompt cells, image cells, errors) of one shard; a malformed row gets an error."""
    manifest = Path(manifest)
    names: list[str] = []
    prompts: list[Any] = []
    images: list[Any] = []
    errors: list[str | None] = []
    if manifest.suffix.lower() == ".parquet":
        import pyarrow.parquet as pq

        handle = pq.ParquetFile(manifest)
        groups, first = [], None
        position = 0
        for g in range(handle.metadata.num_row_groups):
            size = handle.metadata.row_group(g).num_rows
            if position < shard.stop and position + size > shard.start:
                groups.append(g)
                first = position if first is None else first
            position += size
        table = handle.read_row_groups(groups, columns=[prompt_column, image_column])
        table = table.slice(shard.start - (first or 0), shard.rows)
        prompts = table.column(prompt_column).to_pylist()
        images = table.column(image_column).to_pylist()
        names = [f"{manifest} row {shard.first_row + i}" for i in range(shard.rows)]
        errors = [None] * shard.rows
        return names, prompts, images, errors
    import json

    with open(manifest, "rb") as handle:
        handle.seek(shard.start)
        data = handle.read(shard.stop - shard.start)
    line_number = shard.first_line
    for raw in data.split(b"\n"):
        if raw.strip():
            name = f"{manifest} line {line_number}"
            prompt = image = error = None
            try:
                record = json.loads(raw.decode("utf-8"))
                if isinstance(record, dict):
                    prompt, image = record.get(prompt_column), record.get(image_column)
                else:
                    error = f"{name}: expected a JSON object, got {type(record).__name__}"
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                error = f"{name}: not valid JSON ({exc})"
            names.append(name)
            prompts.append(prompt)
            images.append(image)
            errors.append(error)
        line_number += 1
    if len(names) != shard.rows:
        raise DataError(f"{manifest} changed while it was being scored: shard {shard.index} has {len(names)} "
                        f"rows, planned {shard.rows}", "leave the manifest unchanged during a job")
    return names, prompts, images, errors


def _text_or_none(value: Any) -> str | None:
    if isinstance(value, dict):
        value = value.get("path")
    return value if isinstance(value, str) else None


class ShardScorer:
    """Actor for :func:`score_manifest`: each call reads whole manifest shards and scores them."""

    def __init__(self, manifest: str, model: str, checkpoint: str | None, device: str | None, dtype: str | None,
                 batch_size: int, prompt_column: str, image_column: str, threads: int | None = None,
                 allow_outside: bool = False):
        self.model = ScoreBatch(model, checkpoint, device, dtype, threads=threads)
        self.manifest, self.batch_size, self.allow_outside = manifest, batch_size, allow_outside
        self.prompt_column, self.image_column = prompt_column, image_column

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.model.load_error is not None:
            return _fatal(self.model.load_error)
        scorer = self.model.scorer
        out: dict[str, list] = {"shard": [], "row": [], "prompt": [], "image": [], "score": [], "error": []}
        for values in zip(*(batch[f] for f in Shard.__dataclass_fields__), strict=True):
            shard = Shard(*(int(v) for v in values))
            try:
                names, prompts, images, known = read_shard(self.manifest, shard, self.prompt_column,
                                                           self.image_column)
            except RewardLabError as exc:
                return _fatal(exc)
            scores, errors = score_rows(scorer, prompts, images, names, self.batch_size, Path(self.manifest).parent,
                                        known, self.allow_outside)
            out["shard"] += [shard.index] * shard.rows
            out["row"] += list(range(shard.first_row, shard.first_row + shard.rows))
            out["prompt"] += [p if isinstance(p, str) else None for p in prompts]
            out["image"] += [_text_or_none(image) for image in images]
            out["score"] += scores
            out["error"] += errors
        return {k: np.array(v, dtype=np.int64 if k in ("shard", "row") else object) for k, v in out.items()}


# -- manifests: the resumable job -----------------------------------------------------------------------

def _shard_schema():
    import pyarrow as pa

    return pa.schema([("row", pa.int64()), ("prompt", pa.string()), ("image", pa.string()),
                      ("score", pa.float64()), ("error", pa.string())])


def shard_done(path: Path, shard: Shard) -> bool:
    """Whether ``path`` is a complete shard file; a damaged one is removed so that it is redone."""
    if not path.is_file():
        return False
    import pyarrow.parquet as pq

    try:
        handle = pq.ParquetFile(path)
        if handle.metadata.num_rows == shard.rows and handle.schema_arrow.names == _shard_schema().names:
            return True
        reason = f"{handle.metadata.num_rows} rows, expected {shard.rows}"
    except Exception as exc:
        reason = f"{type(exc).__name__}: {exc}"
    logger.warning("%s is damaged (%s); scoring that shard again", path, reason)
    path.unlink()
    return False


def write_shard(path: Path, shard: Shard, pieces: list) -> tuple[int, list[str]]:
    """Write one shard's rows (sorted by row) atomically; returns (rows, errors)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = _shard_schema()
    table = pa.concat_tables([p.select(schema.names).cast(schema) for p in pieces]).sort_by("row")
    rows = table.column("row").to_pylist()
    if rows != list(range(shard.first_row, shard.first_row + shard.rows)):
        raise RuntimeError(f"shard {shard.index} came back with rows {rows[:3]}... ({len(rows)} rows), "
                           f"expected {shard.first_row}..{shard.first_row + shard.rows - 1}")
    with atomic_write(path, "wb") as handle:
        pq.write_table(table, handle)
    return len(rows), [e for e in table.column("error").to_pylist() if e]


def _fingerprint(path: Path) -> str:
    """sha256 of a file's size, first and last MiB (cheap for huge manifests, catches edits and swaps)."""
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with open(path, "rb") as handle:
        digest.update(handle.read(1 << 20))
        if size > 1 << 20:
            handle.seek(max(1 << 20, size - (1 << 20)))
            digest.update(handle.read())
    return digest.hexdigest()


def _absolute_if_file(value: str | None) -> str | None:
    return str(Path(value).expanduser().resolve()) if value and Path(value).expanduser().exists() else value


def check_model_argument(model: str, checkpoint: str | None) -> None:
    """Fail before starting any worker when the model name or checkpoint cannot be right."""
    from ..registry import get_spec

    if checkpoint and not Path(checkpoint).is_file():
        raise UsageError(f"checkpoint {checkpoint} does not exist")
    if Path(model).expanduser().is_file():
        return
    if model.endswith(_MODEL_SUFFIXES) or os.sep in model:
        raise UsageError(f"model checkpoint {model} does not exist")
    get_spec(model)  # raises UnknownModelError listing the known names


@dataclass
class ManifestResult:
    output: str
    rows: int
    errors: int
    shards: int
    shards_scored: int  # scored in this run; the others were complete already
    first_errors: list[str]


def _job_record(manifest: Path, shards: list[Shard], shard_rows: int, model: str, checkpoint: str | None,
                dtype: str | None, batch_size: int, prompt_column: str, image_column: str) -> dict:
    return {"version": _JOB_VERSION, "manifest": str(manifest), "manifest_size": manifest.stat().st_size,
            "manifest_fingerprint": _fingerprint(manifest), "rows": sum(s.rows for s in shards),
            "shard_rows": shard_rows, "model": model, "checkpoint": checkpoint, "dtype": dtype,
            "batch_size": batch_size, "prompt_column": prompt_column, "image_column": image_column}


def _start_or_resume(output: Path, job: dict) -> None:
    import json

    record = output / JOB_FILE
    if record.is_file():
        try:
            previous = json.loads(record.read_text())
        except (OSError, json.JSONDecodeError):
            previous = None
        if not isinstance(previous, dict):
            raise UsageError(f"{record} is unreadable", "remove the output folder or choose another")
        changed = [k for k in job if previous.get(k) != job[k]]
        if changed:
            detail = "; ".join(f"{k}: {previous.get(k)!r} then, {job[k]!r} now" for k in changed)
            raise UsageError(f"{output} holds a job with other settings ({detail})",
                             "rerun with the same settings to resume, or use a new --output folder")
        return
    if output.is_dir() and any(output.glob("part-*.parquet")):
        raise UsageError(f"{output} holds shards but no {JOB_FILE}", "use a new --output folder")
    output.mkdir(parents=True, exist_ok=True)
    write_json(record, job)


def score_manifest(manifest: str | os.PathLike, output: str | os.PathLike, model: str, *,
                   checkpoint: str | None = None, device: str | None = None, dtype: str | None = None,
                   batch_size: int | None = None, workers: int = 1, gpus_per_worker: float | None = None,
                   cpus_per_worker: float = 1, shard_rows: int = DEFAULT_SHARD_ROWS, address: str | None = None,
                   prompt_column: str = "prompt", image_column: str = "image", progress: bool = True,
                   max_errors_listed: int = 20, allow_outside: bool = False) -> ManifestResult:
    """Score every (prompt, image) row of a JSONL or Parquet manifest on Ray; resumable.

    Writes ``output/part-NNNNNN.parquet`` (columns row, prompt, image, score, error; ``shard_rows`` rows
    each, in manifest order) atomically, one per shard, and ``output/_job.json``. A rerun with the same
    settings skips complete shards, so a killed job resumes where it stopped. Relative image paths are
    resolved against the manifest's folder. Rows whose prompt or image is invalid, or whose image cannot
    be read, get an ``error`` naming the manifest and row; the others are scored.
    ``gpus_per_worker``: None = 1 when the cluster has GPUs, else 0 (CPU actors).

    With ``shard_rows`` a multiple of ``batch_size`` the model sees the same batches as single-process
    ``Scorer.score_detailed`` on the whole manifest, so the scores are bitwise identical.
    """
    if workers < 1:
        raise UsageError(f"--workers must be at least 1, got {workers}")
    if batch_size is not None and batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {batch_size}")
    manifest = Path(manifest).expanduser().resolve()
    output = Path(output).expanduser().resolve()
    if output.exists() and not output.is_dir():
        raise UsageError(f"--output {output} is a file", "give a folder for the Parquet shards")
    check_model_argument(model, checkpoint)
    model, checkpoint = _absolute_if_file(model), _absolute_if_file(checkpoint)
    shards = plan_shards(manifest, shard_rows, prompt_column, image_column)
    with ray_session(address):
        gpus = (1.0 if cluster_has_gpus() else 0.0) if gpus_per_worker is None else float(gpus_per_worker)
        batch_size = batch_size or default_batch_size(gpus)
        if shard_rows % batch_size:
            logger.info("shard size %d is not a multiple of batch size %d: scores may differ from the "
                        "single-process run by float rounding", shard_rows, batch_size)
        job = _job_record(manifest, shards, shard_rows, model, checkpoint, dtype, batch_size, prompt_column,
                          image_column)
        _start_or_resume(output, job)
        for stale in output.glob(".part-*.tmp"):  # temp files of a killed run
            stale.unlink(missing_ok=True)
        todo = [s for s in shards if not shard_done(output / SHARD_NAME.format(s.index), s)]
        logger.info("%d of %d shards to score", len(todo), len(shards))
        if todo:
            _run_shards(todo, output, manifest, model, checkpoint, device, dtype, batch_size, workers, gpus,
                        cpus_per_worker, prompt_column, image_column, progress, allow_outside)
    return summarize(output, shards, len(todo), max_errors_listed)


def _run_shards(todo: list[Shard], output: Path, manifest: Path, model: str, checkpoint: str | None,
                device: str | None, dtype: str | None, batch_size: int, workers: int, gpus: float,
                cpus: float, prompt_column: str, image_column: str, progress: bool, allow_outside: bool = False) -> None:
    import pyarrow.compute as pc

    ray.data.DataContext.get_current().enable_progress_bars = progress
    by_index = {s.index: s for s in todo}
    pending: dict[int, list] = {s.index: [] for s in todo}
    received = dict.fromkeys(by_index, 0)
    kwargs = {"manifest": str(manifest), "allow_outside": allow_outside, "model": model, "checkpoint": checkpoint,
              "device": device,
              "dtype": dtype, "batch_size": batch_size, "prompt_column": prompt_column,
              "image_column": image_column, "threads": max(1, int(cpus))}
    ds = ray.data.from_items([asdict(s) for s in todo], override_num_blocks=len(todo))
    ds = ds.map_batches(ShardScorer, fn_constructor_kwargs=kwargs, batch_size=1, batch_format="numpy",
                        num_gpus=gpus or None, num_cpus=cpus, compute=actor_pool(min(workers, len(todo))))
    for table in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        if FATAL_COLUMN in table.column_names:
            _raise_if_fatal(table.column_names, table.column(FATAL_COLUMN).to_pylist())
        for index in sorted(set(table.column("shard").to_pylist())):
            piece = table.filter(pc.equal(table.column("shard"), index))
            pending[index].append(piece)
            received[index] += piece.num_rows
            if received[index] == by_index[index].rows:
                write_shard(output / SHARD_NAME.format(index), by_index[index], pending.pop(index))
                logger.info("shard %d written", index)
    if pending:
        raise RuntimeError(f"shards {sorted(pending)} came back incomplete; rerun to score them")


def summarize(output: str | os.PathLike, shards: list[Shard], scored_now: int, max_errors_listed: int = 20
              ) -> ManifestResult:
    """Row and error counts over all shard files of a job."""
    import pyarrow.parquet as pq

    output = Path(output)
    rows = errors = 0
    listed: list[str] = []
    for shard in shards:
        column = pq.read_table(output / SHARD_NAME.format(shard.index), columns=["error"]).column("error")
        rows += len(column)
        found = [e for e in column.to_pylist() if e]
        errors += len(found)
        listed += found[: max(0, max_errors_listed - len(listed))]
    return ManifestResult(str(output), rows, errors, len(shards), scored_now, listed)


def read_scores(output: str | os.PathLike):
    """All rows of a finished job as a pandas DataFrame in manifest order (same as ``pd.read_parquet``)."""
    import pandas as pd

    files = sorted(Path(output).glob("part-*.parquet"))
    if not files:
        raise DataError(f"{output} holds no part-*.parquet shards")
    return pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)


# -- evaluation -----------------------------------------------------------------------------------------

class GroupScorer:
    """Actor for :func:`evaluate_on_ray`: scores chunks of groups and fills metric accumulators."""

    def __init__(self, model: str, checkpoint: str | None, device: str | None, dtype: str | None,
                 batch_size: int | None, ks: tuple[int, ...], threads: int | None = None):
        self.model = ScoreBatch(model, checkpoint, device, dtype, threads=threads)
        self.batch_size, self.ks = batch_size, ks

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from ..eval.runner import accumulate, score_groups

        if self.model.load_error is not None:
            return _fatal(self.model.load_error)
        scorer = self.model.scorer
        payloads = []
        for blob in batch["groups"]:
            groups = pickle.loads(blob)
            scores, errors, scored = score_groups(scorer, groups, None, self.batch_size)
            accuracy, selection = accumulate(groups, scores, errors, self.ks)
            payloads.append(pickle.dumps({"model": scorer.label, "scores": scores, "errors": errors,
                                          "scored": scored, "accuracy": accuracy, "selection": selection}))
        return {"chunk": batch["chunk"], "payload": np.array(payloads, dtype=object)}


def evaluate_on_ray(model: str, groups: list, *, checkpoint: str | None = None, device: str | None = None,
                    dtype: str | None = None, batch_size: int | None = None, workers: int = 1,
                    gpus_per_worker: float | None = None, cpus_per_worker: float = 1, address: str | None = None,
                    groups_per_task: int | None = None, ks: tuple[int, ...] = (1, 2, 4), progress: bool = False):
    """:func:`rewardlab.eval.evaluate` with the groups scored by ``workers`` Ray actors.

    Each task scores a run of consecutive groups and returns its metric accumulators; the driver merges
    them in group order, so the metrics are those of the single-process run on the same scores. (Scores
    agree bitwise when every task's candidates split into the same model batches as in one process,
    e.g. groups of ``batch_size`` candidates; otherwise to float rounding.) No score cache is used.
    """
    from ..eval.metrics import PairwiseAccuracy, RecallFilterAtK
    from ..eval.runner import eval_result

    if workers < 1:
        raise UsageError(f"--workers must be at least 1, got {workers}")
    check_model_argument(model, checkpoint)
    model, checkpoint = _absolute_if_file(model), _absolute_if_file(checkpoint)
    if not groups:
        raise DataError("no groups to evaluate")
    per_task = groups_per_task or max(1, math.ceil(len(groups) / (4 * workers)))
    starts = list(range(0, len(groups), per_task))
    items = [{"chunk": n, "groups": pickle.dumps(groups[s:s + per_task])} for n, s in enumerate(starts)]
    with ray_session(address):
        gpus = (1.0 if cluster_has_gpus() else 0.0) if gpus_per_worker is None else float(gpus_per_worker)
        ray.data.DataContext.get_current().enable_progress_bars = progress
        kwargs = {"model": model, "checkpoint": checkpoint, "device": device, "dtype": dtype,
                  "batch_size": batch_size, "ks": tuple(ks), "threads": max(1, int(cpus_per_worker))}
        ds = ray.data.from_items(items, override_num_blocks=len(items))
        ds = ds.map_batches(GroupScorer, fn_constructor_kwargs=kwargs, batch_size=1, batch_format="numpy",
                            num_gpus=gpus or None, num_cpus=cpus_per_worker,
                            compute=actor_pool(min(workers, len(items))))
        results: dict[int, dict] = {}
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            _raise_if_fatal(list(batch), batch.get(FATAL_COLUMN))
            for chunk, blob in zip(batch["chunk"], batch["payload"], strict=True):
                results[int(chunk)] = pickle.loads(blob)
    if sorted(results) != list(range(len(items))):
        raise RuntimeError(f"{len(items) - len(results)} evaluation tasks returned nothing")
    accuracy, selection = PairwiseAccuracy(), RecallFilterAtK(tuple(ks))
    scores: list[list[float]] = []
    errors: dict[tuple[int, int], str] = {}
    scored = 0
    for n, start in enumerate(starts):
        part = results[n]
        accuracy.merge(part["accuracy"])
        selection.merge(part["selection"])
        scores += part["scores"]
        errors.update({(start + g, c): message for (g, c), message in part["errors"].items()})
        scored += part["scored"]
    return eval_result(results[0]["model"], groups, scores, errors, scored, accuracy, selection)
