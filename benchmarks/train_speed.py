"""Training throughput and peak memory of the full-size ImageReward architecture.

Runs a few optimizer steps of `rewardlab.train.Trainer` on synthetic 256-px T2I pairs (freeze ratio 0.7,
the recipe's setting) and prints pairs/s and peak memory: process RSS on CPU, and
torch.cuda.max_memory_allocated in bf16 on a GPU when one is present.

    python benchmarks/train_speed.py [--batch-size 8] [--steps 2]
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time

import numpy as np
import torch
from PIL import Image


def synthetic_pairs(count: int):
    from rewardlab.train import Pair

    rng = np.random.RandomState(0)
    images = [Image.fromarray((rng.rand(256, 256, 3) * 255).astype(np.uint8)) for _ in range(2 * count)]
    return [Pair(str(i), f"a photo number {i}", images[2 * i], f"a photo number {i}", images[2 * i + 1])
            for i in range(count)]


def measure(device: str, batch_size: int, steps: int, precision: str) -> tuple[float, float]:
    from rewardlab.train.trainer import TrainConfig, Trainer

    with tempfile.TemporaryDirectory() as tmp:
        config = TrainConfig(architecture="imagereward-v1.0", output_dir=tmp, freeze_ratio=0.7, batch_size=batch_size,
                             max_steps=steps + 1, eval_every=0, save_every=0, cpu=device == "cpu",
                             mixed_precision=precision, lr=1e-5)
        timings = []
        trainer = Trainer(config, [synthetic_pairs(batch_size * (steps + 1))],
                          step_callback=lambda step, _: timings.append(time.perf_counter()))
        trainer.save_model = lambda path: None  # time the steps, not the final checkpoint write
        trainer.save_state = lambda: None
        trainer.train()
    seconds = (timings[-1] - timings[0]) / steps  # the first step is warm-up
    return batch_size / seconds, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args()
    pps, seconds = measure("cpu", args.batch_size, args.steps, "no")
    rss_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"CPU fp32, batch {args.batch_size} pairs, freeze 0.7: {pps:.3f} pairs/s ({seconds:.1f} s/step), "
          f"peak RSS {rss_gib:.2f} GiB, torch threads {torch.get_num_threads()}")
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        pps, seconds = measure("cuda", args.batch_size, args.steps, "bf16")
        print(f"GPU bf16 ({torch.cuda.get_device_name()}), batch {args.batch_size}: {pps:.1f} pairs/s, "
              f"peak {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
    else:
        print("no GPU here: GPU bf16 figures not measured")


if __name__ == "__main__":
    main()
