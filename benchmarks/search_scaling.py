"""Reward against denoiser budget (NFEs) for best-of-N, random search and zero-order search.

The tiny offline diffusers pipeline (``rewardlab.testing.diffusion.tiny_pipeline``) generates; the
verifier is a tiny BLIP reward with fixed random weights (or ``--reward NAME_OR_CHECKPOINT``). Every method
runs through ``rewardlab.search.run_search``; a noise seen twice (best-of-N and random search draw the same
seeded noises) is generated once. For each method the mean over prompts of the best score after each
round is plotted against the NFEs spent (PNG) and tabulated (Markdown); the table also gives best-of-N at
the NFEs each other method spent (interpolated on N), so "beats best-of-N at equal NFEs" can be read off.

    python benchmarks/search_scaling.py [--prompts 8] [--steps 4] [--out benchmarks/out/search_scaling]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

PROMPTS = ["a red circle", "a blue square", "a green triangle", "a yellow star", "two cats on a sofa",
           "a castle at dawn", "a bowl of fruit", "a city street in rain", "a sailing boat", "a snowy forest",
           "an astronaut riding a horse", "a cup of coffee"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=6)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--max-n", type=int, default=16, help="Largest best-of-N (powers of two from 1).")
    parser.add_argument("--zo-rounds", type=int, default=5)
    parser.add_argument("--neighbors", type=int, default=4)
    parser.add_argument("--threshold", type=float, default=0.95)
    parser.add_argument("--reward", default=None, help="Verifier (default: a tiny random BLIP reward, seed 0).")
    parser.add_argument("--out", default="benchmarks/out/search_scaling")
    args = parser.parse_args()

    import torch

    import rewardlab
    from rewardlab.scoring.ensemble import RewardEnsemble
    from rewardlab.search import DiffusersGenerator, PromptItem, SearchConfig, run_search
    from rewardlab.testing import make_random_checkpoint
    from rewardlab.testing.diffusion import tiny_pipeline

    torch.set_num_threads(max(1, torch.get_num_threads()))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="search_scaling."))
    reward = args.reward or make_random_checkpoint(work / "tiny-reward.safetensors", seed=0)
    ensemble = RewardEnsemble([rewardlab.load(reward)])
    pipe = tiny_pipeline(work / "pipe", seed=0)

    class Cached(DiffusersGenerator):
        cache: dict = {}

        def generate(self, prompt, noises):
            keys = [(prompt, n.numpy().tobytes()) for n in noises]
            missing = [i for i, k in enumerate(keys) if k not in self.cache]
            if missing:
                for i, image in zip(missing, super().generate(prompt, noises[missing]), strict=True):
                    self.cache[keys[i]] = image
                self.spent += self.nfe_of(len(missing))
            self.nfe += self.nfe_of(len(keys) - len(missing))  # a cached image costs what generating it cost
            return [self.cache[k] for k in keys]

    generator = Cached(pipe, num_inference_steps=args.steps, guidance_scale=1.0)
    generator.spent = 0
    generator.nfe_of = lambda n: n * args.steps
    items = [PromptItem(p, f"p{i}") for i, p in enumerate(PROMPTS[: args.prompts])]
    started = time.perf_counter()

    def search(name: str, **settings) -> list[dict]:
        """One run per prompt with its own seed block (the tiny pipeline barely reacts to the prompt, so
        shared seeds would repeat one experiment); returns the round rows of all prompts."""
        rows = []
        for k, item in enumerate(items):
            run_search(generator, ensemble, [item], work / name / item.prompt_id,
                       SearchConfig(seed=10_000 * k, batch_size=16, **settings), gallery=False)
            rows += [json.loads(line) for line in (work / name / item.prompt_id / "rounds.jsonl").read_text().splitlines()]
        return rows

    def curve(rows: list[dict]) -> list[tuple[float, float]]:
        by_round: dict[int, list[dict]] = {}
        for row in rows:
            by_round.setdefault(row["search_round"], []).append(row)
        return [(float(np.mean([r["nfe"] for r in group])), float(np.mean([r["best_score"] for r in group])))
                for _, group in sorted(by_round.items())]

    curves: dict[str, list[tuple[float, float]]] = {"best-of-N": []}
    n = 1
    while n <= args.max_n:
        curves["best-of-N"] += curve(search(f"bon{n}", num_candidates=n))
        n *= 2
    rounds = int(np.log2(args.max_n + 2)) - 1
    curves["random"] = curve(search("random", method="random", rounds=rounds))
    curves["zero-order"] = curve(search("zero-order", method="zero-order", rounds=args.zo_rounds,
                                        num_neighbors=args.neighbors, threshold=args.threshold))
    elapsed = time.perf_counter() - started

    bon_x = np.log2([x for x, _ in curves["best-of-N"]])
    bon_y = [y for _, y in curves["best-of-N"]]

    def bon_at(nfe: float) -> float:
        return float(np.interp(np.log2(nfe), bon_x, bon_y))

    lines = ["| method | round | NFEs / prompt | mean best reward | best-of-N at equal NFEs | difference |",
             "|---|---|---|---|---|---|"]
    for method, points in curves.items():
        for k, (nfe, score) in enumerate(points):
            ref = bon_at(nfe)
            lines.append(f"| {method} | {k} | {nfe:g} | {score:.4f} | {ref:.4f} | {score - ref:+.4f} |")
    table = "\n".join(lines)
    (out / "search_scaling.md").write_text(table + "\n")
    (out / "search_scaling.json").write_text(json.dumps({"curves": curves, "prompts": len(items),
                                                         "steps": args.steps, "seconds": elapsed}, indent=1))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for method, points in curves.items():
        ax.plot([x for x, _ in points], [y for _, y in points], marker="o", label=method)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("NFEs per prompt (denoiser evaluations)")
    ax.set_ylabel("mean best reward over prompts")
    ax.set_title(f"search scaling: tiny pipeline, {len(items)} prompts, {args.steps} steps")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "search_scaling.png", dpi=120)
    print(table)
    print(f"\n{len(items)} prompts, {generator.spent} NFEs generated in {elapsed:.1f} s; "
          f"plot: {out / 'search_scaling.png'}")


if __name__ == "__main__":
    main()
