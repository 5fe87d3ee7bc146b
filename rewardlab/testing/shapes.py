"""A synthetic preference world: coloured shapes drawn with PIL, prompts that an image satisfies or not."""

from __future__ import annotations

import random

from PIL import Image, ImageDraw

COLOURS = {"red": (220, 30, 30), "green": (30, 190, 60), "blue": (40, 60, 230), "yellow": (235, 215, 30)}
SHAPES = ("circle", "square", "triangle")


def draw(colour: str, shape: str, rng: random.Random, size: int = 32) -> Image.Image:
    image = Image.new("RGB", (size, size), tuple(rng.randint(200, 255) for _ in range(3)))
    draw = ImageDraw.Draw(image)
    extent = rng.randint(size // 2, size - 6)
    x, y = rng.randint(2, size - extent - 2), rng.randint(2, size - extent - 2)
    draw_shape(draw, COLOURS[colour], shape, (x, y, x + extent, y + extent))
    return image


def draw_shape(draw: ImageDraw.ImageDraw, fill: tuple[int, int, int], shape: str, box: tuple[int, int, int, int]) -> None:
    """A filled circle, square or (upward) triangle inside ``box``."""
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([((x0 + x1) / 2, y0), (x0, y1), (x1, y1)], fill=fill)


def make_pairs(count: int, seed: int):
    """``count`` T2I pairs: an image drawn as the prompt says is preferred over one of another colour
    (and, 30% of the time, another shape too)."""
    from rewardlab.train import Pair

    rng = random.Random(seed)
    pairs = []
    for n in range(count):
        colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
        wrong_colour = rng.choice([c for c in COLOURS if c != colour])
        wrong_shape = rng.choice([s for s in SHAPES if s != shape]) if rng.random() < 0.3 else shape
        prompt = f"a {colour} {shape}"
        pairs.append(Pair(f"{seed}-{n}", prompt, draw(colour, shape, rng), prompt, draw(wrong_colour, wrong_shape, rng)))
    return pairs
