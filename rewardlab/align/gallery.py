"""The validation gallery: fixed prompts and seeds, base images next to the latest ones, with scores."""

from __future__ import annotations

import html
import io
from pathlib import Path

import torch

from ..io.atomic import write_bytes, write_text


def save_images(pixels01: torch.Tensor, folder: Path) -> list[str]:
    """PNG files ``folder/0000.png ...`` of (B, 3, H, W) pixels in [0, 1]; returns their names."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    names = []
    arrays = (pixels01.detach().float().clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy() * 255 + 0.5).astype(np.uint8)
    for index, array in enumerate(arrays):
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="PNG")
        name = f"{index:04d}.png"
        write_bytes(folder / name, buffer.getvalue())
        names.append(name)
    return names


def _scores_html(scores: dict[str, float]) -> str:
    return "<br>".join(f"{html.escape(label)}: {value:.4f}" for label, value in scores.items())


def write_gallery(path: Path, prompts: list[str], seeds: list[int], base: dict, latest: dict, title: str) -> None:
    """``base`` / ``latest``: {"step", "folder" (relative to ``path``'s folder), "images", "scores": {label:
    [per image]}}. One row per prompt: base image and scores, latest image and scores."""
    def cell(run: dict, i: int) -> str:
        image = html.escape(f"{run['folder']}/{run['images'][i]}", quote=True)
        scores = {label: values[i] for label, values in run["scores"].items()}
        return f'<td><img src="{image}" width="192"><div>{_scores_html(scores)}</div></td>'

    def means(run: dict) -> str:
        return _scores_html({label: sum(v) / len(v) for label, v in run["scores"].items()})

    rows = "\n".join(
        f"<tr><td>{html.escape(prompt)}<br><small>seed {seed}</small></td>{cell(base, i)}{cell(latest, i)}</tr>"
        for i, (prompt, seed) in enumerate(zip(prompts, seeds, strict=True)))
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif}} td{{vertical-align:top;padding:6px}} img{{image-rendering:pixelated}}</style>
</head><body><h1>{html.escape(title)}</h1>
<table><tr><th>prompt</th><th>base (step {base['step']})<br>{means(base)}</th>
<th>now (step {latest['step']})<br>{means(latest)}</th></tr>
{rows}
</table></body></html>
"""
    write_text(path, page)
