"""A compositional synthetic world for cycle-consistency experiments: prompts such as "a red circle
left of a blue square", generators that draw them with known error rates, and a captioner that reads
the scene back from the pixels. Everything is seeded, so runs repeat exactly."""

from __future__ import annotations

import random
import re
import zlib
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from .shapes import draw_shape

COLOURS = {"red": (220, 30, 30), "green": (30, 190, 60), "blue": (40, 60, 230), "yellow": (235, 215, 30)}
SHAPES = ("circle", "square", "triangle")
RELATIONS = ("left of", "above")  # the first object is left of / above the second
SIZE = 64
_PROMPT = re.compile(r"^a (\w+) (\w+) (left of|above) a (\w+) (\w+)$")


def stable_rng(*parts) -> random.Random:
    """A generator seeded from the parts' text (Python's ``hash`` of a str changes every process)."""
    return random.Random(zlib.crc32("|".join(map(str, parts)).encode()))


@dataclass(frozen=True)
class Scene:
    first: tuple[str, str]  # (colour, shape)
    second: tuple[str, str]
    relation: str

    @property
    def prompt(self) -> str:
        return f"a {self.first[0]} {self.first[1]} {self.relation} a {self.second[0]} {self.second[1]}"

    @classmethod
    def parse(cls, prompt: str) -> Scene:
        match = _PROMPT.match(prompt)
        if not match:
            raise ValueError(f"not a scene prompt: {prompt!r}")
        c1, s1, relation, c2, s2 = match.groups()
        return cls((c1, s1), (c2, s2), relation)

    @classmethod
    def random(cls, rng: random.Random) -> Scene:
        c1, c2 = rng.sample(list(COLOURS), 2)
        return cls((c1, rng.choice(SHAPES)), (c2, rng.choice(SHAPES)), rng.choice(RELATIONS))


@dataclass(frozen=True)
class Drawn:
    """What a generator actually drew for a prompt: the two objects and whether their order is flipped."""

    first: tuple[str, str]
    second: tuple[str, str]
    relation: str
    flipped: bool

    def correct(self, asked: Scene) -> int:
        """How many of the 5 attributes (2 colours, 2 shapes, the relation) match the prompt."""
        return ((self.first[0] == asked.first[0]) + (self.first[1] == asked.first[1])
                + (self.second[0] == asked.second[0]) + (self.second[1] == asked.second[1]) + (not self.flipped))


def _draw_shape(draw: ImageDraw.ImageDraw, colour: str, shape: str, box: tuple[int, int, int, int]) -> None:
    draw_shape(draw, COLOURS[colour], shape, box)


def render(drawn: Drawn, rng: random.Random) -> Image.Image:
    """Both objects in their own half of a SIZE×SIZE canvas (left/right or top/bottom), random size and
    place along the relation's axis, near the middle across it."""
    image = Image.new("RGB", (SIZE, SIZE), tuple(rng.randint(215, 255) for _ in range(3)))
    draw = ImageDraw.Draw(image)
    objects = [drawn.second, drawn.first] if drawn.flipped else [drawn.first, drawn.second]
    half = SIZE // 2
    for slot, (colour, shape) in enumerate(objects):
        extent = rng.randint(14, half - 6)
        along = slot * half + rng.randint(2, half - extent - 2)
        across = half - extent // 2 + rng.randint(-5, 5)  # near the middle: the relation stays unambiguous
        x, y = (along, across) if drawn.relation == "left of" else (across, along)
        _draw_shape(draw, colour, shape, (x, y, x + extent, y + extent))
    return image


class SceneGenerator:
    """A "text-to-image model" that gets each attribute wrong with probability ``error`` (a colour
    unused by the prompt, another shape, or the two objects swapped). ``truth`` records, for every
    (prompt, seed) it drew, how many attributes are right."""

    def __init__(self, name: str, error: float):
        self.name, self.error = name, error
        self.params = {"error_rate": error}
        self.truth: dict[tuple[str, int], int] = {}

    def draw(self, prompt: str, seed: int) -> tuple[Image.Image, int]:
        asked, rng = Scene.parse(prompt), stable_rng(self.name, prompt, seed)
        spare = [c for c in COLOURS if c not in (asked.first[0], asked.second[0])]

        def maybe(obj: tuple[str, str], spare_colour: str) -> tuple[str, str]:
            colour = spare_colour if rng.random() < self.error else obj[0]
            shape = rng.choice([s for s in SHAPES if s != obj[1]]) if rng.random() < self.error else obj[1]
            return colour, shape

        drawn = Drawn(maybe(asked.first, spare[0]), maybe(asked.second, spare[1]), asked.relation,
                      rng.random() < self.error)
        return render(drawn, rng), drawn.correct(asked)

    def generate(self, prompts: list[str], seed: int) -> list[Image.Image]:
        images = []
        for prompt in prompts:
            image, correct = self.draw(prompt, seed)
            self.truth[(prompt, seed)] = correct
            images.append(image)
        return images


class PixelCaptioner:
    """Reads the two largest foreground blobs: colour = nearest palette colour of the mean, shape =
    how much of its bounding box it fills (square ≈ 1, circle ≈ 0.79, triangle ≈ 0.5), relation = the
    axis along which the centres differ most; the left/top object is named first. With probability
    ``error`` each of the 5 attributes is misread (seeded by the image bytes)."""

    name = "pixel-captioner"

    def __init__(self, error: float = 0.0):
        self.error = error
        self.params = {"error_rate": error}

    def read(self, image: Image.Image) -> str:
        from scipy import ndimage

        pixels = np.asarray(image.convert("RGB"), dtype=float)
        mask = np.abs(pixels - pixels[0, 0]).sum(-1) > 60
        labels, count = ndimage.label(mask)
        if count == 0:
            return "an empty picture"
        sizes = ndimage.sum(mask, labels, range(1, count + 1))
        blobs = []
        for label in (np.argsort(sizes)[::-1][:2] + 1):
            ys, xs = np.nonzero(labels == label)
            mean = pixels[ys, xs].mean(0)
            colour = min(COLOURS, key=lambda c: np.sum((mean - np.array(COLOURS[c])) ** 2))
            fill = len(ys) / ((np.ptp(ys) + 1) * (np.ptp(xs) + 1))
            shape = "square" if fill > 0.9 else "circle" if fill > 0.65 else "triangle"
            blobs.append([colour, shape, xs.mean(), ys.mean()])
        rng = stable_rng(self.name, zlib.crc32(image.tobytes()))
        for blob in blobs:
            if rng.random() < self.error:
                blob[0] = rng.choice([c for c in COLOURS if c != blob[0]])
            if rng.random() < self.error:
                blob[1] = rng.choice([s for s in SHAPES if s != blob[1]])
        if len(blobs) == 1:
            return f"a {blobs[0][0]} {blobs[0][1]}"
        (a, b) = blobs
        horizontal = abs(a[2] - b[2]) >= abs(a[3] - b[3])
        axis = 2 if horizontal else 3
        first, second = (a, b) if a[axis] <= b[axis] else (b, a)
        if rng.random() < self.error:
            first, second = second, first
        return f"a {first[0]} {first[1]} {'left of' if horizontal else 'above'} a {second[0]} {second[1]}"

    def caption(self, images: list[Image.Image]) -> list[str]:
        return [self.read(image) for image in images]
