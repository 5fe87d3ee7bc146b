"""Why rewardlab uses its own compact SDPA BLIP modules instead of transformers' BlipVisionModel/BlipTextModel.

Builds both at full size (ViT-L/16 + BERT-base with cross-attention) with the same random weights
(transformers' keys are a pure rename of the BLIP checkpoint keys), checks they compute the same reward
features, and times a batch in fp32 and bf16 autocast.

    python benchmarks/backbone_choice.py [--batch-size 8] [--repeats 2]
"""

from __future__ import annotations

import argparse
import re
import time

import torch


def transformers_backbone(ours):
    """transformers' BLIP vision + text models loaded with ``ours``' weights (renamed keys)."""
    from transformers import BlipTextConfig, BlipVisionConfig
    from transformers.models.blip.modeling_blip import BlipVisionModel
    from transformers.models.blip.modeling_blip_text import BlipTextModel

    v, t = ours.visual_encoder.config, ours.text_encoder.config
    vision = BlipVisionModel(BlipVisionConfig(hidden_size=v.width, intermediate_size=int(v.width * v.mlp_ratio),
                                              num_hidden_layers=v.depth, num_attention_heads=v.heads,
                                              image_size=v.image_size, patch_size=v.patch_size, layer_norm_eps=1e-6))
    text = BlipTextModel(BlipTextConfig(vocab_size=t.vocab_size, hidden_size=t.hidden_size, num_hidden_layers=t.layers,
                                        num_attention_heads=t.heads, intermediate_size=t.intermediate_size,
                                        encoder_hidden_size=v.width, layer_norm_eps=t.layer_norm_eps),
                         add_pooling_layer=False)
    renames = [(r"^patch_embed\.proj", "embeddings.patch_embedding"), (r"^cls_token$", "embeddings.class_embedding"),
               (r"^pos_embed$", "embeddings.position_embedding"), (r"^blocks\.(\d+)\.norm1", r"encoder.layers.\1.layer_norm1"),
               (r"^blocks\.(\d+)\.norm2", r"encoder.layers.\1.layer_norm2"), (r"^blocks\.(\d+)\.attn\.qkv", r"encoder.layers.\1.self_attn.qkv"),
               (r"^blocks\.(\d+)\.attn\.proj", r"encoder.layers.\1.self_attn.projection"),
               (r"^blocks\.(\d+)\.mlp", r"encoder.layers.\1.mlp"), (r"^norm\.", "post_layernorm.")]
    vision_state = {}
    for key, value in ours.visual_encoder.state_dict().items():
        for pattern, repl in renames:
            key = re.sub(pattern, repl, key)
        vision_state[key] = value
    vision.load_state_dict(vision_state, strict=True)
    missing, unexpected = text.load_state_dict(ours.text_encoder.state_dict(), strict=False)
    assert not unexpected and all("position_ids" in k for k in missing), (missing, unexpected)
    return vision.eval(), text.eval()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    from rewardlab.models.blip import BLIPBackbone, TextConfig, VisionConfig
    from rewardlab.testing import randomize

    ours = BLIPBackbone(VisionConfig(), TextConfig()).eval()
    randomize(ours, 0)
    vision, text = transformers_backbone(ours)
    pixels = torch.randn(args.batch_size, 3, 224, 224)
    ids = torch.randint(1000, 30000, (args.batch_size, 20))
    ids[:, 0] = 101
    mask = torch.ones_like(ids)

    def run_ours():
        return ours.multimodal_cls(pixels, ids, mask)

    def run_transformers():
        image = vision(pixel_values=pixels).last_hidden_state
        return text(input_ids=ids, attention_mask=mask, encoder_hidden_states=image).last_hidden_state[:, 0]

    with torch.inference_mode():
        diff = (run_ours() - run_transformers()).abs().max().item()
        print(f"max |Δ| of the [CLS] feature, ours vs transformers (fp32): {diff:.2e}")
        for dtype in (torch.float32, torch.bfloat16):
            times = {}
            for name, fn in (("transformers", run_transformers), ("rewardlab SDPA", run_ours)):
                with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
                    fn()
                    start = time.perf_counter()
                    for _ in range(args.repeats):
                        fn()
                times[name] = (time.perf_counter() - start) / (args.repeats * args.batch_size)
            label = "fp32" if dtype == torch.float32 else "bf16"
            print(f"{label}: transformers {times['transformers']:.3f} s/img, rewardlab SDPA {times['rewardlab SDPA']:.3f} s/img "
                  f"({times['transformers'] / times['rewardlab SDPA']:.2f}x)")


if __name__ == "__main__":
    main()
