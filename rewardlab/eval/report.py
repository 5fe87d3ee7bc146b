"""A self-contained HTML report: metrics with CIs, score histograms, accuracy by group size, examples."""

from __future__ import annotations

import base64
import html
import io
import math
from pathlib import Path

import numpy as np

from ..data.groups import Group
from .runner import EvalResult

_STYLE = """
body{font-family:system-ui,sans-serif;margin:24px;color:#222;max-width:1200px}
h1{font-size:22px}h2{font-size:18px;margin-top:28px;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:8px 0;font-size:13px}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}
th{background:#f3f3f3}td.l,th.l{text-align:left}.hist{display:inline-block;margin:6px 16px 6px 0}
.ex{margin:10px 0}.ex img{width:72px;height:72px;object-fit:cover;margin:2px;border:1px solid #bbb}
.cap{font-size:12px;color:#555}.row{display:flex;align-items:center;gap:6px}.row b{width:150px;font-size:13px}
.fig{display:inline-block;text-align:center;font-size:11px}
"""


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


def _thumbnail(image) -> str:
    from ..io.images import open_image

    try:
        pil = open_image(image).convert("RGB")
    except Exception:
        return "<span class='cap'>(unreadable)</span>"
    pil.thumbnail((96, 96))
    buffer = io.BytesIO()
    pil.save(buffer, format="JPEG", quality=80)
    return f"<img alt='' src='data:image/jpeg;base64,{base64.b64encode(buffer.getvalue()).decode()}'>"


def render_report(results: list[EvalResult], groups: list[Group], title: str = "rewardlab evaluation",
                  examples: int = 4, extra: dict | None = None) -> str:
    """The report page as one HTML string (no external files)."""
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>"]
    parts.append(f"<p>{len(groups)} groups. Accuracy: pairs with different human ranks, pooled "
                 "(ImageReward test procedure; equal scores count as wrong); CI: 95% bootstrap over groups.</p>")
    keys = ["macro_accuracy", "tie_aware_accuracy"] + [k for k in results[0].metrics if "@" in k]
    header = "".join(f"<th>{html.escape(k.replace('_accuracy', ''))}</th>" for k in keys)
    parts.append("<h2>Metrics</h2><table id='metrics'><tr><th class='l'>model</th><th>pairs</th><th>accuracy</th>"
                 f"<th>95% CI</th>{header}</tr>")
    for r in results:
        m = r.metrics
        cells = "".join(f"<td>{_fmt(m[k])}</td>" for k in keys)
        ci = f"{_fmt(m['ci95'][0])}–{_fmt(m['ci95'][1])}"
        parts.append(f"<tr><td class='l'>{html.escape(r.model)}</td><td>{m['pairs']}</td><td>{_fmt(m['accuracy'])}</td>"
                     f"<td>{ci}</td>{cells}</tr>")
    parts.append("</table>")
    failures = [(r.model, e) for r in results for e in r.errors]
    if failures:
        parts.append(f"<p><b>{len(failures)} unreadable images</b> (their groups are left out):</p><ul>")
        parts += [f"<li>{html.escape(model)}: {html.escape(e)}</li>" for model, e in failures[:50]]
        parts.append("</ul>")
    if extra:
        parts.append("<h2>Generator ranking</h2><table><tr><th class='l'>model</th><th class='l'>order (best first)</th>"
                     "<th>Spearman</th><th>Kendall</th></tr>")
        for model, info in extra.items():
            parts.append(f"<tr><td class='l'>{html.escape(model)}</td><td class='l'>{html.escape(', '.join(info['order']))}</td>"
                         f"<td>{_fmt(info.get('spearman', float('nan')))}</td><td>{_fmt(info.get('kendall', float('nan')))}</td></tr>")
        parts.append("</table>")
    parts.append("<h2>Score distributions</h2>")
    parts += [histogram_svg([s for g in r.scores for s in g], r.model) for r in results]
    sizes = sorted({s for r in results for s in r.by_group_size})
    parts.append("<h2>Accuracy by images per prompt</h2><table><tr><th>candidates</th><th>groups</th><th>pairs</th>"
                 + "".join(f"<th>{html.escape(r.model)}</th>" for r in results) + "</tr>")
    for size in sizes:
        first = results[0].by_group_size.get(size, {"groups": 0, "pairs": 0})
        cells = "".join(f"<td>{_fmt(r.by_group_size.get(size, {}).get('accuracy', float('nan')))}</td>" for r in results)
        parts.append(f"<tr><td>{size}</td><td>{first['groups']}</td><td>{first['pairs']}</td>{cells}</tr>")
    parts.append("</table><h2>Examples</h2>")
    shown = [g for g in range(len(groups)) if len(set(groups[g].ranking)) > 1][:examples]
    for g in shown:
        group = groups[g]
        thumbs = [_thumbnail(image) for image in group.images]
        parts.append(f"<div class='ex'><div class='cap'>{html.escape(group.prompt)}</div>")
        human_order = sorted(range(group.size), key=lambda c: group.ranking[c])
        parts.append("<div class='row'><b>human</b>" + "".join(
            f"<span class='fig'>{thumbs[c]}<br>rank {_fmt(group.ranking[c], 0)}</span>" for c in human_order) + "</div>")
        for r in results:
            order = sorted(range(group.size), key=lambda c: -r.scores[g][c] if not math.isnan(r.scores[g][c]) else math.inf)
            parts.append(f"<div class='row'><b>{html.escape(r.model)}</b>" + "".join(
                f"<span class='fig'>{thumbs[c]}<br>{_fmt(r.scores[g][c], 2)} (h{_fmt(group.ranking[c], 0)})</span>"
                for c in order) + "</div>")
        parts.append("</div>")
    parts.append("</body></html>")
    return "".join(parts)


def write_report(path: str | Path, *args, **kwargs) -> None:
    """Render and write the report atomically."""
    from ..io.atomic import write_text

    write_text(path, render_report(*args, **kwargs))
