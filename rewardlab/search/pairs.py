"""Reward-labelled preference pairs from generations: score every prompt's candidates with one or more
rewards, pair them (best-vs-worst or all pairs, at least ``min_margin`` apart) and export them as

- ``pairs.parquet``: the Pick-a-Pic v2 / Diffusion-DPO layout (``caption``, ``jpg_0``, ``jpg_1`` image
  bytes, ``label_0``, ``label_1``, ...); which image is ``jpg_0`` is shuffled with ``seed`` so the
  preferred image is not always first;
- ``pairs.jsonl``: rewardlab's pair file (``prompt``, ``preferred_image``, ``rejected_image`` relative to
  the file, ``input_id``), read by ``rewardlab train -d pairs:FILE`` and ``rewardlab eval -d pairs:FILE``;
- ``scores.jsonl`` (every candidate's scores) and ``gallery.html``.

Inputs: a ``rewardlab search`` output folder (its finished candidates), or any folder with one sub-folder
per prompt holding ``prompt.txt`` and the candidate images. Only image files inside the folder are read
(links pointing outside it are refused). Candidates a reward cannot score are errors: listed, never paired.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path

from ..errors import DataError, UsageError
from ..io.atomic import write_bytes, write_text
from ..io.images import IMAGE_SUFFIXES
from ..io.records import is_inside

logger = logging.getLogger(__name__)

STRATEGIES = ("best-vs-worst", "all-pairs")


@dataclass
class CandidateGroup:
    """The candidate images of one prompt (paths inside the data root)."""

    prompt_id: str
    prompt: str
    images: list[Path]
    scores: list[float] | None = None
    per_model: dict[str, list[float]] | None = None
    errors: dict[int, str] | None = None


@dataclass
class PreferencePair:
    prompt_id: str
    prompt: str
    preferred: Path
    rejected: Path
    preferred_score: float
    rejected_score: float

    @property
    def margin(self) -> float:
        return self.preferred_score - self.rejected_score


def discover_candidates(root: str | os.PathLike) -> list[CandidateGroup]:
    """Candidate groups of a search run folder or of a folder of per-prompt sub-folders."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: not a folder", "give a `rewardlab search` output or a folder of prompt folders")
    real_root = root.resolve()
    groups = []
    if (root / "run.json").is_file() and (root / "prompts").is_dir():
        from .runner import load_candidates

        for pdir in sorted((root / "prompts").iterdir()):
            if not (pdir / "result.json").is_file():
                continue  # unfinished prompt
            cands = [c for c in load_candidates(pdir) if c.final]
            images = [pdir / c.image for c in cands]
            groups.append(CandidateGroup(pdir.name, (pdir / "prompt.txt").read_text(encoding="utf-8"), images))
    else:
        for pdir in sorted(p for p in root.iterdir() if p.is_dir()):
            prompt_file = pdir / "prompt.txt"
            if not prompt_file.is_file():
                logger.warning("%s has no prompt.txt: skipped", pdir)
                continue
            prompt = prompt_file.read_text(encoding="utf-8").strip()
            if not prompt:
                raise DataError(f"{prompt_file}: empty prompt")
            images = sorted(p for p in pdir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
            groups.append(CandidateGroup(pdir.name, prompt, images))
    for group in groups:
        outside = [p for p in group.images if not is_inside(p, real_root, strict=True)]
        if outside:
            raise DataError(f"{outside[0]}: points outside {root}", "copy the images into the data folder")
    if not groups:
        raise DataError(f"{root}: no prompt folders with candidates",
                        "each prompt needs a sub-folder with prompt.txt and its images")
    return groups


def score_groups(ensemble, groups: Sequence[CandidateGroup], batch_size: int | None = None) -> None:
    """Score every group's images (one batched call per reward per prompt); fills ``scores`` (combined,
    NaN for errors), ``per_model`` and ``errors``."""
    for group in groups:
        result = ensemble.score_detailed(group.prompt, [str(p) for p in group.images], batch_size=batch_size)
        group.scores, group.per_model, group.errors = result.total, result.per_model, result.errors
        for index, message in result.errors.items():
            logger.warning("%s: %s", group.images[index], message)


def build_pairs(groups: Sequence[CandidateGroup], strategy: str = "best-vs-worst", min_margin: float = 0.0
                ) -> list[PreferencePair]:
    """Pairs whose combined scores differ by at least ``min_margin`` (and by more than 0: ties are never
    paired). ``best-vs-worst``: at most one pair per prompt; ``all-pairs``: every qualifying pair."""
    if strategy not in STRATEGIES:
        raise UsageError(f"unknown pair strategy {strategy!r}", f"use one of {', '.join(STRATEGIES)}")
    if not math.isfinite(min_margin) or min_margin < 0:
        raise UsageError(f"min_margin {min_margin} must be a finite number >= 0")
    pairs = []
    for group in groups:
        if group.scores is None:
            raise UsageError(f"group {group.prompt_id} is not scored", "call score_groups first")
        good = [i for i, s in enumerate(group.scores) if math.isfinite(s)]
        if strategy == "best-vs-worst":
            candidates = []
            if len(good) >= 2:
                best = max(good, key=lambda i: (group.scores[i], -i))
                worst = min(good, key=lambda i: (group.scores[i], i))
                candidates = [(best, worst)]
        else:
            candidates = [(i, j) if group.scores[i] >= group.scores[j] else (j, i) for i, j in combinations(good, 2)]
        for hi, lo in candidates:
            margin = group.scores[hi] - group.scores[lo]
            if margin > 0 and margin >= min_margin:
                pairs.append(PreferencePair(group.prompt_id, group.prompt, group.images[hi], group.images[lo],
                                            group.scores[hi], group.scores[lo]))
    return pairs


def _relative(path: Path, folder: Path) -> str:
    return os.path.relpath(path.resolve(), folder.resolve())


def pickapic_table(pairs: Sequence[PreferencePair], base: Path, seed: int = 0):
    """A pyarrow table in the Pick-a-Pic v2 layout with the image files' bytes."""
    import pyarrow as pa

    rng = random.Random(seed)
    rows: dict[str, list] = {k: [] for k in ("caption", "jpg_0", "jpg_1", "label_0", "label_1", "has_label",
                                             "are_different", "ranking_id", "image_0_uid", "image_1_uid",
                                             "score_0", "score_1", "prompt_id")}
    for n, pair in enumerate(pairs):
        first, second, label_0 = (pair.preferred, pair.rejected, 1.0) if rng.random() < 0.5 else \
            (pair.rejected, pair.preferred, 0.0)
        rows["caption"].append(pair.prompt)
        rows["jpg_0"].append(first.read_bytes())
        rows["jpg_1"].append(second.read_bytes())
        rows["label_0"].append(label_0)
        rows["label_1"].append(1.0 - label_0)
        rows["has_label"].append(True)
        rows["are_different"].append(True)
        rows["ranking_id"].append(n)
        rows["image_0_uid"].append(_relative(first, base))
        rows["image_1_uid"].append(_relative(second, base))
        scores = (pair.preferred_score, pair.rejected_score) if label_0 == 1.0 else \
            (pair.rejected_score, pair.preferred_score)
        rows["score_0"].append(scores[0])
        rows["score_1"].append(scores[1])
        rows["prompt_id"].append(pair.prompt_id)
    types = {"jpg_0": pa.binary(), "jpg_1": pa.binary(), "label_0": pa.float64(), "label_1": pa.float64(),
             "score_0": pa.float64(), "score_1": pa.float64(), "ranking_id": pa.int64(), "has_label": pa.bool_(),
             "are_different": pa.bool_()}
    return pa.table({k: pa.array(v, type=types.get(k, pa.string())) for k, v in rows.items()})


@dataclass
class PairExport:
    pairs: int
    prompts: int
    candidates: int
    errors: int
    files: dict[str, str]


def export_pairs(pairs: Sequence[PreferencePair], groups: Sequence[CandidateGroup], output_dir: str | os.PathLike,
                 labels: Sequence[str], formats: Sequence[str] = ("parquet", "jsonl"), seed: int = 0,
                 gallery: bool = True, data_root: str | os.PathLike | None = None,
                 combine: str | None = None) -> PairExport:
    """Write the pair files (atomically), the candidates' scores and the gallery into ``output_dir``."""
    import pyarrow.parquet as pq

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {}
    if "parquet" in formats:
        buffer = io.BytesIO()
        pq.write_table(pickapic_table(pairs, out, seed), buffer)
        write_bytes(out / "pairs.parquet", buffer.getvalue())
        files["parquet"] = str(out / "pairs.parquet")
    if "jsonl" in formats:
        text = "".join(json.dumps({"prompt": p.prompt, "preferred_image": _relative(p.preferred, out),
                                   "rejected_image": _relative(p.rejected, out), "input_id": p.prompt_id,
                                   "preferred_score": p.preferred_score, "rejected_score": p.rejected_score,
                                   "margin": p.margin}, allow_nan=False) + "\n" for p in pairs)
        write_text(out / "pairs.jsonl", text)
        files["jsonl"] = str(out / "pairs.jsonl")
    score_rows = []
    for group in groups:
        for i, image in enumerate(group.images):
            total = group.scores[i]
            score_rows.append({"prompt_id": group.prompt_id, "prompt": group.prompt, "image": _relative(image, out),
                               "score": total if math.isfinite(total) else None,
                               "scores": {k: (v[i] if math.isfinite(v[i]) else None) for k, v in group.per_model.items()},
                               "error": (group.errors or {}).get(i)})
    write_text(out / "scores.jsonl", "".join(json.dumps(r, allow_nan=False) + "\n" for r in score_rows))
    files["scores"] = str(out / "scores.jsonl")
    if gallery:
        files["gallery"] = str(pairs_gallery(pairs, groups, out / "gallery.html", labels,
                                             data_root or _common_root(groups), combine))
    errors = sum(len(g.errors or {}) for g in groups)
    return PairExport(len(pairs), len(groups), sum(len(g.images) for g in groups), errors, files)


def _common_root(groups: Sequence[CandidateGroup]) -> Path:
    paths = [str(p.resolve()) for g in groups for p in g.images]
    return Path(os.path.commonpath(paths)) if paths else Path(".")


def pairs_gallery(pairs: Sequence[PreferencePair], groups: Sequence[CandidateGroup], path: Path,
                  labels: Sequence[str], data_root: str | os.PathLike, combine: str | None = None) -> Path:
    """Gallery: each prompt's candidates by score; images in a pair marked preferred / rejected."""
    from ..report.gallery import GalleryImage, GallerySection, write_gallery

    preferred = {p.preferred.resolve() for p in pairs}
    rejected = {p.rejected.resolve() for p in pairs}
    sections = []
    for group in groups:
        items = []
        for i, image in enumerate(group.images):
            resolved = image.resolve()
            mark = "preferred" if resolved in preferred else "rejected" if resolved in rejected else None
            total = group.scores[i]
            items.append(GalleryImage(image, total if math.isfinite(total) else None,
                                      {k: v[i] if math.isfinite(v[i]) else None for k, v in group.per_model.items()},
                                      mark, image.name, (group.errors or {}).get(i)))
        count = sum(1 for p in pairs if p.prompt_id == group.prompt_id)
        sections.append(GallerySection(group.prompt, items, None, f"{len(group.images)} candidates, {count} pair(s)"))
    return write_gallery(path, sections, labels, "rewardlab pairs", allowed_roots=[data_root], combine=combine)


def make_pairs_from_folder(ensemble, root: str | os.PathLike, output_dir: str | os.PathLike,
                           strategy: str = "best-vs-worst", min_margin: float = 0.0,
                           formats: Sequence[str] = ("parquet", "jsonl"), seed: int = 0,
                           batch_size: int | None = None, gallery: bool = True) -> PairExport:
    """Discover, score, pair and export in one call (what ``rewardlab pairs`` runs)."""
    build_pairs([], strategy, min_margin)  # validate options before scoring
    groups = discover_candidates(root)
    score_groups(ensemble, groups, batch_size)
    pairs = build_pairs(groups, strategy, min_margin)
    combine = f"{ensemble.normalize} (weights {ensemble.weights})"
    return export_pairs(pairs, groups, output_dir, ensemble.labels, formats, seed, gallery, root, combine)


__all__ = ["CandidateGroup", "PreferencePair", "PairExport", "STRATEGIES", "discover_candidates", "score_groups",
           "build_pairs", "export_pairs", "pickapic_table", "make_pairs_from_folder"]
