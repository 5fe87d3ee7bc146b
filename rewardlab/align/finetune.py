"""``rewardlab finetune``: improve a diffusion generator with differentiable rewards.

:class:`FinetuneConfig` holds every setting (YAML recipe + ``--set`` overrides, see
:func:`rewardlab.config.load_config`); :class:`Finetuner` runs it: ReFL, DRaFT-K or AlignProp
reward steps, optionally the pretraining (noise-prediction) loss, LoRA or full fine-tuning, accelerate
for devices and mixed precision, resumable state, a JSONL log and a validation gallery.

Randomness is a function of ``(seed, step, micro-batch, process)`` only (prompt order, initial noise,
stop index / truncation, pretraining timesteps), so a run killed and resumed from its saved state
reaches the same weights as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..config import load_config
from ..diffusion.adapters import FluxGenerator, fresh_scheduler, wrap_pipeline
from ..errors import ConfigError, NonFiniteError
from ..io.atomic import current_version, new_version_dir, publish_version, write_json
from ..scoring.ensemble import DIFFERENTIABLE, NORMALIZATIONS, RewardEnsemble, parse_reward
from .backprop import TRUNCATIONS, draw_grad_steps, negative_reward_loss, sample_with_grad_window
from .data import ImageTextPair, batch_indices, load_image_text_pairs, load_prompts, pixels_for_generator
from .gallery import save_images, write_gallery
from .lora import DEFAULT_TARGETS, add_lora, save_full, save_lora, trainable_state
from .refl import REFL_GRAD_SCALE, draw_stop_index, refl_loss

logger = logging.getLogger(__name__)

METHODS = ("refl", "draft", "alignprop")
PARAMETERS = ("lora", "full")
LOSSES = ("auto", "relu_margin", "negative")
PRETRAIN_MODES = ("off", "alternate", "weighted")
PRECISIONS = ("no", "fp16", "bf16")


@dataclass
class FinetuneConfig:
    """All settings of a fine-tuning run (defaults: ImageReward's ReFL hyper-parameters)."""

    method: str = "refl"  # refl | draft | alignprop
    pretrained_model: str | None = None  # diffusers folder or hub id
    revision: str | None = None
    reward: list[str] = field(default_factory=lambda: ["imagereward-v1.0"])  # NAME[:WEIGHT], summed
    reward_normalize: str = "none"  # none | zscore (differentiable combinations)
    reward_calibration: str | None = None  # JSON of per-model mean/std for zscore
    heldout_reward: list[str] = field(default_factory=list)  # tracked, never trained on
    prompts: str | None = None  # refl_data.json, JSONL or a text file
    validation_prompts: str | None = None  # default: the first validation_count training prompts
    validation_count: int = 8
    validation_every: int = 50  # steps; 0 = only at start and end
    validation_seed: int = 0  # prompt i is generated with seed validation_seed + i
    validation_steps: int | None = None  # sampling steps (default num_steps)
    validation_guidance_scale: float = 7.5
    output_dir: str = "runs/finetune"
    height: int | None = None
    width: int | None = None
    scheduler: str = "pipeline"  # pipeline | ddpm | ddim (training rollouts)
    num_steps: int = 40  # scheduler steps of a training rollout
    refl_stop_min: int = 30
    refl_stop_max: int = 39
    draft_k: int = 1
    truncation: str = "gaussian"  # alignprop: fixed | uniform | gaussian
    truncation_min: int = 1
    truncation_max: int | None = None
    truncation_mean: float = 8.0
    truncation_std: float = 5.0
    train_guidance_scale: float = 1.0  # draft / alignprop only (ReFL trains without CFG)
    embedded_guidance: float = 3.5  # FLUX guidance-distilled transformers (FLUX.1-dev): the guidance embedding
    loss: str = "auto"  # auto (refl: relu_margin, else negative) | relu_margin | negative
    margin: float = 2.0
    grad_scale: float | None = None  # default: 1e-3 for relu_margin, 1.0 for negative
    parameters: str = "lora"  # lora | full
    lora_rank: int = 4
    lora_alpha: float | None = None  # default: lora_rank
    lora_targets: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    lr: float = 1e-5
    lr_warmup_steps: int = 0  # linear warm-up, then constant
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    weight_decay: float = 1e-2
    max_grad_norm: float = 1.0
    ema: bool = False  # diffusers' EMAModel over the trainable weights (ImageReward's --use_ema)
    ema_decay: float = 0.9999  # cap of EMAModel's decay min((1 + s) / (10 + s), ema_decay), s = updates - 1
    batch_size: int = 2  # prompts per process per micro-batch
    grad_accum: int = 1
    max_steps: int = 100  # reward optimizer steps
    pretrain_loss: str = "off"  # off | alternate (own optimizer step) | weighted (added to the reward loss)
    pretrain_weight: float = 1.0
    pretrain_optimizer: str = "shared"  # alternate: shared (one AdamW, as ImageReward) | separate (own AdamW state)
    pretrain_lr: float | None = None  # alternate: lr of the pretraining steps (default lr)
    pretrain_data: str | None = None  # image-text pairs (JSONL/JSON or a folder with metadata.jsonl)
    pretrain_batch_size: int | None = None  # default batch_size
    image_root: str | None = None
    mixed_precision: str = "no"  # no | fp16 | bf16
    gradient_checkpointing: bool = False
    save_every: int = 50  # steps between resumable states; 0 = only at the end
    seed: int = 0
    cpu: bool = False

    def __post_init__(self) -> None:
        if self.pretrain_loss == "no":  # YAML reads a bare `off` as False
            self.pretrain_loss = "off"

    @classmethod
    def from_yaml(cls, path: str | Path | None, overrides: list[str] = (),
                  values: dict | None = None) -> FinetuneConfig:
        """A YAML recipe, then ``KEY=VALUE`` overrides, then typed ``values`` (CLI options)."""
        config = load_config(cls, path, overrides, values)
        config.check()
        return config

    @property
    def loss_kind(self) -> str:
        return ("relu_margin" if self.method == "refl" else "negative") if self.loss == "auto" else self.loss

    @property
    def effective_grad_scale(self) -> float:
        if self.grad_scale is not None:
            return self.grad_scale
        return REFL_GRAD_SCALE if self.loss_kind == "relu_margin" else 1.0

    def check(self, need_data: bool = True) -> None:
        """Every setting is valid, before any model is loaded; raises :class:`ConfigError`."""
        def one_of(key: str, options: tuple[str, ...]) -> None:
            if getattr(self, key) not in options:
                raise ConfigError(f"setting {key}: {getattr(self, key)!r} is not one of {', '.join(options)}")

        one_of("method", METHODS)
        one_of("parameters", PARAMETERS)
        one_of("loss", LOSSES)
        one_of("pretrain_loss", PRETRAIN_MODES)
        one_of("pretrain_optimizer", ("shared", "separate"))
        one_of("mixed_precision", PRECISIONS)
        one_of("truncation", TRUNCATIONS)
        one_of("scheduler", ("pipeline", "ddpm", "ddim"))
        if self.reward_normalize not in DIFFERENTIABLE:
            raise ConfigError(f"setting reward_normalize: {self.reward_normalize!r} is not differentiable",
                              f"use one of {', '.join(DIFFERENTIABLE)} (of {', '.join(NORMALIZATIONS)})")
        for key in ("validation_count", "num_steps", "batch_size", "grad_accum", "max_steps", "lora_rank",
                    "draft_k", "truncation_min"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 1:
                raise ConfigError(f"setting {key}: {getattr(self, key)!r} must be an integer >= 1")
        for key in ("validation_every", "save_every", "lr_warmup_steps", "validation_seed", "seed"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 0:
                raise ConfigError(f"setting {key}: {getattr(self, key)!r} must be an integer >= 0")
        for key in ("lr", "margin", "max_grad_norm", "weight_decay", "pretrain_weight", "train_guidance_scale",
                    "validation_guidance_scale", "truncation_mean", "truncation_std", "adam_epsilon",
                    "embedded_guidance", "ema_decay"):
            value = getattr(self, key)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                raise ConfigError(f"setting {key}: {value!r} must be a finite number")
        if self.lr <= 0:
            raise ConfigError(f"setting lr: {self.lr} must be > 0")
        if not 0 <= self.ema_decay < 1:
            raise ConfigError(f"setting ema_decay: {self.ema_decay} must be in [0, 1)")
        if not isinstance(self.ema, bool):
            raise ConfigError(f"setting ema: {self.ema!r} must be true or false")
        if self.pretrain_lr is not None and not (isinstance(self.pretrain_lr, (int, float)) and
                                                 math.isfinite(self.pretrain_lr) and self.pretrain_lr > 0):
            raise ConfigError(f"setting pretrain_lr: {self.pretrain_lr!r} must be a finite number > 0")
        if self.grad_scale is not None and not (math.isfinite(self.grad_scale) and self.grad_scale > 0):
            raise ConfigError(f"setting grad_scale: {self.grad_scale} must be a finite number > 0")
        if not self.reward:
            raise ConfigError("setting reward: no reward model", "give one or more NAME[:WEIGHT]")
        for item in [*self.reward, *self.heldout_reward]:
            if not isinstance(item, str):
                raise ConfigError(f"reward {item!r} must be a string NAME[:WEIGHT]")
            parse_reward(item)
        if self.method == "refl":
            if not 0 <= self.refl_stop_min <= self.refl_stop_max < self.num_steps:
                raise ConfigError(f"ReFL stop range [{self.refl_stop_min}, {self.refl_stop_max}] must lie within "
                                  f"0..num_steps-1 = {self.num_steps - 1}")
            if self.train_guidance_scale != 1.0:
                raise ConfigError(f"train_guidance_scale={self.train_guidance_scale}: ReFL trains without "
                                  "classifier-free guidance", "set it to 1 or use method draft/alignprop")
        if self.method == "draft":
            draw_grad_steps(self.num_steps, random.Random(0), "fixed", self.draft_k)
        if self.method == "alignprop":
            draw_grad_steps(self.num_steps, random.Random(0), self.truncation, self.draft_k, self.truncation_min,
                            self.truncation_max, self.truncation_mean, self.truncation_std)
        if self.pretrain_loss != "off" and need_data and not self.pretrain_data:
            raise ConfigError(f"pretrain_loss={self.pretrain_loss} needs pretrain_data (image-text pairs)")
        if need_data and not self.prompts:
            raise ConfigError("setting prompts: no prompt file", "pass --prompts or set prompts in the config")
        for key in ("height", "width", "pretrain_batch_size", "validation_steps"):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ConfigError(f"setting {key}: {value!r} must be an integer >= 1")


def _move(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    module.to(device) if dtype == torch.float32 else module.to(device, dtype=dtype)


def _seed(config: FinetuneConfig, *parts: int) -> int:
    value = config.seed
    for part in parts:
        value = (value * 1_000_003 + part) % (2**63 - 1)
    return value


class Finetuner:
    """Runs a :class:`FinetuneConfig`. Objects passed in (pipeline, rewards, data) replace loading them;
    ``train()`` resumes from ``output_dir/state`` when a state was published there."""

    def __init__(self, config: FinetuneConfig, pipeline=None, reward: RewardEnsemble | None = None,
                 heldout: RewardEnsemble | None = None, prompts: list[str] | None = None,
                 validation_prompts: list[str] | None = None, pretrain_pairs: list[ImageTextPair] | None = None,
                 step_callback=None):
        from accelerate import Accelerator

        config.check(need_data=False)
        if prompts is None and not config.prompts:
            raise ConfigError("setting prompts: no prompt file", "pass --prompts or set prompts in the config")
        if config.pretrain_loss != "off" and pretrain_pairs is None and not config.pretrain_data:
            raise ConfigError(f"pretrain_loss={config.pretrain_loss} needs pretrain_data (image-text pairs)")
        self.config = config
        self.step_callback = step_callback
        self.out = Path(config.output_dir)
        # data first: a bad file fails before any model is loaded
        self.prompts = list(prompts) if prompts is not None else load_prompts(config.prompts)
        if validation_prompts is not None:
            self.validation_prompts = list(validation_prompts)
        elif config.validation_prompts:
            self.validation_prompts = load_prompts(config.validation_prompts)
        else:
            self.validation_prompts = self.prompts[: config.validation_count]
        self.validation_prompts = self.validation_prompts[: config.validation_count]
        self.pretrain_pairs = pretrain_pairs
        if config.pretrain_loss != "off" and pretrain_pairs is None:
            self.pretrain_pairs = load_image_text_pairs(config.pretrain_data, config.image_root)

        self.accelerator = Accelerator(mixed_precision=config.mixed_precision, cpu=config.cpu)
        device = self.accelerator.device
        if pipeline is None:
            from ..diffusion.loading import load_pipeline

            if not config.pretrained_model:
                raise ConfigError("setting pretrained_model: no generator", "give a diffusers folder or hub id")
            pipeline = load_pipeline(config.pretrained_model, "cpu", "fp32", revision=config.revision)
        pipeline.set_progress_bar_config(disable=True)
        self.pipeline = pipeline
        self.generator = wrap_pipeline(pipeline, config.height, config.width, config.embedded_guidance)
        self._prepare_parameters(device)
        if reward is None:
            reward = RewardEnsemble.load(config.reward, normalize=config.reward_normalize,
                                         calibration=config.reward_calibration, device=device)
        if heldout is None and config.heldout_reward:
            heldout = RewardEnsemble.load(config.heldout_reward, device=device)
        for ensemble in (reward, heldout):
            for scorer in (ensemble.scorers if ensemble else []):
                scorer.model.requires_grad_(False)
                scorer.model.eval()
        self.reward, self.heldout = reward, heldout

        params = [p for p in self.generator.denoiser.parameters() if p.requires_grad]
        def adamw():
            return torch.optim.AdamW(params, lr=config.lr, betas=(config.adam_beta1, config.adam_beta2),
                                     eps=config.adam_epsilon, weight_decay=config.weight_decay)

        self.denoiser, self.optimizer = self.accelerator.prepare(self.generator.denoiser, adamw())
        # alternate mode: the pretraining steps use the reward's AdamW (ImageReward's ReFL_SDXL.py) or their own
        # (Adam moments of the two losses not mixed)
        self.pretrain_optimizer = self.optimizer
        if config.pretrain_loss == "alternate" and config.pretrain_optimizer == "separate":
            self.pretrain_optimizer = self.accelerator.prepare(adamw())
        self.trainable_parameters = sum(p.numel() for p in params)
        self.ema = None
        if config.ema:
            from diffusers.training_utils import EMAModel

            self.ema = EMAModel(params, decay=config.ema_decay)
        self.state: dict = {"step": 0, "base": None}

    # -- setup -------------------------------------------------------------------------------------
    def _prepare_parameters(self, device: torch.device) -> None:
        c = self.config
        weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(c.mixed_precision, torch.float32)
        for name in ("vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
            module = getattr(self.pipeline, name, None)
            if module is not None:
                module.requires_grad_(False)
                _move(module, device, weight_dtype)
        denoiser = self.generator.denoiser
        if c.parameters == "lora":
            add_lora(denoiser, c.lora_rank, c.lora_alpha, c.lora_targets, seed=c.seed)
            _move(denoiser, device, weight_dtype)
            for p in denoiser.parameters():  # adapters train in fp32 (diffusers' cast_training_params)
                if p.requires_grad:
                    p.data = p.data.float()
        else:
            denoiser.requires_grad_(True)
            denoiser.to(device)
        denoiser.train()

    def _unwrapped(self) -> torch.nn.Module:
        return self.accelerator.unwrap_model(self.denoiser)

    def _trainable(self) -> list[torch.nn.Parameter]:
        return list(trainable_state(self._unwrapped()).values())

    @contextlib.contextmanager
    def ema_weights(self):
        """Inside: the denoiser holds the EMA weights (when ``ema`` is on); the trained ones after."""
        if self.ema is None:
            yield
            return
        params = self._trainable()
        self.ema.store(params)
        self.ema.copy_to(params)
        try:
            yield
        finally:
            self.ema.restore(params)

    # -- logging and state -------------------------------------------------------------------------
    def _log(self, record: dict) -> None:
        if not self.accelerator.is_main_process:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        line = json.dumps(record, allow_nan=False) + "\n"
        with open(self.out / "log.jsonl", "a", encoding="utf-8") as handle:  # whole lines, fsynced
            handle.write(line)
            handle.flush()
            os.fsync(handle.fileno())

    def save_state(self) -> None:
        """Publish trainable weights, optimizer and run state as one folder ``state/step-N`` (atomic)."""
        from safetensors.torch import save_file

        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            root = self.out / "state"
            folder = new_version_dir(root, "state")
            tensors = {k: v.detach().to("cpu").contiguous() for k, v in trainable_state(self._unwrapped()).items()}
            save_file(tensors, str(folder / "trainable.safetensors"))
            torch.save(self.optimizer.state_dict(), folder / "optimizer.pt")
            if self.pretrain_optimizer is not self.optimizer:
                torch.save(self.pretrain_optimizer.state_dict(), folder / "pretrain_optimizer.pt")
            if self.accelerator.scaler is not None:
                torch.save(self.accelerator.scaler.state_dict(), folder / "scaler.pt")
            if self.ema is not None:
                torch.save(self.ema.state_dict(), folder / "ema.pt")
            write_json(folder / "trainer_state.json", self.state)
            publish_version(root, folder, f"step-{self.state['step']:08d}")
        self.accelerator.wait_for_everyone()

    def _maybe_resume(self) -> bool:
        from safetensors.torch import load_file

        folder = current_version(self.out / "state")
        if folder is None:
            return False
        tensors = load_file(str(folder / "trainable.safetensors"))
        params = trainable_state(self._unwrapped())
        if set(tensors) != set(params):
            raise ConfigError(f"{folder}: saved state does not match this run's trainable parameters",
                              "use a new output_dir or the settings of the interrupted run")
        with torch.no_grad():
            for name, param in params.items():
                param.copy_(tensors[name].to(param.device, param.dtype))
        self.optimizer.load_state_dict(torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=True))
        if self.pretrain_optimizer is not self.optimizer:
            self.pretrain_optimizer.load_state_dict(torch.load(folder / "pretrain_optimizer.pt", map_location="cpu",
                                                               weights_only=True))
        if self.accelerator.scaler is not None and (folder / "scaler.pt").exists():
            self.accelerator.scaler.load_state_dict(torch.load(folder / "scaler.pt", weights_only=True))
        if self.ema is not None:
            if not (folder / "ema.pt").exists():
                raise ConfigError(f"{folder}: saved state has no EMA weights but ema is on",
                                  "use a new output_dir or the settings of the interrupted run")
            self.ema.load_state_dict(torch.load(folder / "ema.pt", map_location="cpu", weights_only=True))
            self.ema.to(self.accelerator.device)
        self.state = json.loads((folder / "trainer_state.json").read_text())
        self._log({"event": "resumed", "step": self.state["step"]})
        return True

    # -- one step ----------------------------------------------------------------------------------
    def _lr(self, step: int) -> float:
        c = self.config
        return c.lr * min(1.0, (step + 1) / c.lr_warmup_steps) if c.lr_warmup_steps else c.lr

    def _rollout_pixels(self, prompts: list[str], rng: random.Random, noise: torch.Generator) -> tuple[torch.Tensor, dict]:
        """Decoded [0, 1] pixels of a training rollout, with gradient through the method's window."""
        c, g = self.config, self.generator
        device = self.accelerator.device
        guidance = c.method != "refl" and c.train_guidance_scale != 1.0
        conditioning = g.encode(prompts, device, guidance=guidance)
        scheduler = fresh_scheduler(self.pipeline, c.scheduler)
        g.set_timesteps(scheduler, c.num_steps, device)  # Euler's initial sigma depends on the schedule
        latents = g.initial_latents(len(prompts), noise, device, scheduler)
        if c.method == "refl":
            stop = draw_stop_index(rng, c.refl_stop_min, c.refl_stop_max)
            info = {"stop_index": stop}
            latents = sample_with_grad_window(g, self.denoiser, scheduler, latents, conditioning, c.num_steps, stop, stop,
                                              1.0, c.gradient_checkpointing, noise)
        else:
            if c.method == "draft":
                k = draw_grad_steps(c.num_steps, rng, "fixed", c.draft_k)
            else:
                k = draw_grad_steps(c.num_steps, rng, c.truncation, c.draft_k, c.truncation_min, c.truncation_max,
                                    c.truncation_mean, c.truncation_std)
            info = {"grad_steps": k}
            latents = sample_with_grad_window(g, self.denoiser, scheduler, latents, conditioning, c.num_steps,
                                              c.num_steps - k, None, c.train_guidance_scale,
                                              c.gradient_checkpointing, noise)
        return g.decode(latents), info

    def reward_loss(self, rewards: torch.Tensor) -> torch.Tensor:
        c = self.config
        if c.loss_kind == "relu_margin":
            return refl_loss(rewards, c.margin, c.effective_grad_scale)
        return negative_reward_loss(rewards, c.effective_grad_scale)

    def _pretrain_loss(self, step: int, micro: int) -> torch.Tensor:
        c = self.config
        size = c.pretrain_batch_size or c.batch_size
        rank, world = self.accelerator.process_index, self.accelerator.num_processes
        indices = batch_indices(len(self.pretrain_pairs), size * world, step * c.grad_accum + micro, _seed(c, 7))
        pairs = [self.pretrain_pairs[i] for i in indices[rank * size : (rank + 1) * size]]
        g = self.generator
        pixels = pixels_for_generator([p.image for p in pairs], g.height, g.width).to(self.accelerator.device)
        noise = torch.Generator().manual_seed(_seed(c, 11, step, micro, rank))
        conditioning = g.encode([p.text for p in pairs], self.accelerator.device)
        return g.noise_prediction_loss(self.denoiser, g.training_scheduler(), pixels, conditioning, noise)

    def _optimizer_step(self, optimizer=None) -> float:
        c = self.config
        optimizer = optimizer or self.optimizer
        norm = float("nan")
        if c.max_grad_norm > 0:
            norm = float(self.accelerator.clip_grad_norm_(self.denoiser.parameters(), c.max_grad_norm))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return norm

    def _check_finite(self, name: str, value: torch.Tensor, step: int) -> None:
        if not torch.isfinite(value.detach()).all():
            raise NonFiniteError(f"step {step + 1}: {name} is {float(value.detach())}",
                                 "lower lr, use fp32 or bf16, or check the reward model")

    def train_step(self, step: int) -> dict:
        """One optimizer step on the reward (and, with ``pretrain_loss: alternate``, one before it on the
        noise-prediction loss); returns the log record."""
        c = self.config
        acc = self.accelerator
        rank, world = acc.process_index, acc.num_processes
        for group in self.optimizer.param_groups:
            group["lr"] = self._lr(step)
        record: dict = {"step": step + 1, "lr": self._lr(step)}
        if c.pretrain_loss == "alternate":
            pretrain_lr = self._lr(step) * (c.pretrain_lr / c.lr if c.pretrain_lr is not None else 1.0)
            for group in self.pretrain_optimizer.param_groups:
                group["lr"] = pretrain_lr
        if c.pretrain_loss == "alternate":
            total = 0.0
            for micro in range(c.grad_accum):
                with acc.autocast():
                    loss = self._pretrain_loss(step, micro) / c.grad_accum
                self._check_finite("pretraining loss", loss, step)
                acc.backward(loss)
                total += float(loss.detach())
            record["pretrain_loss"] = total
            record["pretrain_grad_norm"] = self._optimizer_step(self.pretrain_optimizer)
            if self.pretrain_optimizer is self.optimizer:  # the reward step's own lr
                for group in self.optimizer.param_groups:
                    group["lr"] = self._lr(step)
        rewards, heldout, per_model, losses, infos = [], [], {}, 0.0, []
        pretrain_total = 0.0
        for micro in range(c.grad_accum):
            index = step * c.grad_accum + micro
            chosen = batch_indices(len(self.prompts), c.batch_size * world, index, _seed(c, 3))
            prompts = [self.prompts[i] for i in chosen[rank * c.batch_size : (rank + 1) * c.batch_size]]
            rng = random.Random(_seed(c, 5, step, micro, rank))
            noise = torch.Generator().manual_seed(_seed(c, 13, step, micro, rank))
            with acc.autocast():
                pixels, info = self._rollout_pixels(prompts, rng, noise)
                total, parts = self.reward.score_tensors(pixels, prompts)
                loss = self.reward_loss(total.float())
                if c.pretrain_loss == "weighted":
                    pretrain = self._pretrain_loss(step, micro)
                    pretrain_total += float(pretrain.detach()) / c.grad_accum
                    loss = loss + c.pretrain_weight * pretrain
            loss = loss / c.grad_accum
            self._check_finite("reward loss", loss, step)
            acc.backward(loss)
            losses += float(loss.detach())
            rewards += total.detach().float().cpu().tolist()
            for label, values in parts.items():
                per_model.setdefault(label, []).extend(values.detach().float().cpu().tolist())
            if self.heldout is not None:
                with torch.no_grad():
                    heldout += self.heldout.score_tensors(pixels.detach(), prompts)[0].float().cpu().tolist()
            infos.append(info)
        record["grad_norm"] = self._optimizer_step()
        if self.ema is not None:
            self.ema.step(self._trainable())
            record["ema_decay"] = self.ema.cur_decay_value
        record["loss"] = losses
        if c.pretrain_loss == "weighted":
            record["pretrain_loss"] = pretrain_total
        record["reward"] = sum(rewards) / len(rewards)
        if len(per_model) > 1:
            record.update({f"reward/{k}": sum(v) / len(v) for k, v in per_model.items()})
        if heldout:
            record["heldout"] = sum(heldout) / len(heldout)
        for key in infos[0]:
            record[key] = [info[key] for info in infos] if len(infos) > 1 else infos[0][key]
        return {k: v for k, v in record.items() if not (isinstance(v, float) and math.isnan(v))}

    # -- validation --------------------------------------------------------------------------------
    def validation_seeds(self) -> list[int]:
        return [self.config.validation_seed + i for i in range(len(self.validation_prompts))]

    @torch.no_grad()
    def generate(self, prompts: list[str], seeds: list[int], num_steps: int | None = None,
                 guidance_scale: float | None = None) -> torch.Tensor:
        """Images of the current generator through the pipeline's own sampler: (B, 3, H, W) in [0, 1].
        FLUX: the pipeline's ``guidance_scale`` is the guidance embedding, so ``embedded_guidance`` is used."""
        c = self.config
        if guidance_scale is None:
            guidance_scale = c.validation_guidance_scale
        if isinstance(self.generator, FluxGenerator):  # FluxPipeline's guidance_scale is the embedded guidance
            guidance_scale = self.generator.embedded_guidance
        out = []
        for start in range(0, len(prompts), c.batch_size):
            chunk = slice(start, start + c.batch_size)
            generators = [torch.Generator().manual_seed(s) for s in seeds[chunk]]
            with self.accelerator.autocast():
                images = self.pipeline(prompt=prompts[chunk], num_inference_steps=num_steps or c.validation_steps or c.num_steps,
                                       guidance_scale=guidance_scale, generator=generators, output_type="pt",
                                       height=self.generator.height, width=self.generator.width).images
            out.append(images.float())
        return torch.cat(out)

    @torch.no_grad()
    def score(self, pixels: torch.Tensor, prompts: list[str]) -> dict[str, list[float]]:
        """Training reward (combined and per model) and held-out reward of images."""
        scores = {}
        total, parts = self.reward.score_tensors(pixels, prompts)
        scores["reward"] = total.float().cpu().tolist()
        if len(parts) > 1:
            scores.update({f"reward/{k}": v.float().cpu().tolist() for k, v in parts.items()})
        if self.heldout is not None:
            total, parts = self.heldout.score_tensors(pixels, prompts)
            scores["heldout"] = total.float().cpu().tolist()
            if len(parts) > 1:
                scores.update({f"heldout/{k}": v.float().cpu().tolist() for k, v in parts.items()})
        return scores

    def validate(self, step: int) -> dict:
        """Generate the validation prompts with fixed seeds, score them, save images and the gallery."""
        seeds = self.validation_seeds()
        with self.ema_weights():
            pixels = self.generate(self.validation_prompts, seeds)
        scores = self.score(pixels, self.validation_prompts)
        run = {"step": step, "folder": f"gallery/step-{step:08d}", "scores": scores}
        if self.accelerator.is_main_process:
            run["images"] = save_images(pixels, self.out / run["folder"])
            base = self.state["base"] or run
            write_gallery(self.out / "gallery.html", self.validation_prompts, seeds, base, run,
                          f"rewardlab finetune ({self.config.method}): base vs step {step}")
        if self.state["base"] is None:
            self.state["base"] = run
        return {f"valid_{k}": sum(v) / len(v) for k, v in scores.items()}

    # -- loop --------------------------------------------------------------------------------------
    def save_weights(self) -> Path:
        """The trained parameters (the EMA weights when ``ema`` is on): ``lora/final`` (diffusers LoRA
        format) or ``<denoiser>/final``."""
        with self.ema_weights():
            if self.config.parameters == "lora":
                return save_lora(self.generator, self._unwrapped(), self.out / "lora")
            return save_full(self._unwrapped(), self.out / self.generator.denoiser_name)

    def train(self) -> dict:
        c = self.config
        started = time.perf_counter()
        if not self._maybe_resume():
            self._log({"event": "start", "config": asdict(c), "trainable_parameters": self.trainable_parameters,
                       "generator": type(self.pipeline).__name__})
        if self.state["base"] is None:
            self._log({"event": "validation", "step": 0, **self.validate(0)})
        while self.state["step"] < c.max_steps:
            step = self.state["step"]
            record = self.train_step(step)
            self.state["step"] = step + 1
            if c.validation_every and (step + 1) % c.validation_every == 0 and step + 1 < c.max_steps:
                record.update(self.validate(step + 1))
            record["seconds"] = round(time.perf_counter() - started, 3)
            self._log(record)
            if c.save_every and (step + 1) % c.save_every == 0 and step + 1 < c.max_steps:
                self.save_state()
            if self.step_callback is not None:
                self.step_callback(step + 1, self)
        final = self.validate(self.state["step"])
        weights = self.save_weights() if self.accelerator.is_main_process else None
        self.save_state()
        base = {f"base_{k}": sum(v) / len(v) for k, v in self.state["base"]["scores"].items()}
        summary = {"steps": self.state["step"], **base, **final, "weights": str(weights),
                   "seconds": round(time.perf_counter() - started, 3)}
        self._log({"event": "end", **summary})
        return summary
