"""One HTML gallery for search runs, preference pairs and rankings: per prompt, the candidates sorted by
score with every verifier's score, the chosen one marked, and a score-vs-budget plot (inline SVG).

Images are embedded as base64 PNG thumbnails, so the file stands alone. Only images rewardlab generated or
the user gave are embedded: an image given as a path is read only when it lies inside one of
``allowed_roots`` (after resolving links); other paths are shown as "not embedded", so a data file cannot
make the report read arbitrary files.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..io.atomic import write_text
from ..io.records import is_inside

logger = logging.getLogger(__name__)


@dataclass
class GalleryImage:
    """One candidate. ``image``: a path, bytes, PIL image or uint8 array; ``score`` the combined score
    (None = not scored / error); ``mark``: ``chosen``, ``preferred`` or ``rejected``."""

    image: Any
    score: float | None
    scores: dict[str, float | None] = field(default_factory=dict)
    mark: str | None = None
    caption: str = ""
    error: str | None = None


@dataclass
class GallerySection:
    """The candidates of one prompt; ``budget``: (NFEs spent, best score so far) points for the plot."""

    prompt: str
    items: list[GalleryImage]
    budget: list[tuple[float, float]] | None = None
    note: str = ""


def _fmt(value: float | None) -> str:
    return "–" if value is None or (isinstance(value, float) and not math.isfinite(value)) else f"{value:.4f}"


def thumbnail_src(image: Any, roots: Sequence[Path], size: int) -> tuple[str | None, str]:
    """(data URI, "") for an embeddable image, or (None, reason)."""
    from ..io.images import open_image

    if isinstance(image, (str, os.PathLike)):
        if not any(is_inside(image, root, strict=True) for root in roots):
            return None, "not embedded (outside the data folder)"
        image = str(image)
    try:
        pil = open_image(image).convert("RGB")
    except Exception as exc:  # an unreadable image is shown as such; the gallery still renders
        logger.warning("gallery: cannot read an image (%s)", exc)
        return None, "unreadable image"
    if max(pil.size) > size:
        pil.thumbnail((size, size))
    buffer = io.BytesIO()
    pil.save(buffer, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii"), ""


def budget_svg(points: Sequence[tuple[float, float]], width: int = 360, height: int = 150,
               label: str = "best score") -> str:
    """An inline SVG line plot of best score against NFEs spent (numbers only; text escaped)."""
    points = [(float(x), float(y)) for x, y in points if math.isfinite(float(x)) and math.isfinite(float(y))]
    if not points:
        return ""
    left, right, top, bottom = 52, 12, 18, 30
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1 = min(0.0, min(xs)), max(xs) or 1.0
    y0, y1 = min(ys), max(ys)
    if y1 - y0 < 1e-12:
        y0, y1 = y0 - 0.5, y1 + 0.5

    def sx(x: float) -> float:
        return left + (x - x0) / ((x1 - x0) or 1.0) * (width - left - right)

    def sy(y: float) -> float:
        return height - bottom - (y - y0) / (y1 - y0) * (height - top - bottom)

    line = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in points)
    dots = "".join(f"<circle cx='{sx(x):.1f}' cy='{sy(y):.1f}' r='3' fill='#2b6cb0'><title>{x:g} NFEs: {y:.4f}"
                   f"</title></circle>" for x, y in points)
    axis = (f"<line x1='{left}' y1='{height - bottom}' x2='{width - right}' y2='{height - bottom}' stroke='#333'/>"
            f"<line x1='{left}' y1='{top}' x2='{left}' y2='{height - bottom}' stroke='#333'/>"
            f"<text x='{left}' y='{height - bottom + 14}' font-size='10'>{x0:g}</text>"
            f"<text x='{width - right}' y='{height - bottom + 14}' font-size='10' text-anchor='end'>{x1:g}</text>"
            f"<text x='{(left + width - right) / 2}' y='{height - 4}' font-size='11' text-anchor='middle'>NFEs</text>"
            f"<text x='{left - 4}' y='{sy(y1) + 4:.1f}' font-size='10' text-anchor='end'>{y1:.3g}</text>"
            f"<text x='{left - 4}' y='{sy(y0) + 4:.1f}' font-size='10' text-anchor='end'>{y0:.3g}</text>"
            f"<text x='{left}' y='12' font-size='11'>{html.escape(label)} vs budget</text>")
    return (f"<svg class='budget' width='{width}' height='{height}' role='img' aria-label='score vs budget'>{axis}"
            f"<polyline fill='none' stroke='#2b6cb0' stroke-width='2' points='{line}'/>{dots}</svg>")


def template_environment():
    """The Jinja2 environment of the report templates shipped in the package (autoescaping on)."""
    from jinja2 import Environment, FileSystemLoader, select_autoescape

    return Environment(loader=FileSystemLoader(str(Path(__file__).parent / "templates")),
                       autoescape=select_autoescape(default=True, default_for_string=True))


def render_gallery(sections: Sequence[GallerySection], labels: Sequence[str], title: str = "rewardlab gallery",
                   allowed_roots: Sequence[str | os.PathLike] = (), thumb_size: int = 128,
                   combine: str | None = None, sort: bool = True) -> str:
    """The gallery page as one HTML string."""
    from markupsafe import Markup

    roots = [Path(r).resolve() for r in allowed_roots]
    env = template_environment()
    views = []
    for section in sections:
        items = list(section.items)
        if sort:
            items.sort(key=lambda it: (it.score is None or not math.isfinite(it.score), -(it.score or 0.0)))
        rendered = []
        for item in items:
            src, missing = thumbnail_src(item.image, roots, thumb_size)
            rendered.append({"src": src, "missing": missing, "mark": item.mark if item.mark in
                             ("chosen", "preferred", "rejected") else None, "caption": item.caption,
                             "error": item.error, "score_text": _fmt(item.score),
                             "verifier_scores": [(k, _fmt(item.scores.get(k))) for k in labels]})
        plot = Markup(budget_svg(section.budget)) if section.budget else None
        views.append({"prompt": section.prompt, "note": section.note, "candidates": rendered, "plot": plot})
    return env.get_template("gallery.html.j2").render(title=title, sections=views, labels=list(labels),
                                                       thumb=int(thumb_size), combine=combine)


def write_gallery(path: str | os.PathLike, sections: Sequence[GallerySection], labels: Sequence[str],
                  title: str = "rewardlab gallery", allowed_roots: Sequence[str | os.PathLike] = (),
                  thumb_size: int = 128, combine: str | None = None, sort: bool = True) -> Path:
    """Write the gallery atomically. Paths are embedded only inside ``allowed_roots`` (the folder a
    command generated, or the images the user named)."""
    path = Path(path)
    write_text(path, render_gallery(sections, labels, title, allowed_roots, thumb_size, combine, sort))
    return path


def search_gallery(run_folder: str | os.PathLike, path: str | os.PathLike | None = None) -> Path:
    """The gallery of a search run folder (``gallery.html`` inside it by default)."""
    from ..search.runner import load_candidates

    folder = Path(run_folder)
    run = json.loads((folder / "run.json").read_text())
    labels = run["verifiers"]
    sections = []
    for pdir in sorted((folder / "prompts").iterdir()):
        if not (pdir / "result.json").exists():
            continue
        result = json.loads((pdir / "result.json").read_text())
        items = []
        for cand in load_candidates(pdir):
            origin = f"seed {cand.seed}" if cand.origin == "seed" else f"{cand.origin} of c{cand.parent}"
            caption = f"c{cand.index} · round {cand.search_round} · {origin}"
            if not cand.final:
                caption += " · preview"
            items.append(GalleryImage(pdir / cand.image, cand.score if cand.final else None, cand.scores,
                                      "chosen" if cand.index == result["best"] else None, caption, cand.error))
        rounds = [json.loads(line) for line in (pdir / "rounds.jsonl").read_text().splitlines() if line.strip()]
        budget = [(r["nfe"], r["best_score"]) for r in rounds if r["best_score"] is not None]
        note = (f"{result['num_candidates']} candidates, {result['nfe']} NFEs, method {run['method']}"
                + (f", {result['errors']} error(s)" if result["errors"] else ""))
        sections.append(GallerySection(result["prompt"], items, budget, note))
    combine = f"{run['normalize']} (weights {run['weights']})"
    return write_gallery(path or folder / "gallery.html", sections, labels, f"rewardlab search: {run['method']}",
                         allowed_roots=[folder], combine=combine)


def ranking_gallery(path: str | os.PathLike, rows: Sequence, label: str,
                    allowed_roots: Sequence[str | os.PathLike]) -> Path:
    """The gallery of ``rewardlab rank``: ``rows`` carry ``image, prompt, score, rank, error`` (the scoring
    CLI's rows); the rank-1 image of each prompt is marked chosen. Pass as ``allowed_roots`` the image
    paths/folders named on the command line, or the folder of the ``--prompts-file``."""
    sections: dict[str, list[GalleryImage]] = {}
    for row in rows:
        score = None if row.error or row.score is None or not math.isfinite(row.score) else float(row.score)
        sections.setdefault(row.prompt, []).append(
            GalleryImage(row.image, score, {label: score}, "chosen" if row.rank == 1 and score is not None else None,
                         Path(str(row.image)).name, row.error))
    return write_gallery(path, [GallerySection(p, items) for p, items in sections.items()], [label],
                         f"rewardlab rank: {label}", allowed_roots=allowed_roots)
