"""Resumable cycle runs and the export of their preference pairs (CyclePrefDB layout).

Every finished (input, forward model, seed) is one JSON line of ``manifest.jsonl``, appended and
flushed as soon as it is done; a rerun skips what the manifest holds, so a crash loses at most the item
in flight and never duplicates a row (a torn last line is ignored).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from ..data.pairs import I2T_COLUMNS, T2I_COLUMNS
from ..errors import DataError
from ..io.atomic import atomic_path, write_text
from ..io.records import Record, read_records
from .models import Captioner, Generator
from .pairs import Candidate, PairRules, PairStats, assign_splits, build_pairs


class CycleInputError(DataError):
    """Bad cycle input (file, line or id named in the message)."""


@dataclass
class CycleInput:
    input_id: str
    value: str  # a prompt (T2I2T) or an image path (I2T2I)


def _same_input(kind: str, recorded: str, value: str) -> bool:
    """Prompts must match exactly; images by file name, so a moved data folder still resumes."""
    return recorded == value if kind == "t2i2t" else Path(recorded).name == Path(value).name


class Manifest:
    """Append-only JSONL record of finished work, keyed by (input_id, model, seed)."""

    def __init__(self, path: Path):
        self.path = path
        self.rows: dict[tuple[str, str, int], dict] = {}
        self.errors: list[dict] = []  # inputs this run could not read (see ``errors.jsonl``)
        if path.exists():
            data = path.read_bytes()
            if data and not data.endswith(b"\n"):  # a write torn by a crash: cut it so appends start clean
                with open(path, "r+b") as handle:
                    handle.truncate(data.rfind(b"\n") + 1)
            for line in path.read_text().splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line torn by a crash mid-write: that item is redone
                self.rows[(row["input_id"], row["model"], row["seed"])] = row

    def done(self, input_id: str, model: str, seed: int) -> bool:
        return (input_id, model, seed) in self.rows

    def check_inputs(self, inputs: list[CycleInput], kind: str) -> None:
        """Refuse to resume when an id recorded here now names another input (an edited prompt file
        would otherwise mix old and new results under one id)."""
        recorded = {row["input_id"]: row["input"] for row in self.rows.values()}
        for item in inputs:
            old = recorded.get(item.input_id)
            if old is not None and not _same_input(kind, old, item.value):
                raise CycleInputError(f"{self.path}: input id {item.input_id!r} was {old!r} in this run and is now "
                                      f"{item.value!r}; use a new --out folder or restore the inputs")

    def add(self, row: dict) -> None:
        self.add_many([row])

    def add_many(self, rows: list[dict]) -> None:
        """Append rows not yet recorded, flushed and synced to disk before returning."""
        fresh = [r for r in rows if (r["input_id"], r["model"], r["seed"]) not in self.rows]
        if not fresh:
            return
        with open(self.path, "a") as handle:
            handle.write("".join(json.dumps(r) + "\n" for r in fresh))
            handle.flush()
            os.fsync(handle.fileno())
        for row in fresh:
            self.rows[(row["input_id"], row["model"], row["seed"])] = row

    def record_error(self, input_id: str, value: str, reason: str) -> None:
        """Log an unreadable input to ``errors*.jsonl`` beside the manifest (``errors-0-of-4.jsonl`` for
        ``manifest-0-of-4.jsonl``); it is not marked done, so a rerun retries it."""
        error = {"input_id": input_id, "input": value, "error": reason}
        self.errors.append(error)
        with open(self.path.parent / self.path.name.replace("manifest", "errors", 1), "a") as handle:
            handle.write(json.dumps(error) + "\n")


def _safe(name: str) -> str:
    return hashlib.sha1(name.encode()).hexdigest()[:10]


def _jsonl_rows(path: Path) -> list[tuple[int, dict]]:
    try:
        return [(record.line, record.row) for record in read_records(path)]
    except DataError as exc:
        raise CycleInputError(exc.message, exc.hint) from None


def _field(path: Path, number: int, row: dict, key: str) -> str:
    try:
        return Record(path, number, row).text(key)
    except DataError as exc:
        raise CycleInputError(exc.message, exc.hint) from None


def _unique(path: Path, items: list[tuple[int, CycleInput]]) -> list[CycleInput]:
    first: dict[str, int] = {}
    for number, item in items:
        if item.input_id in first:
            raise CycleInputError(f"{path}: input id {item.input_id!r} appears twice (lines/entries {first[item.input_id]} "
                                  f"and {number}); ids key the manifest, so they must be unique")
        first[item.input_id] = number
    if not items:
        raise CycleInputError(f"{path}: no inputs found")
    return [item for _, item in items]


def read_inputs(path: str | Path, kind: str) -> list[CycleInput]:
    """Prompts (T2I2T: .txt one per line, id = its index among non-empty lines; or JSONL ``{prompt, id}``)
    or images (I2T2I: a folder, id = path below it without suffix; or JSONL ``{image, id}`` with paths
    relative to the file). Image paths come back absolute. Ids must be unique."""
    path = Path(path)
    if kind not in ("t2i2t", "i2t2i"):
        raise ValueError(f"kind must be 't2i2t' or 'i2t2i', not {kind!r}")
    if kind == "t2i2t":
        if path.suffix == ".jsonl":
            items = [(n, CycleInput(str(r.get("id", k)), _field(path, n, r, "prompt")))
                     for k, (n, r) in enumerate(_jsonl_rows(path))]
        else:
            lines = [(n, line.strip()) for n, line in enumerate(path.read_text().splitlines(), start=1) if line.strip()]
            items = [(n, CycleInput(str(k), line)) for k, (n, line) in enumerate(lines)]
        return _unique(path, items)
    if path.is_dir():
        from ..io.images import expand_paths

        files = [Path(p) for p in expand_paths([str(path)])]
        return _unique(path, [(str(f.relative_to(path)), CycleInput(f.relative_to(path).with_suffix("").as_posix(),
                                                                     str(f.resolve()))) for f in files])
    items = [(n, CycleInput(str(r.get("id", k)), str((path.parent / _field(path, n, r, "image")).resolve())))
             for k, (n, r) in enumerate(_jsonl_rows(path))]
    return _unique(path, items)


def shard_of(inputs: list[CycleInput], shard: tuple[int, int] | None) -> tuple[list[CycleInput], str]:
    """The inputs of shard ``(index, count)`` (every count-th input from index) and its manifest name."""
    if shard is None:
        return inputs, "manifest.jsonl"
    index, count = shard
    if not 0 <= index < count:
        raise ValueError(f"shard index {index} is not in 0..{count - 1}")
    return inputs[index::count], f"manifest-{index}-of-{count}.jsonl"


def _check_names(models: list, role: str) -> None:
    names = [m.name for m in models]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"{role} names must be unique (they key the manifest); repeated: {', '.join(repeated)}")


def _chunks(items: list, size: int) -> list[list]:
    if size < 1:
        raise ValueError(f"batch_size must be at least 1, got {size}")
    return [items[i:i + size] for i in range(0, len(items), size)]


def run_t2i2t(inputs: list[CycleInput], generators: list[Generator], captioner: Captioner, similarity,
              seeds: list[int], out_dir: str | Path, progress: Callable[[int], None] | None = None,
              shard: tuple[int, int] | None = None, batch_size: int = 1) -> Manifest:
    """Text → image (each generator and seed) → caption; score = similarity(prompt, caption).

    Up to ``batch_size`` prompts go through each model call; a generator must make each image from
    (prompt, seed) alone, so results do not depend on batching or on what a resumed run redoes.
    With ``shard=(i, n)`` only every n-th input from i is run, into its own manifest file, so n
    processes or machines can share the work; ``export_pairs`` reads all manifests of a folder."""
    _check_names(generators, "generator")
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    inputs, manifest_name = shard_of(inputs, shard)
    manifest = Manifest(out / manifest_name)
    manifest.check_inputs(inputs, "t2i2t")
    for chunk in _chunks(inputs, batch_size):
        for generator in generators:
            for seed in seeds:
                todo = [item for item in chunk if not manifest.done(item.input_id, generator.name, seed)]
                if not todo:
                    continue
                prompts = [item.value for item in todo]
                images = generator.generate(prompts, seed)
                if len(images) != len(todo):
                    raise RuntimeError(f"generator {generator.name!r} returned {len(images)} images for {len(todo)} prompts")
                captions = captioner.caption(images)
                scores = similarity(prompts, captions)
                rows = []
                for item, image, caption, score in zip(todo, images, captions, scores, strict=True):
                    rel = f"images/{_safe(item.input_id)}_{_safe(generator.name)}_{seed}.png"
                    image.save(out / rel)
                    rows.append({"kind": "t2i2t", "input_id": item.input_id, "input": item.value,
                                 "model": generator.name, "seed": seed, "params": getattr(generator, "params", {}),
                                 "output": rel, "reconstruction": caption, "backward_model": captioner.name,
                                 "backward_params": getattr(captioner, "params", {}), "metric": similarity.name,
                                 "score": float(score)})
                manifest.add_many(rows)
        if progress:
            progress(len(chunk))
    return manifest


def run_i2t2i(inputs: list[CycleInput], captioners: list[Captioner], generator: Generator, distance, seed: int,
              out_dir: str | Path, progress: Callable[[int], None] | None = None,
              shard: tuple[int, int] | None = None, batch_size: int = 1) -> Manifest:
    """Image → caption (each captioner) → image (one generator, fixed seed); score = distance(input, recon).

    An input image that cannot be read is logged to ``errors.jsonl`` (and ``manifest.errors``) and
    skipped; the other inputs are unaffected and a rerun retries it."""
    from ..io.images import ImageLoadError, open_image

    _check_names(captioners, "captioner")
    out = Path(out_dir)
    (out / "reconstructions").mkdir(parents=True, exist_ok=True)
    inputs, manifest_name = shard_of(inputs, shard)
    manifest = Manifest(out / manifest_name)
    manifest.check_inputs(inputs, "i2t2i")
    for chunk in _chunks(inputs, batch_size):
        sources: dict[str, Image.Image] = {}
        for captioner in captioners:
            todo = [item for item in chunk if not manifest.done(item.input_id, captioner.name, seed)]
            for item in todo:
                if item.input_id not in sources and not any(e["input_id"] == item.input_id for e in manifest.errors):
                    try:
                        sources[item.input_id] = open_image(item.value).convert("RGB")
                    except ImageLoadError as exc:
                        manifest.record_error(item.input_id, item.value, str(exc))
            todo = [item for item in todo if item.input_id in sources]
            if not todo:
                continue
            images = [sources[item.input_id] for item in todo]
            captions = captioner.caption(images)
            reconstructions = generator.generate(captions, seed)
            distances = distance(images, reconstructions)
            rows = []
            for item, caption, reconstruction, score in zip(todo, captions, reconstructions, distances, strict=True):
                rel = f"reconstructions/{_safe(item.input_id)}_{_safe(captioner.name)}_{seed}.png"
                reconstruction.save(out / rel)
                rows.append({"kind": "i2t2i", "input_id": item.input_id, "input": item.value, "model": captioner.name,
                             "seed": seed, "params": getattr(captioner, "params", {}), "output": caption,
                             "reconstruction": rel, "backward_model": generator.name,
                             "backward_params": getattr(generator, "params", {}), "metric": distance.name,
                             "score": float(score)})
            manifest.add_many(rows)
        if progress:
            progress(len(chunk))
    return manifest


def manifest_files(path: str | Path) -> list[Path]:
    """A manifest file, or every ``manifest*.jsonl`` of a run folder (the shards of one run)."""
    path = Path(path)
    files = sorted(path.glob("manifest*.jsonl")) if path.is_dir() else [path]
    if not files or not all(f.exists() for f in files):
        raise FileNotFoundError(f"no manifest at {path}")
    return files


PAIR_FORMATS = ("jsonl", "parquet")


def _write_rows(rows: list[dict], path: Path) -> None:
    """Pair rows as Parquet or JSONL, written atomically; non-finite scores are refused by the JSON writer."""
    if path.suffix == ".parquet":
        import pandas as pd

        with atomic_path(path) as tmp:
            pd.DataFrame(rows, columns=list(rows[0]) if rows else ["input_id", "split"]).to_parquet(tmp, index=False)
    else:
        write_text(path, "".join(json.dumps(row, allow_nan=False) + "\n" for row in rows))


def export_pairs(manifest_path: str | Path, out_dir: str | Path, rules: PairRules, seed: int = 0,
                 formats: tuple[str, ...] = ("jsonl",)) -> tuple[PairStats, dict[str, int]]:
    """Write ``{train,valid,test}.jsonl`` (and/or ``.parquet``) pair files, split by input, that
    `rewardlab train` reads. Returns the rule statistics and the pair count per split.

    ``manifest_path`` is one manifest or a run folder whose shard manifests are read together.
    T2I2T rows: prompt, preferred_image, rejected_image; I2T2I rows: image, preferred_text,
    rejected_text; both with preferred_score, rejected_score, preferred_model, rejected_model,
    preferred_seed, rejected_seed, input_id, split, metric. Image paths are relative to ``out_dir``.
    """
    unknown = sorted(set(formats) - set(PAIR_FORMATS))
    if unknown or not formats:
        raise ValueError(f"pair file formats must be among {', '.join(PAIR_FORMATS)}; got {', '.join(formats) or 'none'}")
    files, out = manifest_files(manifest_path), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = [row for f in files for row in Manifest(f).rows.values()]
    if not rows:
        raise CycleInputError(f"{manifest_path} holds no finished items")
    kinds = {row["kind"] for row in rows}
    if len(kinds) > 1:
        raise CycleInputError(f"{manifest_path} mixes {' and '.join(sorted(kinds))} runs; export them separately")
    by_input: dict[str, list[dict]] = {}
    for row in rows:
        by_input.setdefault(row["input_id"], []).append(row)
    splits = assign_splits(list(by_input), seed)
    stats = PairStats()
    written: dict[str, list[dict]] = {"train": [], "valid": [], "test": []}
    base = files[0].parent
    for input_id in sorted(by_input):
        items = by_input[input_id]
        kind = items[0]["kind"]
        candidates = [Candidate(input_id, r["model"], r["seed"], r["output"],
                                float("nan") if r["score"] is None else float(r["score"])) for r in items]
        for good, bad in build_pairs(candidates, rules, stats):
            row = {"input_id": input_id, "split": splits[input_id], "metric": items[0]["metric"],
                   "preferred_score": good.score, "rejected_score": bad.score, "preferred_model": good.model,
                   "rejected_model": bad.model, "preferred_seed": good.seed, "rejected_seed": bad.seed}
            if kind == "t2i2t":
                values = (items[0]["input"], os.path.relpath(base / good.output, out), os.path.relpath(base / bad.output, out))
                row.update(zip(T2I_COLUMNS, values, strict=True))
            else:
                values = (os.path.relpath(Path(items[0]["input"]).resolve(), out.resolve()), good.output, bad.output)
                row.update(zip(I2T_COLUMNS, values, strict=True))
            written[splits[input_id]].append(row)
    for split, split_rows in written.items():
        for fmt in formats:
            _write_rows(split_rows, out / f"{split}.{fmt}")
    return stats, {split: len(split_rows) for split, split_rows in written.items()}
