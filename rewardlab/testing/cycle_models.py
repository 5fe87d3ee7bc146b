"""Tiny captioners and generators with known behaviour, for cycle-consistency tests: a captioner that names
the mean colour, one that always says the same thing, and a generator that paints the named colour."""

from __future__ import annotations

import numpy as np
from PIL import Image

NAMED = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "white": (255, 255, 255), "black": (0, 0, 0)}


class PixelCaptioner:
    """Reads the mean colour and names the nearest basic colour."""

    name = "pixel-captioner"
    params = {"rule": "nearest mean colour"}

    def caption(self, images):
        out = []
        for image in images:
            mean = np.asarray(image.convert("RGB"), dtype=float).reshape(-1, 3).mean(0)
            name = min(NAMED, key=lambda n: np.sum((mean - np.array(NAMED[n])) ** 2))
            out.append(f"a {name} picture")
        return out


class FixedCaptioner:
    def __init__(self, name, text):
        self.name, self.text = name, text

    def caption(self, images):
        return [self.text for _ in images]


class PaintGenerator:
    """Paints the colour named in the prompt; fails after ``fail_after`` calls (to simulate a crash)."""

    def __init__(self, name="paint", fail_after=None):
        self.name, self.calls, self.fail_after = name, 0, fail_after
        self.params = {"size": 16}

    def generate(self, prompts, seed):
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise RuntimeError("simulated crash")
        rng = np.random.RandomState(seed)
        images = []
        for prompt in prompts:
            colour = next((NAMED[w] for w in prompt.split() if w in NAMED), (128, 128, 128))
            noise = rng.randint(-40, 40, size=(16, 16, 3))
            images.append(Image.fromarray(np.clip(np.array(colour) + noise, 0, 255).astype(np.uint8)))
        return images
