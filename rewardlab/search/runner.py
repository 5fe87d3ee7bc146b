"""Inference-time search over initial noises (and denoising paths) with reward verifiers.

Methods (``SearchConfig.method``):

- ``best-of-n``: one round of ``num_candidates`` seeded noises; the best candidate is kept.
- ``random``: rounds 1..R with ``2**round`` fresh seeded noises each; the best over all rounds is kept.
- ``zero-order``: round 0 scores one seeded pivot noise; each later round scores ``num_neighbors`` noises
  with the pivot's norm and cosine ``threshold`` to it, and the pivot moves to the best candidate so far.
- ``paths``: ``num_candidates`` seeded paths run to the first checkpoint; each round re-noises every kept
  path ``branches`` times by ``renoise_steps`` scheduler steps (DDIM or Euler on SD 1.x/2.x and SDXL,
  flow matching on SD3 and FLUX), continues to the next checkpoint, scores the predicted clean images and keeps the best
  ``num_candidates``; the last round ends at the final step.

Scoring: every round's new candidates go through each verifier in one batched call
(:meth:`RewardEnsemble.score_detailed`). Several verifiers are combined by the ensemble's rule over the
whole pool of the prompt's candidates so far (rank and batch z-scores depend on the pool, so the pool is
re-combined every round; plain weighted sums and calibrated z-scores do not change). A candidate that a
verifier cannot score (NaN, unreadable) is an error: it is recorded with its message and never ranked.
Ties go to the earliest candidate (lowest index), so a rerun picks the same one.

Budget: ``nfe`` counts denoiser evaluations per sample (see :class:`DiffusersGenerator`); ``max_nfe``
stops a prompt's search before a round that would exceed it.

Files (``output_dir``): ``run.json`` (settings; a rerun must match them), ``prompts/<id>/`` with every
candidate's PNG, ``candidates.jsonl`` (seed or noise file, parent, scores, NFEs), ``rounds.jsonl`` and
``result.json`` (written last: a prompt with it is finished and skipped by a rerun, a prompt without it is
redone from scratch), and the run-wide ``rounds.jsonl``, ``results.jsonl`` and ``gallery.html``.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import re
import shutil
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError, DataError, UsageError
from ..io.atomic import write_bytes, write_json, write_text
from ..scoring.scorer import ranks_from_scores
from .generator import PathState
from .noise import neighbours, seed_noise, seed_noises

logger = logging.getLogger(__name__)

METHODS = ("best-of-n", "random", "zero-order", "paths")


@dataclass
class SearchConfig:
    """Search settings. ``seed`` offsets every noise seed; noises are numbered per prompt."""

    method: str = "best-of-n"
    num_candidates: int = 4
    rounds: int = 4
    threshold: float = 0.95
    num_neighbors: int = 4
    branches: int = 2
    renoise_steps: int = 1
    max_nfe: int | None = None
    seed: int = 0
    batch_size: int = 8

    def validate(self) -> None:
        if self.method not in METHODS:
            raise UsageError(f"unknown search method {self.method!r}", f"use one of {', '.join(METHODS)}")
        for name in ("num_candidates", "rounds", "num_neighbors", "branches", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise UsageError(f"{name} = {getattr(self, name)} must be at least 1")
        if self.renoise_steps < 0:
            raise UsageError(f"renoise_steps = {self.renoise_steps} must be 0 or more")
        if not 0.0 < self.threshold < 1.0:
            raise UsageError(f"threshold {self.threshold} must lie strictly between 0 and 1")
        if self.max_nfe is not None and self.max_nfe < 1:
            raise UsageError(f"max_nfe {self.max_nfe} must be at least 1")

    def recorded(self) -> dict:
        """The settings that decide the candidates (``batch_size`` does not)."""
        out = asdict(self)
        out.pop("batch_size")
        return out


@dataclass
class PromptItem:
    prompt: str
    prompt_id: str


@dataclass
class Candidate:
    """One generated image of a prompt: how its noise was made, its scores and its NFE cost."""

    index: int
    search_round: int
    image: str
    seed: int | None = None
    noise: str | None = None
    parent: int | None = None
    origin: str = "seed"
    scores: dict[str, float | None] = field(default_factory=dict)
    score: float | None = None
    error: str | None = None
    nfe: int = 0
    final: bool = True

    def finite_scores(self, labels: Sequence[str]) -> list[float]:
        return [math.nan if self.error or self.scores.get(k) is None else float(self.scores[k]) for k in labels]


@dataclass
class PromptResult:
    prompt_id: str
    prompt: str
    best: int | None
    best_image: str | None
    best_score: float | None
    best_noise_seed: int | None
    verifier_scores: dict[str, float | None]
    nfe: int
    num_candidates: int
    errors: int


_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def prompt_id(prompt: str, given: str | None = None) -> str:
    """A folder-safe id: ``given`` when it is one, else a hash of the prompt text."""
    if given is not None and _SAFE_ID.match(str(given)) and ".." not in str(given):
        return str(given)
    return "p" + hashlib.sha1(prompt.encode("utf-8")).hexdigest()[:12]


def read_prompts(path: str | os.PathLike) -> list[PromptItem]:
    """Prompts from a text file (one per line) or JSONL (``{"prompt": ..., "id": ...}`` per line)."""
    path = Path(path)
    items: list[PromptItem] = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read prompts ({exc})", "give a UTF-8 text or JSONL file") from None
    jsonl = path.suffix in (".jsonl", ".json")
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        if jsonl:
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path} line {number}: not valid JSON ({exc})") from None
            if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
                raise DataError(f"{path} line {number}: expected an object with a non-empty string 'prompt'")
            text, given = row["prompt"], row.get("id")
        else:
            text, given = line.strip(), None
        items.append(PromptItem(text, prompt_id(text, None if given is None else str(given))))
    if not items:
        raise DataError(f"{path}: no prompts", "one prompt per line, or JSONL rows with a 'prompt' field")
    seen: dict[str, str] = {}
    for item in items:
        if item.prompt_id in seen and seen[item.prompt_id] != item.prompt:
            raise DataError(f"{path}: id {item.prompt_id!r} is used by two different prompts")
        seen[item.prompt_id] = item.prompt
    unique = {i.prompt_id: i for i in items}
    return list(unique.values())


def _png(image: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def _append_jsonl(path: Path, rows: Sequence[dict]) -> None:
    with open(path, "a", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, allow_nan=False) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def _clean(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


class PromptSearch:
    """The candidates of one prompt and the operations every method is built from."""

    def __init__(self, item: PromptItem, folder: Path, generator, ensemble, config: SearchConfig):
        self.item = item
        self.folder = folder
        self.generator = generator
        self.ensemble = ensemble
        self.config = config
        self.candidates: list[Candidate] = []
        self.rounds: list[dict] = []
        self.nfe = 0
        self.nfe_per_image: float | None = None
        (folder / "noise").mkdir(parents=True, exist_ok=True)

    # -- generation and scoring -------------------------------------------------------------------------

    def affordable(self, count: int) -> bool:
        """Whether ``count`` more images fit in ``max_nfe`` (always true before the first round)."""
        if self.config.max_nfe is None or self.nfe_per_image is None:
            return True
        return self.nfe + count * self.nfe_per_image <= self.config.max_nfe + 1e-9

    def _new(self, search_round: int, seeds: Sequence[int | None], parents: Sequence[int | None], origin: str,
             noises: torch.Tensor | None, images: list[np.ndarray], nfe: int, final: bool) -> list[Candidate]:
        made = []
        per_image = nfe // max(1, len(images))
        for k, image in enumerate(images):
            index = len(self.candidates) + len(made)
            name = f"c{index:05d}.png"
            write_bytes(self.folder / name, _png(image))
            noise_file = None
            if noises is not None and origin != "seed":
                from safetensors.torch import save

                noise_file = f"noise/c{index:05d}.safetensors"
                write_bytes(self.folder / noise_file, save({"noise": noises[k].contiguous().cpu()}))
            made.append(Candidate(index, search_round, name, seeds[k], noise_file, parents[k], origin, nfe=per_image,
                                  final=final))
        return made

    def _score(self, made: list[Candidate], images: list[np.ndarray]) -> None:
        """One batched call per verifier for all of ``made``; errors recorded per candidate."""
        result = self.ensemble.score_detailed(self.item.prompt, images)
        for k, cand in enumerate(made):
            cand.scores = {label: _clean(result.per_model[label][k]) for label in self.ensemble.labels}
            cand.error = result.errors.get(k)

    def generate(self, search_round: int, noises: torch.Tensor, seeds: Sequence[int | None],
                 parents: Sequence[int | None], origin: str) -> list[Candidate]:
        """Images of ``noises`` (in batches), saved and scored; appended to the pool and to disk."""
        images: list[np.ndarray] = []
        before = self.generator.nfe
        for start in range(0, len(noises), self.config.batch_size):
            images.extend(self.generator.generate(self.item.prompt, noises[start:start + self.config.batch_size]))
        return self._finish(search_round, seeds, parents, origin, noises, images, self.generator.nfe - before, True)

    def _finish(self, search_round, seeds, parents, origin, noises, images, nfe, final) -> list[Candidate]:
        self.nfe += nfe
        if images:
            self.nfe_per_image = nfe / len(images) if self.nfe_per_image is None else self.nfe_per_image
        made = self._new(search_round, seeds, parents, origin, noises, images, nfe, final)
        self._score(made, images)
        self.candidates.extend(made)
        self._combine()
        _append_jsonl(self.folder / "candidates.jsonl", [asdict(c) for c in made])
        return made

    def _combine(self, pool: Sequence[Candidate] | None = None) -> None:
        """Combined ``score`` of every candidate in ``pool`` (default: all), per the ensemble's rule."""
        pool = list(self.candidates if pool is None else pool)
        labels = self.ensemble.labels
        columns = {label: [c.finite_scores(labels)[n] for c in pool] for n, label in enumerate(labels)}
        totals = self.ensemble.combine_finite(columns) if pool else []
        for cand, total in zip(pool, totals, strict=True):
            cand.score = _clean(total)

    def best(self, pool: Sequence[Candidate] | None = None) -> Candidate | None:
        """Arg-max of the combined score; ties go to the lowest index; errors are never chosen."""
        pool = list(self.candidates if pool is None else pool)
        pool = [c for c in pool if c.final]
        if not pool:
            return None
        _, order = ranks_from_scores([math.nan if c.score is None else c.score for c in pool])
        top = pool[order[0]]
        return None if top.score is None else top

    def seeds(self, count: int) -> list[int]:
        """The next ``count`` noise seeds of this prompt: ``seed + n`` for the n-th seeded noise."""
        used = sum(1 for c in self.candidates if c.origin == "seed")
        return [self.config.seed + used + n for n in range(count)]

    def record_round(self, search_round: int, made: Sequence[Candidate], best: Candidate | None) -> None:
        self.rounds.append({
            "prompt": self.item.prompt, "prompt_id": self.item.prompt_id, "method": self.config.method,
            "search_round": search_round, "num_noises": len(made), "nfe": self.nfe,
            "best_candidate": None if best is None else best.index,
            "best_noise_seed": None if best is None else best.seed,
            "best_noise": None if best is None else best.noise,
            "best_score": None if best is None else best.score,
            "verifier_scores": {} if best is None else dict(best.scores),
            "best_image": None if best is None else f"prompts/{self.item.prompt_id}/{best.image}",
            "errors": sum(1 for c in made if c.error),
        })
        for cand in made:
            if cand.error:
                logger.warning("prompt %s candidate %d: %s", self.item.prompt_id, cand.index, cand.error)

    def noise_of(self, cand: Candidate) -> torch.Tensor:
        """The initial noise of a candidate (from its seed or its noise file)."""
        if cand.noise is None:
            return seed_noise(cand.seed, self.generator.latent_shape)
        from safetensors.torch import load

        return load((self.folder / cand.noise).read_bytes())["noise"]


