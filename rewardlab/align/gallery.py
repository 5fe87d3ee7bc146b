"""The validation gallery: fixed prompts and seeds, base images next to the latest ones, with scores."""

from __future__ import annotations

import io
from pathlib import Path

import torch

from ..io.atomic import write_bytes


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


def write_gallery(path: Path, prompts: list[str], seeds: list[int], base: dict, latest: dict, title: str) -> None:
    """``base`` / ``latest``: {"step", "folder" (relative to ``path``'s folder), "images", "scores": {label:
    [per image]}}. One section per prompt with the base image and the latest one, each with every reward's
    score, through the shared gallery module (:mod:`rewardlab.report.gallery`)."""
    from ..report.gallery import GalleryImage, GallerySection
    from ..report.gallery import write_gallery as write_sections

    root = Path(path).parent
    labels = list(latest["scores"])
    sections = []
    for i, (prompt, seed) in enumerate(zip(prompts, seeds, strict=True)):
        items = []
        for run, mark in ((base, "base"), (latest, "now")):
            scores = {label: float(values[i]) for label, values in run["scores"].items()}
            items.append(GalleryImage(str(root / run["folder"] / run["images"][i]), scores[labels[0]], scores,
                                      mark if run is latest or base is not latest else "now",
                                      f"{mark}: step {run['step']}"))
        sections.append(GallerySection(prompt, items, note=f"seed {seed}"))
    write_sections(path, sections, labels, title, allowed_roots=[root], sort=False)
