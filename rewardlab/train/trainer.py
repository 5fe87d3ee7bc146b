"""The training loop: Bradley–Terry on preference pairs, accelerate for devices, resumable by step."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..eval.metrics import PairwiseAccuracy
from ..io.config import config_from_yaml
from ..io.images import open_image
from ..models import get_architecture
from ..registry import ModelSpec, get_spec
from ..scoring.loader import save_checkpoint, spec_from_json, spec_to_json
from ..scoring.preprocess import image_to_unit_tensor, unit_tensors_to_batch
from .data import Pair, load_training_pairs, split_by_group
from .freeze import freeze_backbone, freeze_ratio, trainable_summary
from .init import load_initial_weights
from .loss import bradley_terry_loss


@dataclass
class TrainConfig:
    """All settings of a run; a YAML recipe fills them and ``--set key=value`` overrides them."""

    data: list[str] = field(default_factory=list)  # KIND:PATH specs; several = mixed batches (Combo)
    valid_data: list[str] = field(default_factory=list)  # default: a split of ``data``
    image_root: str | None = None
    output_dir: str = "runs/reward"
    architecture: str = "imagereward-v1.0"  # registry model whose architecture/spec is trained
    spec_json: str | None = None  # a full spec instead (tiny test configurations)
    init: str | None = None  # random | BLIP model_large.pth | registry name | checkpoint path
    freeze_ratio: float = 0.7
    freeze_backbone: bool = False
    lr: float = 1e-5
    weight_decay: float = 0.0
    batch_size: int = 8  # pairs per device per micro-batch
    grad_accum: int = 1
    max_steps: int = 1000  # optimizer steps
    warmup_steps: int = 0
    max_grad_norm: float = 1.0
    margin: float = 0.0
    include_ties: bool = False
    mixed_precision: str = "no"  # no | bf16 | fp16
    gradient_checkpointing: bool = False
    valid_fraction: float = 0.1
    eval_every: int = 100
    save_every: int = 100
    early_stopping_patience: int = 0  # evaluations without improvement; 0 = off
    seed: int = 42
    log_with: list[str] = field(default_factory=list)  # tensorboard, wandb (optional)
    cpu: bool = False

    @classmethod
    def from_yaml(cls, path: str | Path | None, overrides: list[str] = ()) -> TrainConfig:
        return config_from_yaml(cls, path, overrides)


class PairBatcher:
    """Deterministic, resumable batches: micro-batch m of a source comes from a seeded permutation of
    that source's epoch ``m // steps_per_epoch``; several sources alternate (the shorter one cycles)."""

    def __init__(self, sources: list[list[Pair]], batch_size: int, seed: int, rank: int = 0, world: int = 1):
        if any(len(s) < batch_size * world for s in sources):
            raise ValueError(f"every data source needs at least batch_size x processes = {batch_size * world} pairs; "
                             f"sizes: {[len(s) for s in sources]}")
        self.sources, self.batch_size, self.seed, self.rank, self.world = sources, batch_size, seed, rank, world

    def micro_batch(self, index: int) -> list[Pair]:
        source = index % len(self.sources)
        pairs = self.sources[source]
        local = index // len(self.sources)
        global_batch = self.batch_size * self.world
        per_epoch = len(pairs) // global_batch
        epoch, offset = divmod(local, per_epoch)
        order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(self.seed * 1000 + source * 100 + epoch))
        start = offset * global_batch + self.rank * self.batch_size
        return [pairs[i] for i in order[start : start + self.batch_size].tolist()]