# -- methods ----------------------------------------------------------------------------------------------

def _seeded_round(search: PromptSearch, search_round: int, count: int) -> list[Candidate]:
    seeds = search.seeds(count)
    noises = seed_noises(seeds, search.generator.latent_shape)
    return search.generate(search_round, noises, seeds, [None] * count, "seed")


def best_of_n(search: PromptSearch) -> None:
    made = _seeded_round(search, 0, search.config.num_candidates)
    search.record_round(0, made, search.best())


def random_search(search: PromptSearch) -> None:
    for search_round in range(1, search.config.rounds + 1):
        count = 2 ** search_round
        if not search.affordable(count):
            break
        made = _seeded_round(search, search_round, count)
        search.record_round(search_round, made, search.best())


def zero_order(search: PromptSearch) -> None:
    config = search.config
    made = _seeded_round(search, 0, 1)
    pivot = search.best() or made[0]
    search.record_round(0, made, search.best())
    for search_round in range(1, config.rounds + 1):
        if not search.affordable(config.num_neighbors):
            break
        direction_seed = config.seed + 1_000_003 * search_round + pivot.index
        noises = neighbours(search.noise_of(pivot), config.num_neighbors, config.threshold, direction_seed)
        made = search.generate(search_round, noises, [direction_seed] * len(noises), [pivot.index] * len(noises),
                               "neighbour")
        best = search.best()
        if best is not None:
            pivot = best
        search.record_round(search_round, made, best)


