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

from .models import Captioner, Generator
from .pairs import Candidate, PairRules, PairStats, assign_splits, build_pairs


@dataclass
class CycleInput:
    input_id: str
    value: str  # a prompt (T2I2T) or an image path (I2T2I)


class Manifest:
    """Append-only JSONL record of finished work, keyed by (input_id, model, seed)."""

    def __init__(self, path: Path):
        self.path = path
        self.rows: dict[tuple[str, str, int], dict] = {}
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

    def add(self, row: dict) -> None:
        key = (row["input_id"], row["model"], row["seed"])
        if key in self.rows:
            return
        with open(self.path, "a") as handle:
            handle.write(json.dumps(row) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        self.rows[key] = row


def _safe(name: str) -> str:
    return hashlib.sha1(name.encode()).hexdigest()[:10]


def read_inputs(path: str | Path, kind: str) -> list[CycleInput]:
    """Prompts (T2I2T: .txt one per line, or JSONL with ``prompt``/``id``) or images (I2T2I: a folder,
    or JSONL with ``image``/``id``)."""
    path = Path(path)
    if kind == "t2i2t":
        if path.suffix == ".jsonl":
            rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            return [CycleInput(str(r.get("id", n)), r["prompt"]) for n, r in enumerate(rows)]
        lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        return [CycleInput(str(n), line) for n, line in enumerate(lines)]
    if path.is_dir():
        from ..images import expand_paths

        return [CycleInput(Path(p).stem, p) for p in expand_paths([str(path)])]
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [CycleInput(str(r.get("id", n)), str(path.parent / r["image"])) for n, r in enumerate(rows)]


def shard_of(inputs: list[CycleInput], shard: tuple[int, int] | None) -> tuple[list[CycleInput], str]:
    """The inputs of shard ``(index, count)`` (every count-th input from index) and its manifest name."""
    if shard is None:
        return inputs, "manifest.jsonl"
    index, count = shard
    if not 0 <= index < count:
        raise ValueError(f"shard index {index} is not in 0..{count - 1}")
    return inputs[index::count], f"manifest-{index}-of-{count}.jsonl"


def run_t2i2t(inputs: list[CycleInput], generators: list[Generator], captioner: Captioner, similarity,
              seeds: list[int], out_dir: str | Path, progress: Callable[[int], None] | None = None,
              shard: tuple[int, int] | None = None) -> Manifest:
    """Text → image (each generator and seed) → caption; score = similarity(prompt, caption).

    With ``shard=(i, n)`` only every n-th input from i is run, into its own manifest file, so n
    processes or machines can share the work; ``export_pairs`` reads all manifests of a folder."""
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    inputs, manifest_name = shard_of(inputs, shard)
    manifest = Manifest(out / manifest_name)
    for item in inputs:
        for generator in generators:
            for seed in seeds:
                if manifest.done(item.input_id, generator.name, seed):
                    continue
                image = generator.generate([item.value], seed)[0]
                rel = f"images/{_safe(item.input_id)}_{_safe(generator.name)}_{seed}.png"
                image.save(out / rel)
                caption = captioner.caption([image])[0]
                score = similarity([item.value], [caption])[0]
                manifest.add({"kind": "t2i2t", "input_id": item.input_id, "input": item.value, "model": generator.name,
                              "seed": seed, "params": getattr(generator, "params", {}), "output": rel,
                              "reconstruction": caption, "backward_model": captioner.name, "metric": similarity.name,
                              "score": score})
        if progress:
            progress(1)
    return manifest


def run_i2t2i(inputs: list[CycleInput], captioners: list[Captioner], generator: Generator, distance, seed: int,
              out_dir: str | Path, progress: Callable[[int], None] | None = None,
              shard: tuple[int, int] | None = None) -> Manifest:
    """Image → caption (each captioner) → image (one generator, fixed seed); score = distance(input, recon)."""
    out = Path(out_dir)
    (out / "reconstructions").mkdir(parents=True, exist_ok=True)
    inputs, manifest_name = shard_of(inputs, shard)
    manifest = Manifest(out / manifest_name)
    for item in inputs:
        source = None
        for captioner in captioners:
            if manifest.done(item.input_id, captioner.name, seed):
                continue
            source = source or Image.open(item.value).convert("RGB")
            caption = captioner.caption([source])[0]
            reconstruction = generator.generate([caption], seed)[0]
            rel = f"reconstructions/{_safe(item.input_id)}_{_safe(captioner.name)}_{seed}.png"
            reconstruction.save(out / rel)
            score = distance([source], [reconstruction])[0]
            manifest.add({"kind": "i2t2i", "input_id": item.input_id, "input": item.value, "model": captioner.name,
                          "seed": seed, "params": getattr(captioner, "params", {}), "output": caption,
                          "reconstruction": rel, "backward_model": generator.name,
                          "backward_params": getattr(generator, "params", {}), "metric": distance.name, "score": score})
        if progress:
            progress(1)
    return manifest


def manifest_files(path: str | Path) -> list[Path]:
    """A manifest file, or every ``manifest*.jsonl`` of a run folder (the shards of one run)."""
    path = Path(path)
    files = sorted(path.glob("manifest*.jsonl")) if path.is_dir() else [path]
    if not files or not all(f.exists() for f in files):
        raise FileNotFoundError(f"no manifest at {path}")
    return files


def export_pairs(manifest_path: str | Path, out_dir: str | Path, rules: PairRules, seed: int = 0
                 ) -> tuple[PairStats, dict[str, int]]:
    """Write ``{train,valid,test}.jsonl`` pair files (splits by input) that `rewardlab train` reads.

    ``manifest_path`` is one manifest or a run folder whose shard manifests are read together.

    T2I2T rows: prompt, preferred_image, rejected_image; I2T2I rows: image, preferred_text,
    rejected_text; both with preferred_score, rejected_score, preferred_model, rejected_model,
    preferred_seed, rejected_seed, input_id, split, metric. Image paths are relative to ``out_dir``.
    """
    files, out = manifest_files(manifest_path), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = [row for f in files for row in Manifest(f).rows.values()]
    if not rows:
        raise ValueError(f"{manifest_path} holds no finished items")
    by_input: dict[str, list[dict]] = {}
    for row in rows:
        by_input.setdefault(row["input_id"], []).append(row)
    splits = assign_splits(list(by_input), seed)
    stats = PairStats()
    counts = {"train": 0, "valid": 0, "test": 0}
    handles = {name: open(out / f"{name}.jsonl", "w") for name in counts}  # noqa: SIM115
    base = files[0].parent
    try:
        for input_id in sorted(by_input):
            items = by_input[input_id]
            kind = items[0]["kind"]
            candidates = [Candidate(input_id, r["model"], r["seed"], r["output"], r["score"]) for r in items]
            for good, bad in build_pairs(candidates, rules, stats):
                row = {"input_id": input_id, "split": splits[input_id], "metric": items[0]["metric"],
                       "preferred_score": good.score, "rejected_score": bad.score, "preferred_model": good.model,
                       "rejected_model": bad.model, "preferred_seed": good.seed, "rejected_seed": bad.seed}
                if kind == "t2i2t":
                    row.update(prompt=items[0]["input"], preferred_image=os.path.relpath(base / good.output, out),
                               rejected_image=os.path.relpath(base / bad.output, out))
                else:
                    row.update(image=os.path.relpath(Path(items[0]["input"]).resolve(), out.resolve()),
                               preferred_text=good.output, rejected_text=bad.output)
                handles[splits[input_id]].write(json.dumps(row) + "\n")
                counts[splits[input_id]] += 1
    finally:
        for handle in handles.values():
            handle.close()
    return stats, counts
