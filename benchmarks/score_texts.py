"""One image x many captions: ``Scorer.score_texts`` (vision tower once) vs one full forward per caption.

Full-size ImageReward / CycleReward architectures with seeded random weights, 16 captions, fp32 CPU.
Prints seconds, the speed-up, and the largest score difference between the two paths.

    python benchmarks/score_texts.py [--captions 16] [--models imagereward-v1.0 cyclereward-i2t]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "imagereward"
CAPTIONS = ["a painting of an ocean with clouds and birds", "a red bicycle leaning on a wall", "two dogs in snow",
            "a city skyline at night", "a bowl of fruit on a wooden table", "an astronaut riding a horse",
            "a watercolor of a mountain lake", "a cat sleeping on a sofa", "a portrait of an old man",
            "a futuristic car in the desert", "a lighthouse in a storm", "children playing football",
            "a plate of sushi", "a castle on a hill at sunset", "a robot reading a book", "a field of sunflowers"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--captions", type=int, default=16)
    parser.add_argument("--models", nargs="*", default=["imagereward-v1.0", "cyclereward-i2t"])
    args = parser.parse_args()

    import numpy as np
    import torch

    import rewardlab
    from rewardlab.registry import get_spec
    from rewardlab.testing import make_random_checkpoint

    image = str(SHARED / "images" / "1.webp")
    captions = (CAPTIONS * (args.captions // len(CAPTIONS) + 1))[: args.captions]
    print(f"1 image x {len(captions)} captions, fp32, torch threads {torch.get_num_threads()}")
    print(f"{'model':<20}{'per-caption s':>15}{'score_texts s':>15}{'speed-up':>10}{'max |Δ|':>10}")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            scorer = rewardlab.load(name, checkpoint=make_random_checkpoint(Path(tmp) / f"{name}.safetensors",
                                                                            get_spec(name), seed=0))
            scorer.score_texts(image, captions[:2])  # warm-up
            start = time.perf_counter()
            separate = [scorer.score(caption, [image])[0] for caption in captions]
            per_caption = time.perf_counter() - start
            start = time.perf_counter()
            together = scorer.score_texts(image, captions)
            reused = time.perf_counter() - start
            deviation = float(np.abs(np.array(separate) - np.array(together)).max())
            print(f"{name:<20}{per_caption:>15.2f}{reused:>15.2f}{per_caption / reused:>9.1f}x{deviation:>10.1e}")


if __name__ == "__main__":
    sys.exit(main())
