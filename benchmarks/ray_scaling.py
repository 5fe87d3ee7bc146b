"""Images/s of `rewardlab score --ray` with 1 and 2 workers against the single-process Scorer, same run.

Scores a JSONL manifest of random PNGs with random weights (tiny BLIP reward by default, or any
registry architecture). Each Ray configuration is timed on two manifest sizes, so its wall-clock splits
into a fixed part (actor start, model load, scheduling) and a per-image part:

    T(N) = fixed + N * per_image        (per_image from the two sizes)

The Ray overhead per image is per_image(1 worker) - 1 / baseline img/s with the same number of torch
threads. Ray start-up (local instance) is timed separately and is not part of any T(N). The end of the
output projects the wall-clock of N images on W workers (``--project-images``, ``--project-workers``)
from these figures and a per-worker throughput (``--project-ips``, default: the one measured here).

    python benchmarks/ray_scaling.py [--model tiny|imagereward-v1.0|...] [--images 512] [--size 256]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def make_manifest(folder: Path, count: int, size: int, name: str) -> Path:
    rng = np.random.RandomState(0)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(count):
        path = folder / "images" / f"{i}.png"
        if not path.exists():
            from PIL import Image

            base = rng.rand(size // 8, size // 8, 3)  # smooth-ish content: realistic PNG sizes
            image = Image.fromarray((base * 255).astype(np.uint8)).resize((size, size))
            image.save(path)
        lines.append(json.dumps({"prompt": f"a generated picture number {i % 50}", "image": f"images/{i}.png"}))
    manifest = folder / name
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


def time_single(checkpoint: str, manifest: Path, batch_size: int, threads: int) -> float:
    """img/s of one process: Scorer.score_detailed over the manifest's rows (after a warm-up batch)."""
    import torch

    import rewardlab

    torch.set_num_threads(threads)
    scorer = rewardlab.load(checkpoint)
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    prompts = [r["prompt"] for r in rows]
    images = [str(manifest.parent / r["image"]) for r in rows]
    scorer.score_detailed(prompts[:batch_size], images[:batch_size], batch_size=batch_size)
    start = time.perf_counter()
    result = scorer.score_detailed(prompts, images, batch_size=batch_size)
    elapsed = time.perf_counter() - start
    assert not result.errors, result.errors
    return len(rows) / elapsed


def time_ray(checkpoint: str, manifest: Path, output: Path, batch_size: int, workers: int, cpus: int,
             shard_rows: int) -> float:
    from rewardlab.integrations import ray as rr

    shutil.rmtree(output, ignore_errors=True)
    start = time.perf_counter()
    result = rr.score_manifest(manifest, output, checkpoint, batch_size=batch_size, workers=workers,
                               cpus_per_worker=cpus, shard_rows=shard_rows, progress=False)
    elapsed = time.perf_counter() - start
    assert result.errors == 0 and result.shards_scored == result.shards
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help="'tiny' (32 px BLIP reward) or a registry architecture")
    parser.add_argument("--images", type=int, default=2048, help="large manifest size (the small one is 1/4)")
    parser.add_argument("--repeats", type=int, default=3, help="each figure is the best of this many runs")
    parser.add_argument("--size", type=int, default=256, help="image side in pixels")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--shard-rows", type=int, default=64)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--threads-per-worker", type=int, default=1,
                        help="torch threads (and Ray CPUs) per worker; the baseline runs with as many")
    parser.add_argument("--project-images", type=float, default=1e6)
    parser.add_argument("--project-workers", type=int, default=8)
    parser.add_argument("--project-ips", type=float, default=None,
                        help="per-worker img/s for the projection (e.g. measured on one GPU); default: measured here")
    args = parser.parse_args()

    import ray

    import rewardlab
    from rewardlab.integrations import ray as rr
    from rewardlab.registry import get_spec
    from rewardlab.testing import make_random_checkpoint

    cores = os.cpu_count() or 1
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "?")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        spec = None if args.model == "tiny" else get_spec(args.model)
        checkpoint = make_random_checkpoint(folder / "model.safetensors", spec, seed=0)
        small_count = max(args.batch_size, args.images // 4)
        small = make_manifest(folder, small_count, args.size, "small.jsonl")
        large = make_manifest(folder, args.images, args.size, "large.jsonl")
        label = rewardlab.load(checkpoint).name
        print(f"model {label} (random weights), {args.images} PNGs {args.size}x{args.size}, batch "
              f"{args.batch_size}, shards of {args.shard_rows} rows; {cores} cores: {cpu}; ray {ray.__version__}")

        cpus = args.threads_per_worker
        load_before = os.getloadavg()[0]
        baseline = {cpus: max(time_single(checkpoint, large, args.batch_size, cpus) for _ in range(args.repeats))}
        print(f"single process, {cpus} torch thread(s): {baseline[cpus]:8.1f} img/s")

        start = time.perf_counter()
        rr.start_local(num_cpus=max(cores, max(args.workers) * args.threads_per_worker))
        print(f"ray local instance start: {time.perf_counter() - start:.1f} s (not included below)")
        fits = {}
        try:
            for workers in args.workers:
                t_small, t_large = (min(time_ray(checkpoint, manifest, folder / "out", args.batch_size, workers,
                                                 cpus, args.shard_rows) for _ in range(args.repeats))
                                    for manifest in (small, large))
                per_image = (t_large - t_small) / (args.images - small_count)
                fixed = t_small - per_image * small_count
                fits[workers] = (per_image, fixed, cpus)
                print(f"ray, {workers} worker(s) x {cpus} thread(s): {args.images / t_large:8.1f} img/s end to end "
                      f"({args.images} images in {t_large:.1f} s); steady {1 / per_image:8.1f} img/s, "
                      f"fixed {fixed:.1f} s")
        finally:
            ray.shutdown()
    print(f"load average (1 min) before/after: {load_before:.1f} / {os.getloadavg()[0]:.1f} on {cores} cores")

    if 1 in fits:
        per_image, fixed, cpus = fits[1]
        reference = baseline[cpus]
        overhead = per_image - 1 / reference
        print(f"ray overhead per image (1 worker vs single process, {cpus} thread(s)): {overhead * 1e3:+.2f} ms "
              f"({overhead * reference * 100:+.1f} % of the single-process time per image); fixed {fixed:.1f} s")
        if len(fits) > 1:
            top = max(fits)
            print(f"scaling {top} workers vs 1 (steady img/s): {fits[1][0] / fits[top][0]:.2f}x on {cores} cores")
        worker_ips = args.project_ips or 1 / per_image
        seconds = fixed + args.project_images / args.project_workers * (1 / worker_ips + max(overhead, 0.0))
        print(f"PROJECTION (not measured): {args.project_images:.0f} images on {args.project_workers} workers at "
              f"{worker_ips:.1f} img/s per worker + {max(overhead, 0) * 1e3:.2f} ms Ray overhead per image + "
              f"{fixed:.1f} s fixed = {seconds / 3600:.2f} h ({seconds:.0f} s)")


if __name__ == "__main__":
    sys.exit(main())
