"""diffusers text-to-image pipelines behind one interface (SD 1.x/2.x, SDXL, SD3, FLUX): conditioning,
schedules, one denoiser call, predicted x0, VAE decoding, LoRA export. Fine-tuning (:mod:`rewardlab.align`)
and search over paths (:mod:`rewardlab.search`) both step pipelines through it."""

from .adapters import (
    Conditioning,
    FlowMatchGenerator,
    FluxGenerator,
    Generator,
    SDXLGenerator,
    fresh_scheduler,
    scheduler_step,
    wrap_pipeline,
)
from .loading import load_pipeline

__all__ = ["Conditioning", "FlowMatchGenerator", "FluxGenerator", "Generator", "SDXLGenerator", "fresh_scheduler",
           "load_pipeline", "scheduler_step", "wrap_pipeline"]