class PairForward:
    """Rewards of a batch of pairs through the model's own preprocessing and tokenizer."""

    def __init__(self, spec: ModelSpec, tokenizer, workers: int = 2):
        self.spec, self.tokenizer = spec, tokenizer
        self.pool = ThreadPoolExecutor(max_workers=workers)

    def __call__(self, model, pairs: list[Pair], device) -> tuple[torch.Tensor, torch.Tensor]:
        images, index, keys = [], [], {}
        for image in [p.preferred_image for p in pairs] + [p.rejected_image for p in pairs]:
            key = image if isinstance(image, (str, bytes)) else id(image)
            if key not in keys:
                keys[key] = len(images)
                images.append(image)
            index.append(keys[key])
        tensors = list(self.pool.map(lambda item: image_to_unit_tensor(open_image(item[1], item[0]), self.spec.preprocess),
                                     enumerate(images)))
        pixels = unit_tensors_to_batch(tensors, self.spec.preprocess, device)
        prompts = [p.preferred_prompt for p in pairs] + [p.rejected_prompt for p in pairs]
        text = self.tokenizer(prompts, device)
        rewards = model(pixels, text, torch.tensor(index, device=device))
        return rewards[: len(pairs)], rewards[len(pairs) :]


def _spec(config: TrainConfig) -> ModelSpec:
    return spec_from_json(config.spec_json) if config.spec_json else get_spec(config.architecture)


