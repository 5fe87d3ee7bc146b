"""Steps per second and peak memory of reward fine-tuning per method (refl, draft K=1, alignprop).

Each method runs in its own process (so peak memory is its own): the Finetuner is built, one warm-up
step runs, then ``--steps`` timed optimizer steps. Peak memory is ``torch.cuda.max_memory_allocated``
on a GPU and the process's peak RSS on CPU. The baseline, measured in the same run, is plain sampling
of the same schedule without gradients (``sample``): the table shows each method's step time as a
multiple of one no-grad rollout.

    python benchmarks/finetune_speed.py                        # tiny pipeline, CPU, known-truth reward
    python benchmarks/finetune_speed.py --model stable-diffusion-v1-5/stable-diffusion-v1-5 \\
        --reward imagereward-v1.0 --device cuda --mixed-precision fp16 --gradient-checkpointing \\
        --batch-size 1 --num-steps 50

SD 1.5 on a GPU (512 px, batch 1, fp16, LoRA rank 4): the frozen weights take ~2.6 GB (UNet 1.7, VAE
0.16, text encoder 0.25) plus ImageReward ~0.9 GB; ReFL adds one UNet call's activations plus the VAE
decoder's backward at 512 px (the largest part: ~6-8 GB without checkpointing); DRaFT-K with gradient
checkpointing adds only the latents per step. Expected peak ~10-12 GB for refl/draft-1, more for
alignprop as K grows without checkpointing. These are estimates, not measurements: run the command above.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

METHODS = {"sample": {}, "refl": {"method": "refl"}, "draft": {"method": "draft", "draft_k": 1},
           "alignprop": {"method": "alignprop", "truncation": "gaussian"}}


def child(args) -> dict:
    import torch

    from rewardlab.align.finetune import FinetuneConfig, Finetuner
    from rewardlab.scoring.ensemble import RewardEnsemble

    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    folder = Path(tempfile.mkdtemp())
    pipeline, reward = None, None
    if args.model == "tiny":
        from rewardlab.testing.diffusion import tiny_pipeline
        from rewardlab.testing.rewards import colour_scorer

        pipeline = tiny_pipeline(folder / "pipe", 0)
        reward = RewardEnsemble([colour_scorer()])
    settings = dict(METHODS[args.method]) or {"method": "draft"}
    n = args.num_steps
    stop = {"refl_stop_min": max(0, n * 3 // 4), "refl_stop_max": n - 1} if n != 40 else {}
    config = FinetuneConfig(pretrained_model=None if args.model == "tiny" else args.model,
                            reward=args.reward or ["imagereward-v1.0"], output_dir=str(folder / "run"),
                            batch_size=args.batch_size, num_steps=n, mixed_precision=args.mixed_precision,
                            gradient_checkpointing=args.gradient_checkpointing, cpu=args.device == "cpu",
                            grad_scale=1.0, parameters=args.parameters, truncation_mean=min(8.0, n / 2),
                            truncation_max=n, **stop, **settings)
    tuner = Finetuner(config, pipeline=pipeline, reward=reward, prompts=["a red circle", "a blue square"] * 8,
                      validation_prompts=["a red circle"])
    device = tuner.accelerator.device
    prompts = ["a red circle", "a blue square"] * args.batch_size

    def one(step: int) -> None:
        if args.method == "sample":
            seeds = list(range(step * args.batch_size, (step + 1) * args.batch_size))
            tuner.generate(prompts[: args.batch_size], seeds, num_steps=n, guidance_scale=1.0)
        else:
            tuner.train_step(step)

    one(0)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    for step in range(1, args.steps + 1):
        one(step)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    peak = (torch.cuda.max_memory_allocated() if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {"method": args.method, "steps_per_s": args.steps / seconds, "seconds_per_step": seconds / args.steps,
            "peak_bytes": peak, "memory": "cuda max allocated" if device.type == "cuda" else "peak RSS"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help="'tiny' or a diffusers pipeline folder / hub id")
    parser.add_argument("--reward", action="append", help="reward NAME[:WEIGHT] (real models; tiny uses colour truth)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--num-steps", type=int, default=40, help="scheduler steps of a rollout")
    parser.add_argument("--parameters", default="lora", choices=["lora", "full"])
    parser.add_argument("--mixed-precision", default="no", choices=["no", "fp16", "bf16"])
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--methods", default="sample,refl,draft,alignprop")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        args.method = args.child
        print(json.dumps(child(args)))
        return
    rows = []
    for method in args.methods.split(","):
        command = [sys.executable, __file__, "--child", method] + [a for a in sys.argv[1:] if a != "--methods"]
        out = subprocess.run(command, capture_output=True, text=True, check=False)
        if out.returncode != 0:
            sys.exit(f"{method} failed:\n{out.stderr[-3000:]}")
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    baseline = next((r for r in rows if r["method"] == "sample"), rows[0])
    print(f"model={args.model} device={args.device} batch={args.batch_size} rollout steps={args.num_steps} "
          f"parameters={args.parameters} checkpointing={args.gradient_checkpointing} threads={args.threads}")
    print(f"{'method':<10} {'steps/s':>9} {'s/step':>8} {'x sample':>9} {'peak MiB':>9}  memory")
    for r in rows:
        print(f"{r['method']:<10} {r['steps_per_s']:>9.3f} {r['seconds_per_step']:>8.3f} "
              f"{r['seconds_per_step'] / baseline['seconds_per_step']:>9.2f} {r['peak_bytes'] / 2**20:>9.1f}  {r['memory']}")


if __name__ == "__main__":
    main()
