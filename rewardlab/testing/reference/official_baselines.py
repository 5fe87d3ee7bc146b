"""Reference scores of the comparison models from their own code (run with the .official-venv python).

Builds, with seeded random weights: OpenAI CLIP (the `clip` package) for ImageReward's CLIPScore and
AestheticScore baselines, ImageReward's BLIPScore, and an open_clip model from the `hpsv2` wheel's
bundled code (HPS v2 scoring). Saves each state dict in its own released layout and writes the scores.

    python rewardlab/testing/reference/official_baselines.py --model clip|aesthetic|blip|hps --out-dir DIR --prompt P IMAGES...
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import types
from pathlib import Path

import torch
from PIL import Image

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from official_ref import MED_CONFIG, _patch_tokenizer, randomize  # noqa: E402

TINY_OPEN_CLIP = {"embed_dim": 32, "vision_cfg": {"image_size": 224, "layers": 2, "width": 64, "head_width": 32,
                                                  "patch_size": 14},
                  "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 48, "heads": 4, "layers": 2}}


def openai_clip_l14(seed: int):
    import clip.model

    model = clip.model.CLIP(embed_dim=768, image_resolution=224, vision_layers=24, vision_width=1024, vision_patch_size=14,
                            context_length=77, vocab_size=49408, transformer_width=768, transformer_heads=12,
                            transformer_layers=12).float().eval()
    randomize(model, seed)
    with torch.no_grad():
        model.logit_scale.fill_(4.6052)
    return model


def baseline(cls, **attributes):
    """An ImageReward baseline object without its __init__ (which downloads weights)."""
    obj = cls.__new__(cls)
    torch.nn.Module.__init__(obj)
    for key, value in attributes.items():
        setattr(obj, key, value)
    return obj


def open_clip_module():
    root = os.path.dirname(importlib.util.find_spec("hpsv2").origin)
    package = types.ModuleType("hpsv2")
    package.__path__ = [root]
    sys.modules["hpsv2"] = package  # skip hpsv2/__init__, which needs packages the scoring code does not
    from hpsv2.src import open_clip

    return open_clip


# A small CLIPModel with the activations, norms and pooling of laion/CLIP-ViT-H-14 (PickScore's base).
TINY_PICKSCORE = {
    "text_config": {"hidden_size": 48, "intermediate_size": 192, "num_hidden_layers": 2, "num_attention_heads": 4,
                    "hidden_act": "gelu", "layer_norm_eps": 1e-5, "max_position_embeddings": 77, "vocab_size": 49408},
    "vision_config": {"hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 2,
                      "hidden_act": "gelu", "layer_norm_eps": 1e-5, "patch_size": 14, "image_size": 224},
    "projection_dim": 32,
}


def pickscore(seed: int, out: Path, prompt: str, images: list[str]) -> dict:
    """PickScore's published recipe: transformers CLIPModel + the laion ViT-H-14 processor (slow PIL image
    processor, fast tokenizer whose vocabulary comes from the `clip` package), on a small random model."""
    import clip.simple_tokenizer
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizerFast

    model = CLIPModel(CLIPConfig(**TINY_PICKSCORE)).eval()
    randomize(model, seed)
    model.logit_scale.fill_(4.6052)
    model.save_pretrained(out / "pickscore")  # model.safetensors, as on the hub
    bpe = clip.simple_tokenizer.SimpleTokenizer()
    (out / "vocab.json").write_text(json.dumps(bpe.encoder))
    merges = sorted(bpe.bpe_ranks, key=bpe.bpe_ranks.get)
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessor(do_resize=True, size={"shortest_edge": 224}, resample=3, do_center_crop=True,
                                           crop_size={"height": 224, "width": 224}, do_normalize=True,
                                           image_mean=[0.48145466, 0.4578275, 0.40821073],
                                           image_std=[0.26862954, 0.26130258, 0.27577711], do_convert_rgb=True),
        tokenizer=CLIPTokenizerFast(vocab_file=str(out / "vocab.json"), merges_file=str(out / "merges.txt")))
    pil_images = [Image.open(path) for path in images]
    image_inputs = processor(images=pil_images, padding=True, truncation=True, max_length=77, return_tensors="pt")
    text_inputs = processor(text=prompt, padding=True, truncation=True, max_length=77, return_tensors="pt")
    image_embs = model.get_image_features(**image_inputs)
    image_embs = image_embs / image_embs.norm(dim=-1, keepdim=True)
    text_embs = model.get_text_features(**text_inputs)
    text_embs = text_embs / text_embs.norm(dim=-1, keepdim=True)
    scores = model.logit_scale.exp() * (text_embs @ image_embs.T)[0]
    return {"scores": scores.tolist(), "pixels": [x[:, ::37, ::37].flatten().tolist() for x in image_inputs["pixel_values"]]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", choices=["clip", "aesthetic", "blip", "hps", "pickscore"], required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", required=True)
    parser.add_argument("--prompt", required=True)
    parser.add_argument("images", nargs="+")
    args = parser.parse_args()
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    result = {}
    with torch.no_grad():
        if args.model in ("clip", "aesthetic"):
            import clip
            from ImageReward.models.AestheticScore import MLP, AestheticScore
            from ImageReward.models.CLIPScore import CLIPScore

            model = openai_clip_l14(args.seed)
            torch.save(model.state_dict(), out / "clip.pt")
            preprocess = clip.clip._transform(224)
            if args.model == "clip":
                scorer = baseline(CLIPScore, device="cpu", clip_model=model, preprocess=preprocess)
            else:
                mlp = MLP(768).eval()
                randomize(mlp, args.seed + 1)
                torch.save(mlp.state_dict(), out / "aesthetic.pth")
                scorer = baseline(AestheticScore, device="cpu", clip_model=model, preprocess=preprocess, mlp=mlp)
            result["scores"] = [scorer.score(args.prompt, path) for path in args.images]
        elif args.model == "blip":
            _patch_tokenizer()
            from ImageReward.models.BLIPScore import BLIPScore

            scorer = BLIPScore(med_config=str(MED_CONFIG), device="cpu").eval()
            randomize(scorer.blip, args.seed)
            state = dict(scorer.blip.state_dict())
            state.update({"visual_encoder_m.cls_token": torch.zeros(1, 1, 1024), "text_decoder.cls.predictions.bias":
                          torch.zeros(30524), "image_queue": torch.zeros(256, 8), "temp": torch.tensor(0.07),
                          "itm_head.weight": torch.zeros(2, 768)})  # what model_large.pth also holds
            torch.save({"model": state}, out / "model_large.pth")
            result["scores"] = [scorer.score(args.prompt, path) for path in args.images]
        elif args.model == "pickscore":
            result = pickscore(args.seed, out, args.prompt, args.images)
        else:
            open_clip = open_clip_module()
            from hpsv2.src.open_clip import factory

            factory._MODEL_CONFIGS["tiny-H"] = TINY_OPEN_CLIP
            # The arguments of hpsv2.img_score.initialize_model (light_augmentation=True: the eval transform
            # scales the longer side and pads), with a tiny config and no pretrained download.
            model, _, preprocess = open_clip.create_model_and_transforms(
                "tiny-H", None, precision="amp", device="cpu", jit=False, force_quick_gelu=False,
                force_custom_text=False, force_patch_dropout=False, force_image_size=None, pretrained_image=False,
                image_mean=None, image_std=None, light_augmentation=True, aug_cfg={}, output_dict=True,
                with_score_predictor=False, with_region_predictor=False)
            model.eval()
            randomize(model, args.seed)
            torch.save({"state_dict": model.state_dict()}, out / "hps.pt")
            tokenizer = open_clip.get_tokenizer("ViT-H-14")
            text = tokenizer([args.prompt])
            scores, pixels = [], []
            for path in args.images:
                image = preprocess(Image.open(path)).unsqueeze(0)
                outputs = model(image, text)
                scores.append(float(torch.diagonal(outputs["image_features"] @ outputs["text_features"].T)[0]))
                pixels.append(image[0, :, ::37, ::37].flatten().tolist())  # a strided sample of the input
            result["scores"], result["pixels"] = scores, pixels
    (out / f"{args.model}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