class Trainer:
    """Runs a :class:`TrainConfig`; ``train()`` resumes from ``output_dir/state`` when it exists."""

    def __init__(self, config: TrainConfig, train_pairs: list[list[Pair]] | None = None,
                 valid_pairs: list[Pair] | None = None, step_callback=None):
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        self.config = config
        self.out = Path(config.output_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.accelerator = Accelerator(gradient_accumulation_steps=config.grad_accum, cpu=config.cpu,
                                       mixed_precision=config.mixed_precision,
                                       log_with=config.log_with or None, project_dir=str(self.out))
        set_seed(config.seed)
        self.spec = _spec(config)
        arch = get_architecture(self.spec.architecture)
        model = arch.build(self.spec)
        self.init_source = load_initial_weights(model, config.init)
        if config.freeze_backbone:
            freeze_backbone(model)
        else:
            freeze_ratio(model, config.freeze_ratio)
        model.blip.visual_encoder.gradient_checkpointing = config.gradient_checkpointing
        model.blip.text_encoder.gradient_checkpointing = config.gradient_checkpointing
        self.trainable = trainable_summary(model)
        if train_pairs is None:
            train_pairs, valid_pairs = self._load_data()
        self.forward = PairForward(self.spec, arch.tokenizer(self.spec))
        self.batcher = PairBatcher(train_pairs, config.batch_size, config.seed, self.accelerator.process_index,
                                   self.accelerator.num_processes)
        self.valid_pairs = valid_pairs or []
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
        from transformers import get_cosine_schedule_with_warmup

        scheduler = get_cosine_schedule_with_warmup(optimizer, config.warmup_steps, config.max_steps)
        self.model, self.optimizer, self.scheduler = self.accelerator.prepare(model, optimizer, scheduler)
        self.step_callback = step_callback
        self.state = {"step": 0, "best_accuracy": -1.0, "best_step": None, "evals_without_improvement": 0}

    def _load_data(self) -> tuple[list[list[Pair]], list[Pair]]:
        c = self.config
        if not c.data:
            raise ValueError("no training data: set `data` in the config or pass --data")
        sources, valid = [], []
        for spec in c.data:
            pairs = load_training_pairs(spec, c.image_root, "train")
            if c.valid_data:
                sources.append(pairs)
            else:
                train, held_out = split_by_group(pairs, c.valid_fraction, c.seed)
                sources.append(train)
                valid += held_out
        for spec in c.valid_data:
            valid += load_training_pairs(spec, c.image_root, "validation")
        return sources, valid

    # -- logging and state -------------------------------------------------------------------------
    def _log(self, record: dict) -> None:
        if self.accelerator.is_main_process:
            with open(self.out / "log.jsonl", "a") as handle:
                handle.write(json.dumps(record) + "\n")
        if self.config.log_with:
            self.accelerator.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=record.get("step"))

    def save_state(self) -> None:
        state_dir = self.out / "state"
        self.accelerator.save_state(str(state_dir))
        if self.accelerator.is_main_process:
            (state_dir / "trainer_state.json").write_text(json.dumps(self.state))

    def _maybe_resume(self) -> bool:
        state_file = self.out / "state" / "trainer_state.json"
        if not state_file.exists():
            return False
        self.accelerator.load_state(str(self.out / "state"))
        self.state = json.loads(state_file.read_text())
        self._log({"event": "resumed", "step": self.state["step"]})
        return True

    def save_model(self, path: Path) -> None:
        if self.accelerator.is_main_process:
            save_checkpoint(self.accelerator.unwrap_model(self.model), self.spec, path)

    # -- validation --------------------------------------------------------------------------------
    @torch.no_grad()
    def validate(self) -> dict:
        self.model.eval()
        accuracy, losses = PairwiseAccuracy(bootstrap=200), []
        size = self.config.batch_size
        for start in range(0, len(self.valid_pairs), size):
            batch = self.valid_pairs[start : start + size]
            with self.accelerator.autocast():
                good, bad = self.forward(self.model, batch, self.accelerator.device)
            losses.append(float(bradley_terry_loss(good.float(), bad.float(), self.config.margin)) * len(batch))
            for g, b, pair in zip(good.tolist(), bad.tolist(), batch, strict=True):
                accuracy.update([g, b], [1, 1] if pair.tie else [1, 2])
        self.model.train()
        metrics = accuracy.compute()
        return {"valid_loss": sum(losses) / max(len(self.valid_pairs), 1), "valid_accuracy": metrics["accuracy"]}

    # -- loop --------------------------------------------------------------------------------------
    def train(self) -> dict:
        c = self.config
        if c.log_with:
            self.accelerator.init_trackers("rewardlab", config={k: str(v) for k, v in asdict(c).items()})
        if not self._maybe_resume():
            self._log({"event": "start", "config": asdict(c), "init": self.init_source, **self.trainable,
                       "spec": json.loads(spec_to_json(self.spec))})
        self.model.train()
        started = time.perf_counter()
        while self.state["step"] < c.max_steps:
            step = self.state["step"]
            for k in range(c.grad_accum):
                pairs = self.batcher.micro_batch(step * c.grad_accum + k)
                with self.accelerator.accumulate(self.model), self.accelerator.autocast():
                    good, bad = self.forward(self.model, pairs, self.accelerator.device)
                    tie = torch.tensor([p.tie for p in pairs], device=good.device)
                    loss = bradley_terry_loss(good.float(), bad.float(), c.margin, tie)
                    self.accelerator.backward(loss)
                    if self.accelerator.sync_gradients and c.max_grad_norm > 0:
                        self.accelerator.clip_grad_norm_(self.model.parameters(), c.max_grad_norm)
                    self.optimizer.step()
                    self.scheduler.step()
                    self.optimizer.zero_grad()
            self.state["step"] = step + 1
            record = {"step": step + 1, "loss": float(loss.detach()), "lr": self.scheduler.get_last_lr()[0]}
            if c.eval_every and (step + 1) % c.eval_every == 0 and self.valid_pairs:
                record.update(self.validate())
                if record["valid_accuracy"] > self.state["best_accuracy"]:
                    self.state.update(best_accuracy=record["valid_accuracy"], best_step=step + 1,
                                      evals_without_improvement=0)
                    self.save_model(self.out / "best.safetensors")
                else:
                    self.state["evals_without_improvement"] += 1
            self._log(record)
            if c.save_every and (step + 1) % c.save_every == 0:
                self.save_state()
            if self.step_callback is not None:
                self.step_callback(step + 1, self)
            if c.early_stopping_patience and self.state["evals_without_improvement"] >= c.early_stopping_patience:
                self._log({"event": "early_stop", "step": step + 1})
                break
        self.save_model(self.out / "final.safetensors")
        self.save_state()
        summary = {"steps": self.state["step"], "best_step": self.state["best_step"],
                   "best_valid_accuracy": self.state["best_accuracy"], "seconds": time.perf_counter() - started,
                   **self.trainable}
        if self.valid_pairs:
            summary.update(self.validate())
        self._log({"event": "end", **summary})
        if c.log_with:
            self.accelerator.end_training()
        return summary
