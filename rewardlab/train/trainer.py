"""The training loop: Bradley–Terry on preference pairs, accelerate for devices, resumable by step.

Pairs go through the one collate step (:class:`rewardlab.scoring.batching.Collator`) and the model's own
``forward(pixels, text, image_index, text_index)``; the model's training hooks (freezing, initial
weights, gradient checkpointing, parameter groups) are the only way the loop touches the architecture.

Training state is a folder published atomically (:func:`rewardlab.io.atomic.publish_version`): a kill at
any point of a save leaves the previous complete state or the new complete one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..config import load_config
from ..errors import ConfigError, DataError, NonFiniteError
from ..eval.metrics import PairwiseAccuracy
from ..io.atomic import current_version, new_version_dir, publish_version, write_json
from ..models import get_architecture
from ..registry import ModelSpec, get_spec
from ..scoring.batching import Collator
from ..scoring.loader import save_checkpoint, spec_from_json, spec_to_json
from .data import Pair, load_training_pairs, split_by_group
from .init import load_initial_weights
from .loss import bradley_terry_loss

logger = logging.getLogger(__name__)

MIXED_PRECISION = ("no", "bf16", "fp16")
LR_SCHEDULES = ("cosine", "constant")
TRAINER_STATE = "trainer_state.json"
RUN_FILE = "run.json"
# Settings that change what a resumed run computes: a resume with other values is refused unless allowed.
RESUME_SETTINGS = ("architecture", "spec_json", "data", "valid_data", "image_root", "valid_fraction", "include_ties",
                   "lr", "lr_schedule", "warmup_steps", "max_steps", "weight_decay", "max_grad_norm", "batch_size",
                   "grad_accum", "margin", "freeze_ratio", "freeze_layers", "freeze_backbone", "mixed_precision",
                   "seed")


@dataclass
class TrainConfig:
    """All settings of a run; a YAML recipe fills them and ``--set key=value`` overrides them."""

    data: list[str] = field(default_factory=list)  # KIND:PATH specs; several = mixed batches (Combo)
    valid_data: list[str] = field(default_factory=list)  # default: a split of ``data``
    image_root: str | None = None
    allow_outside_root: bool = False  # image paths may leave the data file's folder (../, absolute)
    output_dir: str = "runs/reward"
    architecture: str = "imagereward-v1.0"  # registry model whose architecture/spec is trained
    spec_json: str | None = None  # a full spec instead (tiny test configurations)
    init: str | None = None  # random | pretrained backbone file | reward checkpoint | registry name
    freeze_ratio: float = 0.7  # bottom fraction of each tower frozen (the architecture's rule)
    freeze_layers: dict | None = None  # {vision: N, text: M}: bottom layers frozen per tower (wins over ratio)
    freeze_backbone: bool = False  # train the head only (wins over both)
    lr: float = 1e-5
    lr_schedule: str = "cosine"  # cosine | constant, both after a linear warmup
    weight_decay: float = 0.0  # on matrices; norms, biases and scales are never decayed
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
    workers: int = 4  # image decoding threads
    max_bad_fraction: float = 0.01  # unreadable training pairs tolerated (skipped) before the run stops
    resume_mismatch_ok: bool = False  # resume even if RESUME_SETTINGS or the data differ from the saved run
    log_with: list[str] = field(default_factory=list)  # tensorboard, wandb (optional)
    cpu: bool = False

    def __post_init__(self) -> None:
        for name in ("data", "valid_data", "log_with"):
            if isinstance(getattr(self, name), str):
                setattr(self, name, [getattr(self, name)])
        _check_range("lr", self.lr, 0, None)
        _check_range("weight_decay", self.weight_decay, 0, None)
        _check_range("max_grad_norm", self.max_grad_norm, 0, None)
        _check_range("freeze_ratio", self.freeze_ratio, 0, 1)
        _check_range("valid_fraction", self.valid_fraction, 0, 0.99)
        _check_range("max_bad_fraction", self.max_bad_fraction, 0, 1)
        for name in ("batch_size", "grad_accum", "max_steps", "workers"):
            _check_int(name, getattr(self, name), 1)
        for name in ("warmup_steps", "eval_every", "save_every", "early_stopping_patience"):
            _check_int(name, getattr(self, name), 0)
        if self.mixed_precision not in MIXED_PRECISION:
            raise ConfigError(f"setting mixed_precision: {self.mixed_precision!r} is not one of "
                              f"{', '.join(MIXED_PRECISION)}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ConfigError(f"setting lr_schedule: {self.lr_schedule!r} is not one of {', '.join(LR_SCHEDULES)}")
        if self.freeze_layers is not None:
            if not isinstance(self.freeze_layers, dict) or not set(self.freeze_layers) <= {"vision", "text"}:
                raise ConfigError(f"setting freeze_layers: {self.freeze_layers!r} — expected {{vision: N, text: M}}")
            for tower, count in self.freeze_layers.items():
                _check_int(f"freeze_layers.{tower}", count, 0)

    @classmethod
    def from_yaml(cls, path: str | Path | None, overrides: list[str] = (),
                  values: dict[str, Any] | None = None) -> TrainConfig:
        """A YAML recipe, then ``KEY=VALUE`` overrides, then typed ``values`` (see :func:`load_config`)."""
        return load_config(cls, path, overrides, values)


def _check_range(name: str, value: float, low: float, high: float | None) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value < low or (high is not None and value > high):
        span = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ConfigError(f"setting {name}: {value!r} must be a finite number {span}")


def _check_int(name: str, value: int, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"setting {name}: {value!r} must be an integer >= {low}")


class PairBatcher:
    """Deterministic, resumable batches: micro-batch m of a source comes from a seeded permutation of
    that source's epoch ``m // steps_per_epoch``; several sources alternate (the shorter one cycles)."""

    def __init__(self, sources: list[list[Pair]], batch_size: int, seed: int, rank: int = 0, world: int = 1):
        if any(len(s) < batch_size * world for s in sources):
            raise DataError(f"every data source needs at least batch_size x processes = {batch_size * world} pairs; "
                            f"sizes: {[len(s) for s in sources]}", "lower batch_size or add data")
        self.sources, self.batch_size, self.seed, self.rank, self.world = sources, batch_size, seed, rank, world

    def indices(self, index: int) -> tuple[int, list[int]]:
        """(source, pair indices in that source) of micro-batch ``index``."""
        source = index % len(self.sources)
        pairs = self.sources[source]
        local = index // len(self.sources)
        global_batch = self.batch_size * self.world
        per_epoch = len(pairs) // global_batch
        epoch, offset = divmod(local, per_epoch)
        order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(self.seed * 1000 + source * 100 + epoch))
        start = offset * global_batch + self.rank * self.batch_size
        return source, order[start : start + self.batch_size].tolist()

    def micro_batch(self, index: int) -> list[Pair]:
        source, chosen = self.indices(index)
        return [self.sources[source][i] for i in chosen]


