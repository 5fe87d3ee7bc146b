"""Forward/backward mappings of the cycle: captioners (image -> text) and generators (text -> image).

Anything with the small protocol below plugs in; names resolve to the built-in back ends:
``diffusers:<repo or folder>`` (text-to-image pipelines) and ``hf:<repo or folder>`` (transformers
image-to-text models such as BLIP-2, LLaVA, InternVL), ``vllm:<repo>`` (vLLM, optional).
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from PIL import Image


@runtime_checkable
class Captioner(Protocol):
    name: str

    def caption(self, images: list[Image.Image]) -> list[str]: ...


@runtime_checkable
class Generator(Protocol):
    """``generate`` returns one image per prompt; each image must depend only on its prompt and
    ``seed`` (not on the other prompts of the call), so batching and resuming give the same data."""

    name: str

    def generate(self, prompts: list[str], seed: int) -> list[Image.Image]: ...


class DiffusersGenerator:
    """A diffusers text-to-image pipeline with fixed steps/guidance/size; ``seed`` fixes the noise."""

    def __init__(self, pipeline: Any, name: str | None = None, steps: int = 28, guidance: float = 7.0,
                 height: int | None = None, width: int | None = None, device: str | None = None,
                 dtype: str | None = None):
        if isinstance(pipeline, str):
            from ..diffusion.loading import load_pipeline

            name = name or pipeline
            pipeline = load_pipeline(pipeline, device or "cpu", dtype or "fp32")  # already on the device
        elif device:
            pipeline = pipeline.to(device)
        self.pipeline = pipeline
        self.pipeline.set_progress_bar_config(disable=True)
        self.name = name or type(pipeline).__name__
        self.params = {"steps": steps, "guidance": guidance, "height": height, "width": width}

    def generate(self, prompts: list[str], seed: int) -> list[Image.Image]:
        import torch

        device = getattr(self.pipeline, "device", "cpu")
        # one noise generator per prompt, all from ``seed``: an image is the same alone or in a batch
        generator = [torch.Generator(device=device).manual_seed(seed) for _ in prompts]
        extra = {k: v for k, v in (("height", self.params["height"]), ("width", self.params["width"])) if v}
        result = self.pipeline(prompts, num_inference_steps=self.params["steps"], guidance_scale=self.params["guidance"],
                               generator=generator, output_type="pil", **extra)
        return list(result.images)


class TransformersCaptioner:
    """A transformers image-to-text model (``AutoModelForImageTextToText``/vision2seq) with greedy decoding."""

    def __init__(self, model: str, prompt: str | None = None, max_new_tokens: int = 77, device: str | None = None):
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.name = model
        self.processor = AutoProcessor.from_pretrained(model)
        self.model = AutoModelForImageTextToText.from_pretrained(model).eval()
        if device:
            self.model.to(device)
        self.prompt, self.max_new_tokens = prompt, max_new_tokens
        self.params = {"prompt": prompt, "max_new_tokens": max_new_tokens, "decoding": "greedy"}

    def caption(self, images: list[Image.Image]) -> list[str]:
        import torch

        kwargs = {"images": images, "return_tensors": "pt"}
        if self.prompt:
            kwargs["text"] = [self.prompt] * len(images)
        inputs = self.processor(**kwargs).to(self.model.device)
        with torch.inference_mode():
            out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
        if self.prompt and "input_ids" in inputs:
            out = out[:, inputs["input_ids"].shape[1]:]
        return [t.strip() for t in self.processor.batch_decode(out, skip_special_tokens=True)]


class VLLMCaptioner:
    """vLLM-served vision-language model (optional dependency)."""

    def __init__(self, model: str, prompt: str = "Describe this image in detail.", max_new_tokens: int = 77):
        try:
            from vllm import LLM, SamplingParams
        except ImportError as exc:
            raise ImportError("the vllm captioner needs `pip install vllm` (GPU only)") from exc
        self.name, self.prompt = model, prompt
        self.llm = LLM(model=model)
        self.sampling = SamplingParams(temperature=0.0, max_tokens=max_new_tokens)
        self.params = {"prompt": prompt, "max_new_tokens": max_new_tokens, "decoding": "greedy"}

    def caption(self, images: list[Image.Image]) -> list[str]:
        requests = [{"prompt": self.prompt, "multi_modal_data": {"image": image}} for image in images]
        return [o.outputs[0].text.strip() for o in self.llm.generate(requests, self.sampling)]


def resolve_generator(spec: str | Generator, **kwargs) -> Generator:
    if not isinstance(spec, str):
        return spec
    kind, _, target = spec.partition(":")
    if kind == "diffusers" and target:
        return DiffusersGenerator(target, name=spec, **kwargs)
    raise ValueError(f"unknown generator {spec!r}; use diffusers:<repo or folder> or pass a Generator object")


def resolve_captioner(spec: str | Captioner, **kwargs) -> Captioner:
    if not isinstance(spec, str):
        return spec
    kind, _, target = spec.partition(":")
    if kind == "hf" and target:
        return TransformersCaptioner(target, **kwargs)
    if kind == "vllm" and target:
        return VLLMCaptioner(target, **kwargs)
    raise ValueError(f"unknown captioner {spec!r}; use hf:<repo or folder>, vllm:<repo> or pass a Captioner object")
