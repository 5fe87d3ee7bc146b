"""How good are cycle-consistency preferences? A synthetic world where the truth is known.

Prompts such as "a red circle left of a blue square"; three "generators" draw them but get each of
the 5 attributes (2 colours, 2 shapes, the relation) wrong at known rates; a pixel-reading captioner
describes each image (misreading each attribute at a set rate); SBERT all-MiniLM-L6-v2 (offline)
compares caption and prompt. The data go through the real pipeline (``run_t2i2t`` -> manifest ->
``export_pairs`` -> pair files -> ``load_pair_file``). We report how often the cycle preference agrees
with the ground truth (more attributes right wins), broken down by what differs, and the held-out
accuracy of the same tiny reward model trained on cycle pairs and on ground-truth pairs.

    python benchmarks/cycle_synthetic.py [--prompts 300] [--steps 300] [--train-seeds 2] [--margin 0.005]
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

from rewardlab.testing.scenes import PixelCaptioner, Scene, SceneGenerator  # noqa: E402

ERROR_RATES = {"careful": 0.1, "average": 0.25, "sloppy": 0.5}  # per attribute


def truth_pairs(prompts: list[str], generators: list[SceneGenerator], seeds: list[int], images) -> list:
    """Every two candidates of a prompt where one has more attributes right; ``images(gen, prompt, seed)``."""
    from rewardlab.train import Pair

    pairs = []
    for n, prompt in enumerate(prompts):
        candidates = [(g, s, g.truth[(prompt, s)]) for g in generators for s in seeds]
        for i in range(len(candidates)):
            for j in range(i + 1, len(candidates)):
                (ga, sa, ta), (gb, sb, tb) = candidates[i], candidates[j]
                if ta != tb:
                    (gw, sw), (gl, sl) = ((ga, sa), (gb, sb)) if ta > tb else ((gb, sb), (ga, sa))
                    pairs.append(Pair(str(n), prompt, images(gw, prompt, sw), prompt, images(gl, prompt, sl)))
    return pairs


def train_and_test(train_pairs, test_pairs, steps: int, seed: int) -> float:
    from rewardlab.scoring.loader import spec_to_json
    from rewardlab.testing import tiny_blip_spec
    from rewardlab.train.trainer import TrainConfig, Trainer

    with tempfile.TemporaryDirectory() as tmp:
        config = TrainConfig(spec_json=spec_to_json(tiny_blip_spec("gelu")), output_dir=tmp, freeze_ratio=0.0,
                             lr=1e-3, batch_size=32, max_steps=steps, warmup_steps=10, eval_every=0,
                             save_every=0, seed=seed, cpu=True)
        trainer = Trainer(config, [train_pairs], test_pairs)
        trainer.train()
        return trainer.validate()["valid_accuracy"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=300)
    parser.add_argument("--test-prompts", type=int, default=100)
    parser.add_argument("--seeds", type=int, default=2, help="images per generator and prompt")
    parser.add_argument("--steps", type=int, default=300, help="training steps; 0 skips the training comparison")
    parser.add_argument("--train-seeds", type=int, default=2, help="training runs per data source")
    parser.add_argument("--margin", type=float, default=0.005, help="pair margin of the cycle pairs used for training")
    parser.add_argument("--captioner-error", type=float, default=0.1, help="chance the captioner misreads an attribute")
    args = parser.parse_args()

    from rewardlab.cycle import CycleInput, PairRules, SbertSimilarity, export_pairs, run_t2i2t
    from rewardlab.train import load_pair_file

    rng = random.Random(1)
    prompts = [Scene.random(rng).prompt for _ in range(args.prompts)]
    generators = [SceneGenerator(name, error) for name, error in ERROR_RATES.items()]
    seeds = list(range(args.seeds))
    captioner = PixelCaptioner(args.captioner_error)
    with tempfile.TemporaryDirectory() as tmp:
        run, out = Path(tmp) / "run", Path(tmp) / "pairs"
        start = time.perf_counter()
        manifest = run_t2i2t([CycleInput(str(n), p) for n, p in enumerate(prompts)], generators, captioner,
                             SbertSimilarity(), seeds, run, batch_size=64)
        stats, counts = export_pairs(run, out, PairRules(higher_is_better=True, margin=args.margin, floor=0.4))
        elapsed = time.perf_counter() - start
        rows = {(r["input"], r["model"], r["seed"]): r for r in manifest.rows.values()}
        import json

        cycle_rows = [json.loads(line) for split in ("train", "valid", "test")
                      for line in (out / f"{split}.jsonl").read_text().splitlines()]
        cycle_pairs = [p for split in ("train", "valid", "test") for p in load_pair_file(out / f"{split}.jsonl", allow_outside=True)]
        by_name = {g.name: g for g in generators}
        agree = judged = 0
        by_kind: dict[str, list[int]] = {}
        for row in cycle_rows:
            good = by_name[row["preferred_model"]].truth[(row["prompt"], row["preferred_seed"])]
            bad = by_name[row["rejected_model"]].truth[(row["prompt"], row["rejected_seed"])]
            if good == bad:
                continue
            judged += 1
            agree += good > bad
            # what differs: the relation alone (same objects, one flipped) or the objects
            a = rows[(row["prompt"], row["preferred_model"], row["preferred_seed"])]["reconstruction"]
            b = rows[(row["prompt"], row["rejected_model"], row["rejected_seed"])]["reconstruction"]
            kind = "word order only" if sorted(a.split()) == sorted(b.split()) else "words differ"
            by_kind.setdefault(kind, [0, 0])
            by_kind[kind][0] += good > bad
            by_kind[kind][1] += 1

        def image_of(generator, prompt, seed):
            return str(run / rows[(prompt, generator.name, seed)]["output"])

        train_truth = truth_pairs(prompts, generators, seeds, image_of)

        test_rng = random.Random(2)
        test_prompts = [Scene.random(test_rng).prompt for _ in range(args.test_prompts)]
        test_generators = [SceneGenerator(name, error) for name, error in ERROR_RATES.items()]
        test_images = {(g.name, p, s): g.generate([p], s)[0] for g in test_generators for p in test_prompts
                       for s in seeds}
        test_pairs = truth_pairs(test_prompts, test_generators, seeds, lambda g, p, s: test_images[(g.name, p, s)])

        print(f"{args.prompts} prompts x {len(generators)} generators x {args.seeds} seeds = {stats.candidates} "
              f"candidates; generator error rates per attribute {ERROR_RATES}; captioner error {args.captioner_error}; "
              f"cycle run + export {elapsed:.1f} s")
        print(f"cycle pairs kept {stats.kept} (train/valid/test {counts['train']}/{counts['valid']}/{counts['test']}); "
              f"dropped {dict(stats.dropped)}")
        print(f"cycle preference agrees with ground truth on {agree}/{judged} = {agree / max(judged, 1):.3f} of the "
              f"pairs where the truth has a preference ({stats.kept - judged} kept pairs are between equally correct "
              f"images)")
        for kind, (right, total) in sorted(by_kind.items()):
            print(f"  captions with {kind:<16} {right}/{total} = {right / max(total, 1):.3f}")

        print("margin sweep (same manifest, other PairRules):")
        for margin in (0.005, 0.02, 0.05, 0.1):
            sweep_stats, _ = export_pairs(run, Path(tmp) / f"sweep-{margin}", PairRules(True, margin, 0.4))
            right = wrong = equal = 0
            for split in ("train", "valid", "test"):
                for line in (Path(tmp) / f"sweep-{margin}" / f"{split}.jsonl").read_text().splitlines():
                    row = json.loads(line)
                    good = by_name[row["preferred_model"]].truth[(row["prompt"], row["preferred_seed"])]
                    bad = by_name[row["rejected_model"]].truth[(row["prompt"], row["rejected_seed"])]
                    right, wrong, equal = right + (good > bad), wrong + (good < bad), equal + (good == bad)
            print(f"  margin {margin:<5} kept {sweep_stats.kept:>5}: agrees {right / max(right + wrong, 1):.3f}, "
                  f"equally correct {equal / max(sweep_stats.kept, 1):.3f}, right among all kept "
                  f"{right / max(sweep_stats.kept, 1):.3f}")

        if args.steps <= 0:
            return
        budget = min(len(cycle_pairs), len(train_truth))
        sample = random.Random(0)
        results = {}
        for label, pairs in (("cycle pairs", cycle_pairs), ("ground-truth pairs", train_truth)):
            subset = sample.sample(pairs, budget)
            results[label] = [train_and_test(subset, test_pairs, args.steps, seed) for seed in range(args.train_seeds)]
    print(f"tiny reward model (tiny_blip_spec, GELU head), {budget} training pairs each, {args.steps} steps, "
          f"held-out ground-truth pairs ({len(test_pairs)}) of {args.test_prompts} new prompts:")
    for label, accuracies in results.items():
        mean = sum(accuracies) / len(accuracies)
        print(f"  trained on {label:<20} held-out accuracy {mean:.3f} "
              f"(runs: {', '.join(f'{a:.3f}' for a in accuracies)})")


if __name__ == "__main__":
    main()