@dataclass
class PairRewards:
    """Rewards of the pairs of a micro-batch whose images could all be read (``kept`` indexes the input)."""

    preferred: torch.Tensor | None
    rejected: torch.Tensor | None
    kept: list[int]
    errors: dict[int, str]  # input position (0..2n-1: preferred images, then rejected ones) -> message


def _image_identity(image: Any) -> str:
    """Stable identity of a training image for the data fingerprint (paths by name, in-memory images by
    content)."""
    if isinstance(image, (str, os.PathLike)):
        return "path:" + os.fspath(image)
    if isinstance(image, (bytes, bytearray)):
        return "bytes:" + hashlib.blake2b(image, digest_size=16).hexdigest()
    to_bytes = getattr(image, "tobytes", None)
    if callable(to_bytes):
        shape = getattr(image, "size", None) if hasattr(image, "mode") else getattr(image, "shape", None)
        return f"{type(image).__name__}:{shape}:" + hashlib.blake2b(to_bytes(), digest_size=16).hexdigest()
    return f"object:{type(image).__name__}"


def data_fingerprint(sources: list[list[Pair]], valid: list[Pair]) -> str:
    """A hash of every pair (group, prompts, image identities, tie) of the training sources and the
    validation set: a resume on other data is detected even when the file names are the same."""
    digest = hashlib.blake2b(digest_size=16)
    for name, pairs in [*((f"train{i}", s) for i, s in enumerate(sources)), ("valid", valid)]:
        digest.update(f"{name}:{len(pairs)}\n".encode())
        for p in pairs:
            row = (p.group_id, p.preferred_prompt, _image_identity(p.preferred_image), p.rejected_prompt,
                   _image_identity(p.rejected_image), p.tie)
            digest.update(json.dumps(row).encode())
    return digest.hexdigest()


