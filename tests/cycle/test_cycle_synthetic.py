"""The synthetic scene world behind benchmarks/cycle_synthetic.py: its captioner reads error-free
scenes exactly, its generators err at their stated rates, and runs repeat exactly."""

from __future__ import annotations

import random

import numpy as np

from rewardlab.testing.scenes import Drawn, PixelCaptioner, Scene, SceneGenerator, render, stable_rng


def test_error_free_scenes_are_read_back_word_for_word():
    rng = random.Random(0)
    prompts = [Scene.random(rng).prompt for _ in range(150)]
    generator = SceneGenerator("perfect", 0.0)
    captions = PixelCaptioner(0.0).caption(generator.generate(prompts, seed=3))
    assert captions == prompts
    assert set(generator.truth.values()) == {5}


def test_a_flipped_scene_is_read_with_the_objects_swapped():
    asked = Scene(("red", "circle"), ("blue", "square"), "left of")
    image = render(Drawn(asked.first, asked.second, asked.relation, flipped=True), stable_rng(1))
    assert PixelCaptioner().read(image) == "a blue square left of a red circle"
    assert Drawn(asked.first, ("green", "square"), "left of", flipped=True).correct(asked) == 3


def test_generator_errors_follow_their_rate_and_repeat_exactly():
    rng = random.Random(1)
    prompts = [Scene.random(rng).prompt for _ in range(400)]
    generator = SceneGenerator("average", 0.25)
    images = generator.generate(prompts, seed=0)
    wrong = [5 - generator.truth[(p, 0)] for p in prompts]
    assert abs(np.mean(wrong) / 5 - 0.25) < 0.03  # 2000 Bernoulli(0.25) draws: sd 0.01
    again = SceneGenerator("average", 0.25).generate(prompts[:5], seed=0)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(images, again, strict=False))
    assert not np.array_equal(np.asarray(images[0]), np.asarray(generator.generate(prompts[:1], seed=1)[0]))


def test_captioner_misreads_at_its_rate():
    rng = random.Random(2)
    prompts = [Scene.random(rng).prompt for _ in range(300)]
    images = SceneGenerator("perfect", 0.0).generate(prompts, seed=0)
    captions = PixelCaptioner(0.2).caption(images)
    exact = np.mean([c == p for c, p in zip(captions, prompts, strict=True)])
    assert abs(exact - 0.8**5) < 0.07  # all 5 attributes read right: 0.328
    assert PixelCaptioner(0.2).caption(images[:10]) == captions[:10]  # seeded by the image itself