def path_search(search: PromptSearch) -> None:
    config, gen = search.config, search.generator
    gen.check_paths()
    steps = gen.num_inference_steps
    checkpoints = sorted({max(1, round(r * steps / (config.rounds + 1))) for r in range(1, config.rounds + 1)}
                         | {steps})
    seeds = search.seeds(config.num_candidates)
    noises = seed_noises(seeds, gen.latent_shape)
    state, parents, origin, round_seeds = gen.start_paths(noises), [None] * len(seeds), "seed", seeds
    kept: list[Candidate] = []
    per_step: float | None = None  # NFEs of one sample-step, measured in round 0
    for search_round, end in enumerate(checkpoints):
        if search_round > 0:
            branches, back = config.branches, config.renoise_steps
            cost = len(kept) * branches * (end - state.step + min(back, state.step)) * (per_step or 0)
            if config.max_nfe is not None and search.nfe + cost > config.max_nfe:
                branches, back, end = 1, 0, steps  # out of budget: finish the kept paths without branching
            repeat = torch.arange(len(kept)).repeat_interleave(branches)
            base = config.seed + 2_000_003 * search_round
            round_seeds = [base + n for n in range(len(repeat))] if back else [None] * len(repeat)
            noises = seed_noises(round_seeds, gen.latent_shape) if back else None
            state = PathState(state.latents[repeat], state.step)
            if back:
                state = gen.renoise(state, back, noises)
            parents, origin = [kept[int(i)].index for i in repeat], "path"
        before, first_step = gen.nfe, state.step
        done, predicted = [], []
        for start in range(0, len(state.latents), config.batch_size):
            part, clean = gen.run_steps(search.item.prompt, PathState(state.latents[start:start + config.batch_size],
                                                                       state.step), end)
            done.append(part.latents)
            predicted.append(clean)
        spent = gen.nfe - before
        per_step = per_step or spent / max(1, len(state.latents) * (end - first_step))
        state = PathState(torch.cat(done), end)
        final = end == steps
        images = gen.decode(state.latents if final else torch.cat(predicted))
        made = search._finish(search_round, round_seeds, parents, origin, noises, images, spent, final)
        search._combine(made)  # previews of different rounds are not comparable: combine within the round
        _, order = ranks_from_scores([math.nan if c.score is None else c.score for c in made])
        keep = [i for i in order if made[i].score is not None][:config.num_candidates] or order[:1]
        kept = [made[i] for i in keep]
        state = PathState(state.latents[torch.tensor(keep)], end)
        search.record_round(search_round, made, kept[0] if kept[0].score is not None else None)
        if final:
            break
    search._combine([c for c in search.candidates if c.final])  # only finished images can be chosen


