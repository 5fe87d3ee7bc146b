"""Pairs/s of `rewardlab eval`'s pipeline vs the official per-image loop, measured in the same run.

One prompt group of 8 images (28 ranked pairs), ImageReward-v1.0 architecture with identical random
weights. Official: `inference_rank` (fp32, one image at a time) then the pair loop. rewardlab:
`rewardlab.eval.evaluate` (batched scoring, no cache) in fp32; then again with a warm cache.

    python benchmarks/eval_speed.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import PROMPT, REPO, eight_images, official_imagereward  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--official-python", default=str(REPO / ".official-venv" / "bin" / "python"))
    args = parser.parse_args()

    import rewardlab
    from rewardlab.data import Group
    from rewardlab.eval import evaluate
    from rewardlab.eval.cache import ScoreCache

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        images = eight_images(folder)
        ranking = [1, 2, 3, 4, 5, 6, 7, 8]
        pairs = len(images) * (len(images) - 1) // 2
        checkpoint = folder / "ir.pt"
        official = official_imagereward(args.official_python, checkpoint, images, time_rank=args.repeats)
        official_pps = pairs / official["rank_seconds"]

        scorer = rewardlab.load("imagereward-v1.0", checkpoint=checkpoint, dtype="fp32")
        group = [Group("g", [PROMPT] * len(images), images, [float(r) for r in ranking])]
        evaluate(scorer, group, batch_size=8)  # warm-up
        start = time.perf_counter()
        for _ in range(args.repeats):
            result = evaluate(scorer, group, batch_size=8)
        ours_pps = pairs / ((time.perf_counter() - start) / args.repeats)
        cache = ScoreCache(folder / "cache.sqlite")
        evaluate(scorer, group, cache, batch_size=8)
        start = time.perf_counter()
        evaluate(scorer, group, cache, batch_size=8)
        cached_pps = pairs / (time.perf_counter() - start)

    print(f"{len(images)} images, {pairs} pairs, accuracy {result.metrics['accuracy']:.3f}")
    print(f"{'pipeline':<34}{'pairs/s':>10}{'vs official':>13}")
    print(f"{'official per-image loop (fp32)':<34}{official_pps:>10.2f}{1.0:>12.2f}x")
    print(f"{'rewardlab evaluate (fp32, b8)':<34}{ours_pps:>10.2f}{ours_pps / official_pps:>12.2f}x")
    print(f"{'rewardlab evaluate, warm cache':<34}{cached_pps:>10.0f}{cached_pps / official_pps:>12.0f}x")


if __name__ == "__main__":
    main()
