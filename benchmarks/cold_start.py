"""Cold start: process start -> model ready, and end to end for ranking the 4 example images, in fresh processes.

Compares, in one run and on identical random full-size ImageReward weights:
  official   image-reward 1.5 (`RM.load(path)` + `inference_rank`), in .official-venv
  rewardlab  from the official `.pt` file
  rewardlab  from the same weights converted with `rewardlab convert` (`.safetensors`, spec embedded)
Each configuration runs `--repeats` times, alternating, in a fresh process; medians are printed with peak RSS
and its ratio to the checkpoint size. "ready" includes interpreter start and imports.

    python benchmarks/cold_start.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from throughput import PROMPT, official_imagereward  # noqa: E402

SHARED = REPO.parent / "shared" / "data" / "imagereward"
IMAGES = [str(SHARED / "images" / f"{i}.webp") for i in range(1, 5)]

REWARDLAB_CHILD = """
import json, resource, sys, time
import rewardlab
scorer = rewardlab.load(sys.argv[1], device="cpu")
ready = time.time()
ranking = scorer.rank(sys.argv[2], sys.argv[3:])
done = time.time()
print(json.dumps({"ready": ready, "done": done, "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "scores": ranking.scores}))
"""

OFFICIAL_CHILD = """
import json, resource, sys, time
sys.path.insert(0, sys.argv[1])
import official_ref
official_ref._patch_tokenizer()
import ImageReward as RM
model = RM.load(sys.argv[2], device="cpu", med_config=str(official_ref.MED_CONFIG))
ready = time.time()
ranks, scores = model.inference_rank(sys.argv[3], sys.argv[4:])
done = time.time()
print(json.dumps({"ready": ready, "done": done, "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "scores": scores}))
"""


def run_child(command: list[str]) -> dict:
    started = time.time()
    out = subprocess.run(command, capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    return {"ready": result["ready"] - started, "total": result["done"] - started, "rss_mb": result["rss_mb"],
            "scores": result["scores"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--official-python", default=str(REPO / ".official-venv" / "bin" / "python"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        pt, safetensors = folder / "ImageReward.pt", folder / "ImageReward.safetensors"
        official_imagereward(args.official_python, pt, IMAGES[:1])
        subprocess.run([sys.executable, "-m", "rewardlab.cli", "convert", str(pt), str(safetensors)], check=True,
                       capture_output=True)
        configs = {
            "official (.pt)": [args.official_python, "-c", OFFICIAL_CHILD, str(REPO / "rewardlab" / "testing" / "reference"), str(pt), PROMPT,
                               *IMAGES],
            "rewardlab (.pt)": [sys.executable, "-c", REWARDLAB_CHILD, str(pt), PROMPT, *IMAGES],
            "rewardlab (.safetensors)": [sys.executable, "-c", REWARDLAB_CHILD, str(safetensors), PROMPT, *IMAGES],
        }
        runs: dict[str, list[dict]] = {name: [] for name in configs}
        for _ in range(args.repeats):
            for name, command in configs.items():
                runs[name].append(run_child(command))
        size_mb = pt.stat().st_size / 2**20
        official = statistics.median(r["total"] for r in runs["official (.pt)"])
        reference = runs["official (.pt)"][0]["scores"]
        print(f"ImageReward-v1.0, random weights, checkpoint {size_mb:.0f} MiB, 4 example images, "
              f"median of {args.repeats} fresh processes")
        print(f"{'configuration':<26}{'ready s':>9}{'end to end s':>14}{'vs official':>13}{'peak RSS MiB':>14}"
              f"{'RSS/ckpt':>10}{'max |Δ|':>10}")
        for name, results in runs.items():
            ready = statistics.median(r["ready"] for r in results)
            total = statistics.median(r["total"] for r in results)
            rss = max(r["rss_mb"] for r in results)
            deviation = max(abs(a - b) for a, b in zip(results[0]["scores"], reference, strict=True))
            print(f"{name:<26}{ready:>9.2f}{total:>14.2f}{official / total:>12.2f}x{rss:>14.0f}"
                  f"{rss / size_mb:>10.2f}{deviation:>10.1e}")


if __name__ == "__main__":
    sys.exit(main())