RUNNERS: dict[str, Callable[[PromptSearch], None]] = {
    "best-of-n": best_of_n, "random": random_search, "zero-order": zero_order, "paths": path_search,
}


# -- the run ---------------------------------------------------------------------------------------------

@dataclass
class SearchSummary:
    output_dir: str
    results: list[PromptResult]
    skipped: int
    nfe: int

    def as_dict(self) -> dict:
        return {"output_dir": self.output_dir, "prompts": len(self.results), "skipped": self.skipped,
                "nfe": self.nfe, "results": [asdict(r) for r in self.results]}


def _check_run(folder: Path, settings: dict) -> None:
    path = folder / "run.json"
    if path.exists():
        try:
            recorded = json.loads(path.read_text())
        except json.JSONDecodeError:
            raise ConfigError(f"{path}: not valid JSON", "remove the folder or pick another --output") from None
        if recorded != settings:
            changed = sorted(k for k in set(recorded) | set(settings) if recorded.get(k) != settings.get(k))
            raise ConfigError(f"{folder} holds a search run with other settings ({', '.join(changed)})",
                              "resume with the same settings, or pick another --output")
    else:
        folder.mkdir(parents=True, exist_ok=True)
        write_json(path, settings)


def _result(search: PromptSearch) -> PromptResult:
    best = search.best()
    return PromptResult(search.item.prompt_id, search.item.prompt, None if best is None else best.index,
                        None if best is None else f"prompts/{search.item.prompt_id}/{best.image}",
                        None if best is None else best.score, None if best is None else best.seed,
                        {} if best is None else dict(best.scores), search.nfe, len(search.candidates),
                        sum(1 for c in search.candidates if c.error))


