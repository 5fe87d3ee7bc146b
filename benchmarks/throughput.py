"""Images/s of rewardlab vs the official image-reward package, measured in the same run.

Ranks 8 images for one prompt with ImageReward-v1.0 architecture and identical random weights:
official = its per-image fp32 loop (`inference_rank`), rewardlab = batched fp32 and bf16 autocast.
Prints images/s, the speed ratios, the score deviations (fp32 and bf16 vs official), and the fraction of
this machine's large-GEMM FLOP/s (measured in the same run) that the scorer reaches.

    python benchmarks/throughput.py [--repeats 3] [--batch-size 8] [--models clipscore-vit-l-14 ...]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data" / "imagereward"
PROMPT = "a painting of an ocean with clouds and birds, day time, low depth field effect"


def official_imagereward(python: str, checkpoint: Path, images: list[str], time_rank: int | None = None,
                         prompt: str = PROMPT) -> dict:
    """Run the official package in its venv on seeded random ImageReward weights: writes ``checkpoint`` (the
    official ``.pt`` format) and returns its scores (and ``rank_seconds`` with ``time_rank`` repeats)."""
    out = checkpoint.with_suffix(".ref.json")
    timing = [] if time_rank is None else ["--time-rank", str(time_rank)]
    subprocess.run([python, str(REPO / "rewardlab" / "testing" / "reference" / "official_ref.py"), "--model",
                    "imagereward", "--seed", "0", "--checkpoint", str(checkpoint), "--out", str(out), "--prompt",
                    prompt, *timing, *images], check=True, capture_output=True)
    return json.loads(out.read_text())


def eight_images(folder: Path) -> list[str]:
    """The 4 real example generations plus 4 real photos (or noise if scikit-image is absent)."""
    images = [str(SHARED / "images" / f"{i}.webp") for i in range(1, 5)]
    try:
        import skimage

        data = Path(skimage.__file__).parent / "data"
        images += [str(data / n) for n in ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg")]
    except ImportError:
        from PIL import Image

        for i in range(4):
            path = folder / f"noise{i}.png"
            Image.fromarray((np.random.RandomState(i).rand(512, 512, 3) * 255).astype(np.uint8)).save(path)
            images.append(str(path))
    return images


def time_rewardlab(scorer, images: list[str], batch_size: int, repeats: int) -> tuple[float, list[float]]:
    scores = scorer.rank(PROMPT, images, batch_size=batch_size).scores  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        scorer.rank(PROMPT, images, batch_size=batch_size)
    return len(images) * repeats / (time.perf_counter() - start), scores


def gemm_flops_per_second(dtype, size: int = 2048, repeats: int = 5) -> float:
    """This machine's large-GEMM throughput (FLOP/s) for ``dtype``: a square matmul, after a warm-up."""
    import torch

    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * size**3 * repeats / (time.perf_counter() - start)


def flops_per_image(scorer, images: list[str], batch_size: int) -> float:
    """FLOPs of one image through the model (matmuls, convolutions, attention), counted by torch."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        scorer.score(PROMPT, images[:batch_size], batch_size=batch_size)
    return counter.get_total_flops() / min(batch_size, len(images))


def extra_model_rows(names: list[str], images: list[str], batch_size: int, repeats: int, folder: Path) -> None:
    import rewardlab
    from rewardlab.registry import get_spec
    from rewardlab.testing import make_random_checkpoint

    for name in names:
        checkpoint = make_random_checkpoint(folder / f"{name}.safetensors", get_spec(name), seed=0)
        row = [name]
        for dtype in ("fp32", "bf16"):
            scorer = rewardlab.load(name, checkpoint=checkpoint, dtype=dtype)
            row.append(f"{time_rewardlab(scorer, images, batch_size, repeats)[0]:.2f}")
        print(f"{row[0]:<24} fp32 {row[1]:>7} img/s   bf16 {row[2]:>7} img/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--official-python", default=str(REPO / ".official-venv" / "bin" / "python"))
    parser.add_argument("--models", nargs="*", default=[],
                        help="extra registry models to time with random weights ('all' = every registered model)")
    args = parser.parse_args()

    import torch

    import rewardlab

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        images = eight_images(folder)
        checkpoint = folder / "ir.pt"
        ref = official_imagereward(args.official_python, checkpoint, images, time_rank=args.repeats)
        official_ips = len(images) / ref["rank_seconds"]

        rows = []
        from rewardlab.scoring.scorer import cpu_has_fast_bf16

        limits = {"fp32": gemm_flops_per_second(torch.float32)}
        if cpu_has_fast_bf16():
            limits["bf16"] = gemm_flops_per_second(torch.bfloat16)
        for dtype in ("fp32", "bf16"):
            scorer = rewardlab.load("imagereward-v1.0", checkpoint=checkpoint, dtype=dtype)
            ips, scores = time_rewardlab(scorer, images, args.batch_size, args.repeats)
            deviation = float(np.abs(np.array(scores) - np.array(ref["rank_scores"])).max())
            same_order = np.argsort(scores).tolist() == np.argsort(ref["rank_scores"]).tolist()
            rows.append((dtype, ips, deviation, same_order))
        flops = flops_per_image(rewardlab.load("imagereward-v1.0", checkpoint=checkpoint), images, args.batch_size)

        print(f"ImageReward-v1.0 architecture, {len(images)} images, 1 prompt, torch threads {torch.get_num_threads()}, "
              f"CPU {torch.backends.cpu.get_cpu_capability()}, bf16 hardware (AMX/AVX512-BF16): {cpu_has_fast_bf16()}")
        print(f"{'implementation':<28}{'img/s':>8}{'s/img':>8}{'vs official':>13}{'max |Δ|':>10}  ranking")
        print(f"{'official (fp32 loop)':<28}{official_ips:>8.2f}{1 / official_ips:>8.3f}{1.0:>12.2f}x{0.0:>10.1e}  reference")
        for dtype, ips, deviation, same_order in rows:
            label = f"rewardlab {dtype} b{args.batch_size}"
            print(f"{label:<28}{ips:>8.2f}{1 / ips:>8.3f}{ips / official_ips:>12.2f}x{deviation:>10.1e}  "
                  f"{'identical' if same_order else 'DIFFERENT'}")
        print(f"\nmodel FLOPs per image (torch FlopCounterMode): {flops / 1e9:.1f} GFLOP")
        for dtype, ips, _, _ in rows:
            if dtype == "bf16" and not cpu_has_fast_bf16():
                print("bf16: not applicable on this CPU (no AMX/AVX512-BF16: bf16 matrix products are emulated)")
                continue
            achieved = flops * ips
            print(f"{dtype}: machine GEMM limit {limits[dtype] / 1e9:.1f} GFLOP/s, scorer {achieved / 1e9:.1f} GFLOP/s "
                  f"= {achieved / limits[dtype]:.0%} of the limit")
        if args.models:
            from rewardlab import list_models

            names = list_models() if args.models == ["all"] else args.models
            print(f"\nper model, rewardlab, random weights, batch {args.batch_size}:")
            extra_model_rows(names, images, args.batch_size, args.repeats, folder)


if __name__ == "__main__":
    sys.exit(main())
