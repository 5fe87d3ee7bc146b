"""How good are cycle-consistency preferences? A synthetic world where the truth is known.

Prompts "a {colour} {shape}"; three "generators" draw the right colour/shape except at known error
rates; a pixel-reading captioner describes each image; SBERT (all-MiniLM-L6-v2, offline) compares the
caption with the prompt (T2I2T). We measure how often the cycle pairs agree with the ground-truth
preference (more attributes right wins), then train the same tiny reward model on cycle pairs and on
ground-truth pairs and compare their held-out accuracy against ground truth.

    python benchmarks/cycle_synthetic.py [--prompts 300] [--steps 300]
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from synthetic_shapes import COLOURS, SHAPES, draw  # noqa: E402

ERROR_RATES = {"careful": 0.1, "average": 0.3, "sloppy": 0.5}  # per attribute (colour, shape)


def generate(prompt_colour: str, prompt_shape: str, error: float, rng: random.Random):
    colour = prompt_colour if rng.random() > error else rng.choice([c for c in COLOURS if c != prompt_colour])
    shape = prompt_shape if rng.random() > error else rng.choice([s for s in SHAPES if s != prompt_shape])
    return draw(colour, shape, rng), (colour == prompt_colour) + (shape == prompt_shape)


def caption(image, rng: random.Random, error: float) -> str:
    """Nearest palette colour of the foreground, and the shape from how much of its bounding box it fills;
    with probability ``error`` each attribute is misread (a realistic, imperfect captioner)."""
    pixels = np.asarray(image, dtype=float)
    background = pixels[0, 0]
    mask = np.abs(pixels - background).sum(-1) > 60
    if mask.sum() < 4:
        return "an empty picture"
    mean = pixels[mask].mean(0)
    colour = min(COLOURS, key=lambda c: np.sum((mean - np.array(COLOURS[c])) ** 2))
    ys, xs = np.nonzero(mask)
    fill = mask.sum() / ((np.ptp(ys) + 1) * (np.ptp(xs) + 1))
    shape = "square" if fill > 0.9 else "circle" if fill > 0.65 else "triangle"
    if rng.random() < error:
        colour = rng.choice([c for c in COLOURS if c != colour])
    if rng.random() < error:
        shape = rng.choice([s for s in SHAPES if s != shape])
    return f"a {colour} {shape}"


def build(prompts: int, seeds: int, seed: int, captioner_error: float = 0.0):
    """Candidates per prompt: (generator, seed, image, true attribute count, caption)."""
    rng = random.Random(seed)
    world = []
    for n in range(prompts):
        colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
        prompt = f"a {colour} {shape}"
        candidates = []
        for name, error in ERROR_RATES.items():
            for s in range(seeds):
                image, correct = generate(colour, shape, error, random.Random(hash((seed, n, name, s)) & 0xFFFFFFFF))
                candidates.append((name, s, image, correct, caption(image, rng, captioner_error)))
        world.append((f"{seed}-{n}", prompt, candidates))
    return world


def truth_pairs(world) -> list:
    """Ground-truth pairs: every two candidates of a prompt where one has more attributes right."""
    from rewardlab.train import Pair

    pairs = []
    for input_id, prompt, candidates in world:
        for i in range(len(candidates)):
            for j in range(i + 1, len(candidates)):
                a, b = candidates[i], candidates[j]
                if a[3] != b[3]:
                    good, bad = (a, b) if a[3] > b[3] else (b, a)
                    pairs.append(Pair(input_id, prompt, good[2], prompt, bad[2]))
    return pairs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=300)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--captioner-error", type=float, default=0.15, help="chance the captioner misreads an attribute")
    args = parser.parse_args()

    from rewardlab.api import spec_to_json
    from rewardlab.cycle import Candidate, PairRules, PairStats, SbertSimilarity, build_pairs
    from rewardlab.testing import tiny_blip_spec
    from rewardlab.train import Pair
    from rewardlab.train.trainer import TrainConfig, Trainer

    sbert = SbertSimilarity()
    world = build(args.prompts, args.seeds, seed=1, captioner_error=args.captioner_error)
    cycle_pairs, agree, judged = [], 0, 0
    stats = PairStats()
    for input_id, prompt, candidates in world:
        scores = sbert([prompt] * len(candidates), [c[4] for c in candidates])
        by_key = {(c[0], c[1]): c for c in candidates}
        cands = [Candidate(input_id, c[0], c[1], f"{c[0]}/{c[1]}", s) for c, s in zip(candidates, scores, strict=True)]
        for good, bad in build_pairs(cands, PairRules(higher_is_better=True, margin=0.005, floor=0.4), stats):
            g, b = by_key[(good.model, good.seed)], by_key[(bad.model, bad.seed)]
            cycle_pairs.append(Pair(input_id, prompt, g[2], prompt, b[2]))
            if g[3] != b[3]:
                judged += 1
                agree += g[3] > b[3]
    train_truth = truth_pairs(world)
    test_pairs = truth_pairs(build(100, args.seeds, seed=2))

    print(f"{args.prompts} prompts x {len(ERROR_RATES)} generators x {args.seeds} seeds = {stats.candidates} candidates; "
          f"generator error rates {ERROR_RATES}, captioner error {args.captioner_error}")
    print(f"cycle pairs kept {stats.kept}; dropped {dict(stats.dropped)}")
    print(f"cycle preference agrees with ground truth on {agree}/{judged} = {agree / max(judged, 1):.3f} of the pairs "
          f"where the truth has a preference ({stats.kept - judged} cycle pairs are between equally correct images)")

    rng = random.Random(0)
    budget = min(len(cycle_pairs), len(train_truth))
    results = {}
    for label, pairs in (("cycle pairs", cycle_pairs), ("ground-truth pairs", train_truth)):
        subset = rng.sample(pairs, budget)
        with tempfile.TemporaryDirectory() as tmp:
            config = TrainConfig(spec_json=spec_to_json(tiny_blip_spec("gelu")), output_dir=tmp, freeze_ratio=0.0,
                                 lr=1e-3, batch_size=32, max_steps=args.steps, warmup_steps=10, eval_every=0,
                                 save_every=0, seed=0, cpu=True)
            trainer = Trainer(config, [subset], test_pairs)
            trainer.train()
            results[label] = trainer.validate()["valid_accuracy"]
    print(f"tiny reward model, {budget} training pairs each, {args.steps} steps, held-out ground-truth pairs "
          f"({len(test_pairs)}):")
    for label, accuracy in results.items():
        print(f"  trained on {label:<20} held-out accuracy {accuracy:.3f}")


if __name__ == "__main__":
    main()