def run_search(generator, ensemble, prompts: Sequence[PromptItem], output_dir: str | os.PathLike,
               config: SearchConfig | None = None, gallery: bool = True,
               progress: Callable[[PromptResult], None] | None = None) -> SearchSummary:
    """Search every prompt (verifiers and pipeline stay loaded); finished prompts of an earlier run with the
    same settings are skipped. Returns per-prompt results; writes the files listed in the module docstring."""
    config = config or SearchConfig()
    config.validate()
    if config.method == "paths":
        generator.check_paths()  # refuse before any file is written
    folder = Path(output_dir)
    settings = {"method": config.method, "search": config.recorded(), "generator": generator.describe(),
                "verifiers": list(ensemble.labels), "weights": ensemble.weights, "normalize": ensemble.normalize}
    _check_run(folder, settings)
    results, skipped = [], 0
    for item in prompts:
        pdir = folder / "prompts" / item.prompt_id
        done = pdir / "result.json"
        if done.exists():
            results.append(PromptResult(**json.loads(done.read_text())))
            skipped += 1
            continue
        if pdir.exists():
            shutil.rmtree(pdir)  # unfinished: redo from scratch
        pdir.mkdir(parents=True)
        write_text(pdir / "prompt.txt", item.prompt)
        search = PromptSearch(item, pdir, generator, ensemble, config)
        RUNNERS[config.method](search)
        _rewrite_candidates(search)
        write_text(pdir / "rounds.jsonl", "".join(json.dumps(r, allow_nan=False) + "\n" for r in search.rounds))
        result = _result(search)
        write_json(done, asdict(result))
        results.append(result)
        if progress:
            progress(result)
    write_run_tables(folder)
    if gallery:
        from ..report.gallery import search_gallery

        search_gallery(folder)
    return SearchSummary(str(folder), results, skipped, sum(r.nfe for r in results))


def _rewrite_candidates(search: PromptSearch) -> None:
    """Candidates with their final combined scores (the pool's rank fusion changes as it grows)."""
    text = "".join(json.dumps(asdict(c), allow_nan=False) + "\n" for c in search.candidates)
    write_text(search.folder / "candidates.jsonl", text)


def write_run_tables(folder: Path) -> None:
    """``rounds.jsonl`` and ``results.jsonl`` of all finished prompts, rewritten atomically."""
    rounds, results = [], []
    for pdir in sorted((folder / "prompts").iterdir()) if (folder / "prompts").is_dir() else []:
        if (pdir / "result.json").exists():
            results.append((pdir / "result.json").read_text().strip().replace("\n", ""))
            rounds.extend(line for line in (pdir / "rounds.jsonl").read_text().splitlines() if line.strip())
    write_text(folder / "rounds.jsonl", "".join(r + "\n" for r in rounds))
    write_text(folder / "results.jsonl", "".join(json.dumps(json.loads(r)) + "\n" for r in results))


def load_candidates(prompt_folder: str | os.PathLike) -> list[Candidate]:
    """The candidates of one searched prompt (``candidates.jsonl``)."""
    path = Path(prompt_folder) / "candidates.jsonl"
    out = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if line.strip():
            try:
                out.append(Candidate(**json.loads(line)))
            except (json.JSONDecodeError, TypeError) as exc:
                raise DataError(f"{path} line {number}: not a candidate row ({exc})") from None
    return out


def regenerate(generator, run_folder: str | os.PathLike, prompt_id_: str, index: int) -> np.ndarray:
    """Re-generate one recorded candidate from its seed or noise file (best-of-N, random and zero-order
    candidates; path candidates depend on their lineage and are not re-generated here)."""
    pdir = Path(run_folder) / "prompts" / prompt_id_
    cand = next((c for c in load_candidates(pdir) if c.index == index), None)
    if cand is None:
        raise DataError(f"{pdir}: no candidate {index}")
    if cand.origin == "path":
        raise UsageError("path candidates are not re-generated from a single noise")
    prompt = (pdir / "prompt.txt").read_text()
    holder = PromptSearch.__new__(PromptSearch)
    holder.folder, holder.generator = pdir, generator
    noise = holder.noise_of(cand)
    return generator.generate(prompt, noise[None])[0]