def _spec(config: TrainConfig) -> ModelSpec:
    return spec_from_json(config.spec_json) if config.spec_json else get_spec(config.architecture)


class Trainer:
    """Runs a :class:`TrainConfig`; ``train()`` resumes from ``output_dir/state`` when it exists."""

    def __init__(self, config: TrainConfig, train_pairs: list[list[Pair]] | None = None,
                 valid_pairs: list[Pair] | None = None, step_callback=None):
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        self.config = config
        if train_pairs is None:  # data errors surface before any model is built
            train_pairs, valid_pairs = self._load_data()
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
            model.freeze_backbone()
        elif config.freeze_layers:
            model.freeze_layers(**config.freeze_layers)
        else:
            model.freeze(config.freeze_ratio)
        if config.gradient_checkpointing:
            model.set_grad_checkpointing(True)
        self.trainable = model.trainable_summary()
        self.train_sources = train_pairs
        self.valid_pairs = valid_pairs or []
        self.fingerprint = data_fingerprint(self.train_sources, self.valid_pairs)
        self.collator = Collator(self.spec.preprocess, arch.tokenizer(self.spec), self.accelerator.device)
        self.batcher = PairBatcher(train_pairs, config.batch_size, config.seed, self.accelerator.process_index,
                                   self.accelerator.num_processes)
        optimizer = torch.optim.AdamW(model.param_groups(config.weight_decay), lr=config.lr)
        from transformers import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup

        if config.lr_schedule == "cosine":
            scheduler = get_cosine_schedule_with_warmup(optimizer, config.warmup_steps, config.max_steps)
        else:
            scheduler = get_constant_schedule_with_warmup(optimizer, config.warmup_steps)
        self.model, self.optimizer, self.scheduler = self.accelerator.prepare(model, optimizer, scheduler)
        self.step_callback = step_callback
        self.state: dict[str, Any] = {"step": 0, "best_accuracy": -1.0, "best_step": None,
                                      "evals_without_improvement": 0, "bad_pairs": [], "bad_files": []}

    @property
    def reward_model(self):
        """The model without accelerate's wrappers (for its hooks)."""
        return self.accelerator.unwrap_model(self.model)

    def _load_data(self) -> tuple[list[list[Pair]], list[Pair]]:
        c = self.config
        if not c.data:
            raise ConfigError("no training data", "set `data` in the config or pass --data KIND:PATH")
        sources, valid = [], []
        for spec in c.data:
            pairs = load_training_pairs(spec, c.image_root, "train", c.include_ties, c.allow_outside_root)
            if c.valid_data:
                sources.append(pairs)
            else:
                train, held_out = split_by_group(pairs, c.valid_fraction, c.seed)
                sources.append(train)
                valid += held_out
        for spec in c.valid_data:
            valid += load_training_pairs(spec, c.image_root, "validation", c.include_ties, c.allow_outside_root)
        return sources, valid

    # -- logging -----------------------------------------------------------------------------------
    def _log(self, record: dict) -> None:
        if self.accelerator.is_main_process:
            with open(self.out / "log.jsonl", "a", encoding="utf-8") as handle:  # whole lines, synced
                handle.write(json.dumps(record) + "\n")
                handle.flush()
                os.fsync(handle.fileno())
        if self.config.log_with:
            self.accelerator.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=record.get("step"))

    # -- state -------------------------------------------------------------------------------------
    @property
    def state_root(self) -> Path:
        return self.out / "state"

    def run_settings(self) -> dict:
        """What a resumed run must share with the saved one (settings and the data fingerprint)."""
        config = asdict(self.config)
        return {"settings": {k: config[k] for k in RESUME_SETTINGS}, "data": self.fingerprint}

    def _check_weights_finite(self, what: str) -> None:
        bad = [name for name, param in self.reward_model.named_parameters() if not torch.isfinite(param.detach()).all()]
        if bad:
            raise NonFiniteError(f"refusing to save {what} at step {self.state['step']}: non-finite weights in "
                                 f"{', '.join(bad[:5])}", f"lower lr (now {self.config.lr}); the last saved state "
                                 f"in {self.state_root} is intact")

    def save_state(self) -> Path | None:
        """Write the resumable state as a new folder and publish it atomically (old-or-new on a kill)."""
        from accelerate.utils import broadcast_object_list

        name = f"step-{self.state['step']:08d}"
        current = current_version(self.state_root)
        if current is not None and current.name == name:
            return current  # this step's state is already the published one
        self._check_weights_finite("the training state")
        folder = [str(new_version_dir(self.state_root, name)) if self.accelerator.is_main_process else None]
        broadcast_object_list(folder)
        folder = Path(folder[0])
        self.accelerator.save_state(str(folder))
        published = None
        if self.accelerator.is_main_process:
            write_json(folder / RUN_FILE, self.run_settings())
            write_json(folder / TRAINER_STATE, self.state)
            published = publish_version(self.state_root, folder, name)
        self.accelerator.wait_for_everyone()
        return published

    def _saved_state_folder(self) -> Path | None:
        folder = current_version(self.state_root)
        if folder is None and (self.state_root / TRAINER_STATE).is_file():
            folder = self.state_root  # state written before versioned folders
        return folder

    def _check_resume(self, folder: Path) -> None:
        run_file = folder / RUN_FILE
        if not run_file.is_file():
            logger.warning("%s has no %s: cannot check the resumed settings", folder, RUN_FILE)
            return
        saved, now = json.loads(run_file.read_text()), self.run_settings()
        differences = [f"{key} {saved['settings'].get(key)!r} -> {value!r}" for key, value in now["settings"].items()
                       if saved["settings"].get(key) != value]
        if saved.get("data") != now["data"]:
            differences.append("the training/validation pairs differ")
        if not differences:
            return
        listing = "; ".join(differences)
        if not self.config.resume_mismatch_ok:
            raise ConfigError(f"cannot resume {self.out}: the run was saved with other settings ({listing})",
                              "use the saved settings, another output_dir, or resume_mismatch_ok: true "
                              "(--resume-mismatch-ok) to continue anyway")
        logger.warning("resuming %s with changed settings: %s", self.out, listing)
        self._log({"event": "resume_mismatch", "differences": differences})

    def _maybe_resume(self) -> bool:
        folder = self._saved_state_folder()
        if folder is None:
            return False
        self._check_resume(folder)
        self.accelerator.load_state(str(folder))
        self.state = {**self.state, **json.loads((folder / TRAINER_STATE).read_text())}
        self._log({"event": "resumed", "step": self.state["step"]})
        return True

    def save_model(self, path: Path) -> None:
        """best/final checkpoint (safetensors with the spec embedded), written atomically; non-finite
        weights are refused."""
        if self.accelerator.is_main_process:
            save_checkpoint(self.reward_model, self.spec, path)

    # -- forward -----------------------------------------------------------------------------------
    def pair_rewards(self, pairs: list[Pair]) -> PairRewards:
        """Rewards of both sides of each pair through the shared collate step and the model's forward;
        pairs with an unreadable image are left out (listed in ``errors``)."""
        n = len(pairs)
        prompts = [p.preferred_prompt for p in pairs] + [p.rejected_prompt for p in pairs]
        images = [p.preferred_image for p in pairs] + [p.rejected_image for p in pairs]
        (batch,) = list(self.collator.batches(prompts, images, 2 * n, self.config.workers))
        kept = [i for i in range(n) if i not in batch.errors and i + n not in batch.errors]
        if not kept:
            return PairRewards(None, None, [], batch.errors)
        rewards = self.model(batch.pixels, batch.text, batch.image_index, batch.text_index)
        row = {position: r for r, position in enumerate(batch.rows)}
        preferred = rewards[torch.tensor([row[i] for i in kept], device=rewards.device)]
        rejected = rewards[torch.tensor([row[i + n] for i in kept], device=rewards.device)]
        return PairRewards(preferred, rejected, kept, batch.errors)

    def _pair_loss(self, out: PairRewards, pairs: list[Pair]) -> torch.Tensor:
        scale = self.reward_model.preference_scale()
        tie = torch.tensor([pairs[i].tie for i in out.kept], device=out.preferred.device)
        return bradley_terry_loss(out.preferred.float() * scale, out.rejected.float() * scale, self.config.margin, tie)

    def _record_bad(self, source: int, chosen: list[int], out: PairRewards) -> int:
        """Count the pairs skipped for unreadable images; stop when they pass ``max_bad_fraction``."""
        dropped = [i for i in range(len(chosen)) if i not in out.kept]
        if not dropped:
            return 0
        bad_pairs = {tuple(p) for p in self.state["bad_pairs"]} | {(source, chosen[i]) for i in dropped}
        self.state["bad_pairs"] = sorted(list(p) for p in bad_pairs)
        self.state["bad_files"] = sorted(set(self.state["bad_files"]) | set(out.errors.values()))
        total = sum(len(s) for s in self.train_sources)
        logger.warning("skipped %d pair(s) with unreadable images: %s", len(dropped), "; ".join(out.errors.values()))
        self._log({"event": "skipped_pairs", "step": self.state["step"] + 1, "pairs": len(dropped),
                   "errors": sorted(set(out.errors.values()))})
        if len(bad_pairs) > self.config.max_bad_fraction * total:
            listing = "; ".join(self.state["bad_files"][:20])
            more = f" (+{len(self.state['bad_files']) - 20} more)" if len(self.state["bad_files"]) > 20 else ""
            raise DataError(f"{len(bad_pairs)} of {total} training pairs have unreadable images, more than "
                            f"max_bad_fraction={self.config.max_bad_fraction}: {listing}{more}",
                            "fix or remove these files, or raise max_bad_fraction")
        return len(dropped)

    # -- validation --------------------------------------------------------------------------------
    @torch.no_grad()
    def validate(self) -> dict:
        self.model.eval()
        accuracy, loss_sum, counted, skipped = PairwiseAccuracy(bootstrap=200), 0.0, 0, 0
        size = self.config.batch_size
        for start in range(0, len(self.valid_pairs), size):
            batch = self.valid_pairs[start : start + size]
            with self.accelerator.autocast():
                out = self.pair_rewards(batch)
            skipped += len(batch) - len(out.kept)
            if not out.kept:
                continue
            good, bad = out.preferred.float(), out.rejected.float()
            if not (torch.isfinite(good).all() and torch.isfinite(bad).all()):
                raise NonFiniteError(f"validation rewards are non-finite at step {self.state['step']}",
                                     f"lower lr (now {self.config.lr}); the last saved state in {self.state_root} "
                                     "is intact")
            loss_sum += float(self._pair_loss(out, batch)) * len(out.kept)
            counted += len(out.kept)
            for g, b, i in zip(good.tolist(), bad.tolist(), out.kept, strict=True):
                accuracy.update([g, b], [1, 1] if batch[i].tie else [1, 2])
        self.model.train()
        if not counted:
            raise DataError(f"no validation pair could be read ({skipped} skipped for unreadable images)")
        metrics = {"valid_loss": loss_sum / counted, "valid_accuracy": accuracy.compute()["accuracy"]}
        if skipped:
            metrics["valid_skipped"] = skipped
        return metrics

    # -- loop --------------------------------------------------------------------------------------
    def _train_step(self, step: int) -> dict:
        c = self.config
        last_loss, skipped = None, 0
        for k in range(c.grad_accum):
            source, chosen = self.batcher.indices(step * c.grad_accum + k)
            pairs = [self.train_sources[source][i] for i in chosen]
            with self.accelerator.accumulate(self.model), self.accelerator.autocast():
                out = self.pair_rewards(pairs)
                skipped += self._record_bad(source, chosen, out)
                if out.kept:
                    loss = self._pair_loss(out, pairs)
                    if not torch.isfinite(loss.detach()):
                        raise NonFiniteError(
                            f"training loss is {float(loss.detach())} at step {step + 1} (micro-batch {k})",
                            f"lower lr (now {c.lr}), use fp32, or check the data; nothing was saved from this step "
                            f"and the last saved state in {self.state_root} is intact")
                    self.accelerator.backward(loss)
                    last_loss = float(loss.detach())
                if self.accelerator.sync_gradients and c.max_grad_norm > 0:
                    self.accelerator.clip_grad_norm_(self.model.parameters(), c.max_grad_norm)
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad()
        record = {"step": step + 1, "loss": last_loss, "lr": self.scheduler.get_last_lr()[0]}
        if skipped:
            record["skipped_pairs"] = skipped
        return record

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
            record = self._train_step(step)
            self.state["step"] = step + 1
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
                   "skipped_pairs": len(self.state["bad_pairs"]), **self.trainable}
        if self.valid_pairs:
            summary.update(self.validate())
        self._log({"event": "end", **summary})
        if c.log_with:
            self.accelerator.end_training()
        return summary
