"""A self-contained HTML report: metrics with CIs, score histograms, accuracy by group size, examples."""

from __future__ import annotations

import html
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..data.groups import Group
from .runner import EvalResult


def _fmt(value, digits: int = 3) -> str:
    if isinstance(value, float) and math.isnan(value):
        return "–"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def histogram_svg(values: list[float], title: str, bins: int = 20, width: int = 320, height: int = 140) -> str:
    """An inline SVG histogram of ``values``."""
    data = np.asarray([v for v in values if not math.isnan(v)])
    if data.size == 0:
        return f"<div class='hist'>{html.escape(title)}: no scores</div>"
    counts, edges = np.histogram(data, bins=bins)
    bar_w = (width - 40) / bins
    top = counts.max() or 1
    bars = "".join(
        f"<rect x='{30 + i * bar_w:.1f}' y='{height - 20 - (c / top) * (height - 40):.1f}' width='{bar_w - 1:.1f}' "
        f"height='{(c / top) * (height - 40):.1f}' fill='#4a7bd0'><title>{edges[i]:.3f}–{edges[i + 1]:.3f}: {c}</title></rect>"
        for i, c in enumerate(counts))
    return (f"<div class='hist'><svg width='{width}' height='{height}' role='img' aria-label='{html.escape(title)}'>"
            f"<text x='{width / 2}' y='14' text-anchor='middle' font-size='12'>{html.escape(title)}</text>{bars}"
            f"<text x='30' y='{height - 5}' font-size='10'>{edges[0]:.2f}</text>"
            f"<text x='{width - 10}' y='{height - 5}' font-size='10' text-anchor='end'>{edges[-1]:.2f}</text>"
            f"<line x1='30' y1='{height - 20}' x2='{width - 10}' y2='{height - 20}' stroke='#333'/></svg></div>")


def render_report(results: list[EvalResult], groups: list[Group], title: str = "rewardlab evaluation",
                  examples: int = 4, extra: dict | None = None,
                  allowed_roots: Sequence[str | os.PathLike] = ()) -> str:
    """The report page as one HTML string (no external files), from ``report/templates/eval_report.html.j2``.
    Image files are embedded only inside ``allowed_roots`` (the data folder)."""
    from markupsafe import Markup

    from ..report.gallery import template_environment, thumbnail_src

    roots = [Path(r).resolve() for r in allowed_roots]
    keys = ["macro_accuracy", "tie_aware_accuracy"] + [k for k in results[0].metrics if "@" in k]
    metric_rows = [{"model": r.model, "pairs": r.metrics["pairs"], "accuracy": _fmt(r.metrics["accuracy"]),
                    "ci": f"{_fmt(r.metrics['ci95'][0])}–{_fmt(r.metrics['ci95'][1])}",
                    "cells": [_fmt(r.metrics[k]) for k in keys]} for r in results]
    generators = [{"model": model, "order": ", ".join(info["order"]), "spearman": _fmt(info.get("spearman", math.nan)),
                   "kendall": _fmt(info.get("kendall", math.nan))} for model, info in (extra or {}).items()]
    by_size = []
    for size in sorted({s for r in results for s in r.by_group_size}):
        first = results[0].by_group_size.get(size, {"groups": 0, "pairs": 0})
        by_size.append({"size": size, "groups": first["groups"], "pairs": first["pairs"],
                        "cells": [_fmt(r.by_group_size.get(size, {}).get("accuracy", math.nan)) for r in results]})
    shown = [g for g in range(len(groups)) if len(set(groups[g].ranking)) > 1][:examples]
    example_views = []
    for g in shown:
        group = groups[g]
        thumbs = [thumbnail_src(image, roots, 96) for image in group.images]
        human = sorted(range(group.size), key=lambda c: group.ranking[c])
        lines = [{"label": "human", "figures": [{"src": thumbs[c][0], "missing": thumbs[c][1],
                                                 "caption": f"rank {_fmt(group.ranking[c], 0)}"} for c in human]}]
        for r in results:
            order = sorted(range(group.size), key=lambda c: -r.scores[g][c] if not math.isnan(r.scores[g][c]) else math.inf)
            lines.append({"label": r.model, "figures": [
                {"src": thumbs[c][0], "missing": thumbs[c][1],
                 "caption": f"{_fmt(r.scores[g][c], 2)} (h{_fmt(group.ranking[c], 0)})"} for c in order]})
        example_views.append({"prompt": group.prompt, "lines": lines})
    histograms = [Markup(histogram_svg([s for g in r.scores for s in g], r.model)) for r in results]
    return template_environment().get_template("eval_report.html.j2").render(
        title=title, group_count=len(groups), metric_keys=[k.replace("_accuracy", "") for k in keys],
        metric_rows=metric_rows, failures=[(r.model, e) for r in results for e in r.errors], generators=generators,
        histograms=histograms, by_size=by_size, examples=example_views)


def write_report(path: str | Path, *args, **kwargs) -> None:
    """Render and write the report atomically."""
    from ..io.atomic import write_text

    write_text(path, render_report(*args, **kwargs))
