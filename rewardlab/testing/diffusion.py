"""Real diffusers pipelines (SD 1.x, SDXL, SD3, FLUX) built offline from tiny random configurations."""

from __future__ import annotations

import json
from pathlib import Path


def char_clip_tokenizer(folder: Path):
    """A CLIP tokenizer whose vocabulary is single byte-level characters (no merges): enough to run
    the text encoder on any prompt without downloading a vocabulary."""
    from transformers import CLIPTokenizer

    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    chars = [chr(b) if b in printable else chr(next(extra)) for b in range(256)]  # GPT-2's byte -> char table
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=32)


def tiny_pipeline(folder: Path, seed: int = 0):
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    tokenizer = char_clip_tokenizer(folder / "tokenizer")
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                                                num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=32,
                                                bos_token_id=len(tokenizer) - 2, eos_token_id=len(tokenizer) - 1))
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
                                attention_head_dim=4, norm_num_groups=8)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=8, sample_size=16)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              steps_offset=1)
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def char_t5_tokenizer(max_length: int = 16):
    """A fast T5-style tokenizer over single byte characters (no download): pads with id 0, ends with
    ``</s>`` (id 1), as T5's does, so FLUX and SD3 pipelines can run their T5 branch offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    vocab.update({chr(b): 3 + b for b in range(256)})
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    core.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   model_max_length=max_length)


def _clip_text(tokenizer, hidden: int, projection: bool = False, projection_dim: int = 16):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                            num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=32,
                            projection_dim=projection_dim, bos_token_id=len(tokenizer) - 2,
                            eos_token_id=len(tokenizer) - 1)
    return CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)


def tiny_sdxl_pipeline(folder: Path, seed: int = 0):
    """A real ``StableDiffusionXLPipeline`` (two text encoders, pooled embeddings, size/crop time ids) with
    tiny random weights: 16x16 px output, offline."""
    import torch
    from diffusers import (
        EulerDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )

    torch.manual_seed(seed)
    tokenizer = char_clip_tokenizer(folder / "tokenizer")
    text_encoder = _clip_text(tokenizer, 16)
    text_encoder_2 = _clip_text(tokenizer, 16, projection=True, projection_dim=16)
    time_dim = 8
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(16, 32), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=(2, 4), use_linear_projection=True, norm_num_groups=8,
                                addition_embed_type="text_time", addition_time_embed_dim=time_dim,
                                projection_class_embeddings_input_dim=6 * time_dim + 16)
    vae = _tiny_vae(latent_channels=4)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="leading")
    return _as_loaded(StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet, scheduler=scheduler,
                                     force_zeros_for_empty_prompt=True))


def tiny_sd3_pipeline(folder: Path, seed: int = 0):
    """A real ``StableDiffusion3Pipeline`` (MMDiT, rectified flow; two CLIP encoders and a T5) with tiny
    random weights: 16x16 px output, offline."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    tokenizer = char_clip_tokenizer(folder / "tokenizer")
    t5_tokenizer = char_t5_tokenizer()
    text_encoder = _clip_text(tokenizer, 16, projection=True, projection_dim=16)
    text_encoder_2 = _clip_text(tokenizer, 16, projection=True, projection_dim=16)
    text_encoder_3 = T5EncoderModel(T5Config(vocab_size=len(t5_tokenizer), d_model=32, d_kv=8, d_ff=32,
                                             num_layers=1, num_heads=2, relative_attention_num_buckets=8))
    transformer = SD3Transformer2DModel(sample_size=8, patch_size=1, in_channels=4, out_channels=4, num_layers=1,
                                        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                                        caption_projection_dim=16, pooled_projection_dim=32, pos_embed_max_size=16)
    vae = _tiny_vae(latent_channels=4, shift_factor=0.0609, scaling_factor=1.5035)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    return _as_loaded(StableDiffusion3Pipeline(transformer=transformer, scheduler=scheduler, vae=vae,
                                    text_encoder=text_encoder, tokenizer=tokenizer,
                                    text_encoder_2=text_encoder_2, tokenizer_2=tokenizer,
                                    text_encoder_3=text_encoder_3, tokenizer_3=t5_tokenizer))


def tiny_flux_pipeline(folder: Path, seed: int = 0):
    """A real ``FluxPipeline`` (packed 2x2 latents, guidance-distilled transformer, CLIP pooled + T5
    sequence conditioning) with tiny random weights: 16x16 px output, offline."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    tokenizer = char_clip_tokenizer(folder / "tokenizer")
    t5_tokenizer = char_t5_tokenizer()
    text_encoder = _clip_text(tokenizer, 16)
    text_encoder_2 = T5EncoderModel(T5Config(vocab_size=len(t5_tokenizer), d_model=32, d_kv=8, d_ff=32,
                                             num_layers=1, num_heads=2, relative_attention_num_buckets=8))
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                         attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=16, guidance_embeds=True, axes_dims_rope=(2, 2, 4))
    vae = _tiny_vae(latent_channels=4, shift_factor=0.1159, scaling_factor=0.3611)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=16, max_image_seq_len=256)
    return _as_loaded(FluxPipeline(transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=text_encoder,
                        tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=t5_tokenizer))


def _as_loaded(pipeline):
    """Every model component in eval mode, as ``from_pretrained`` leaves them (T5's dropout off, so prompts
    encode deterministically; the VAE's train/eval paths differ in the last bits)."""
    import torch

    for component in pipeline.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()
    return pipeline


def _tiny_vae(latent_channels: int, **config):
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=latent_channels, block_out_channels=(8, 16),
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         norm_num_groups=8, sample_size=16, **config)
