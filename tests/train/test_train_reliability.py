"""Training survives kills, bad images, diverging runs, changed settings and bad configs (issue 9, items 5-7)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import accelerate.checkpointing
import pytest
import torch
from click.testing import CliRunner

import rewardlab.io.atomic
from rewardlab.cli import cli
from rewardlab.config import load_config
from rewardlab.errors import ConfigError, DataError, NonFiniteError
from rewardlab.io.atomic import current_version
from rewardlab.io.checkpoint import read_state_dict
from rewardlab.models import get_architecture
from rewardlab.scoring.loader import save_checkpoint, spec_to_json
from rewardlab.testing import randomize, tiny_blip_spec
from rewardlab.testing.shapes import make_pairs
from rewardlab.train import Pair
from rewardlab.train.trainer import TrainConfig, Trainer

SPEC = spec_to_json(tiny_blip_spec("gelu"))


def _config(folder: Path, **overrides) -> TrainConfig:
    values = {"spec_json": SPEC, "output_dir": str(folder), "freeze_ratio": 0.5, "lr": 1e-3, "batch_size": 4,
              "max_steps": 4, "warmup_steps": 1, "eval_every": 0, "save_every": 2, "seed": 0, "cpu": True, "workers": 1}
    values.update(overrides)
    return TrainConfig(**values)


def _log(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]


def _same_weights(a: Path, b: Path) -> bool:
    left, right = read_state_dict(a), read_state_dict(b)
    return left.keys() == right.keys() and all(torch.equal(left[k], right[k]) for k in left)


class Kill(BaseException):
    """Stands for SIGKILL: not an Exception, so nothing on the way up handles it."""


class Injector:
    """Counts the write calls of a save and kills the process at call number ``target``: ``before`` the call
    runs, or ``torn``: the file is written, then cut to half its size."""

    def __init__(self, monkeypatch):
        self.armed, self.target, self.mode, self.calls = False, None, "before", []
        for module, name, file_arg in ((accelerate.checkpointing, "save", 1), (torch, "save", 1), (os, "replace", None),
                                       (os, "fsync", None), (shutil, "rmtree", None),
                                       (rewardlab.io.atomic, "write_text", None)):
            monkeypatch.setattr(module, name, self._wrap(f"{module.__name__}.{name}", getattr(module, name), file_arg))

    def _wrap(self, label: str, func, file_arg: int | None):
        def wrapper(*args, **kwargs):
            if not self.armed:
                return func(*args, **kwargs)
            self.calls.append((label, file_arg is not None))
            if len(self.calls) != self.target:
                return func(*args, **kwargs)
            self.armed = False
            if self.mode == "torn":
                func(*args, **kwargs)
                path = Path(args[file_arg])
                path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
            raise Kill(label)
        return wrapper


@pytest.fixture(scope="module")
def pairs() -> list[Pair]:
    return make_pairs(16, seed=3)


@pytest.fixture(scope="module")
def saved_runs(tmp_path_factory, pairs):
    """An uninterrupted 4-step run (states saved at steps 2 and 4) and a copy of a run stopped after its
    step-2 save."""
    root = tmp_path_factory.mktemp("runs")
    Trainer(_config(root / "reference"), [pairs]).train()

    def stop(step, trainer):
        if step == 2:
            raise Kill

    with pytest.raises(Kill):
        Trainer(_config(root / "at2"), [pairs], step_callback=stop).train()
    assert current_version(root / "at2" / "state").name == "step-00000002"
    return root


def _kill_during_step4_save(saved_runs, folder: Path, pairs, injector: Injector, target: int | None, mode: str) -> None:
    """Resume the step-2 run in ``folder`` with the step-4 save killed at write ``target``."""
    shutil.copytree(saved_runs / "at2", folder)
    original = Trainer.save_state

    injector.target, injector.mode, injector.calls = target, mode, []

    def save_state(trainer):
        injector.armed = trainer.state["step"] == 4
        try:
            return original(trainer)
        finally:
            injector.armed = False

    Trainer.save_state = save_state
    try:
        trainer = Trainer(_config(folder), [pairs])
        if target is None:
            trainer.train()
        else:
            with pytest.raises(Kill):
                trainer.train()
    finally:
        Trainer.save_state = original


def _assert_old_or_new_complete(folder: Path, references: dict[str, Path]) -> str:
    state = current_version(folder / "state")
    assert state is not None and state.name in references, state
    expected = references[state.name]
    assert sorted(p.name for p in state.iterdir()) == sorted(p.name for p in expected.iterdir())
    for file in expected.iterdir():
        assert (state / file.name).read_bytes() == file.read_bytes(), file.name
    return state.name


def _sweep(saved_runs, tmp_path, pairs, monkeypatch, every: int):
    injector = Injector(monkeypatch)
    _kill_during_step4_save(saved_runs, tmp_path / "count", pairs, injector, None, "before")
    points = list(injector.calls)
    assert len(points) >= 10 and any(label.endswith("os.replace") for label, _ in points)
    references = {"step-00000002": current_version(saved_runs / "at2" / "state"),
                  "step-00000004": current_version(tmp_path / "count" / "state")}
    reference_final = saved_runs / "reference" / "final.safetensors"
    assert _same_weights(tmp_path / "count" / "final.safetensors", reference_final)
    outcomes = {}
    scenarios = [(n, "before") for n in range(1, len(points) + 1)]
    scenarios += [(n, "torn") for n, (_, writes) in enumerate(points, start=1) if writes]
    for n, mode in scenarios[::every]:
        folder = tmp_path / f"kill{n}{mode}"
        _kill_during_step4_save(saved_runs, folder, pairs, injector, n, mode)
        outcomes[(n, mode)] = _assert_old_or_new_complete(folder, references)
        Trainer(_config(folder), [pairs]).train()  # the resume
        assert _same_weights(folder / "final.safetensors", reference_final), (n, mode, points[n - 1])
    assert set(outcomes.values()) == {"step-00000002", "step-00000004"} or every > 1
    return points, outcomes


def test_kill_at_sampled_write_points_of_a_save_leaves_old_or_new_state_and_resumes_bit_identical(
        saved_runs, tmp_path, pairs, monkeypatch):
    points, outcomes = _sweep(saved_runs, tmp_path, pairs, monkeypatch, every=4)
    assert len(outcomes) >= 5


@pytest.mark.slow
def test_kill_at_every_write_point_of_a_save(saved_runs, tmp_path, pairs, monkeypatch):
    points, outcomes = _sweep(saved_runs, tmp_path, pairs, monkeypatch, every=1)
    assert len(outcomes) == len(points) + sum(writes for _, writes in points)


def test_best_and_final_checkpoints_are_replaced_atomically_and_never_non_finite(tmp_path, monkeypatch):
    spec = tiny_blip_spec()
    model = get_architecture(spec.architecture).build(spec)
    randomize(model, 1)
    path = tmp_path / "best.safetensors"
    save_checkpoint(model, spec, path)
    before = path.read_bytes()
    randomize(model, 2)

    def killed(*args):
        raise Kill

    with monkeypatch.context() as patch:
        patch.setattr(os, "replace", killed)
        with pytest.raises(Kill):
            save_checkpoint(model, spec, path)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["best.safetensors"]
    with torch.no_grad():
        model.mlp.layers[0].weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="non-finite weights in mlp.layers.0.weight"):
        save_checkpoint(model, spec, path)
    assert path.read_bytes() == before


# -- non-finite training --------------------------------------------------------------------------------

def test_diverging_lr_stops_with_non_finite_error_and_saves_nothing_non_finite(tmp_path, pairs):
    config = _config(tmp_path / "run", lr=1e12, max_steps=20, save_every=1, eval_every=1, max_grad_norm=0.0)
    with pytest.raises(NonFiniteError, match=r"training loss is (nan|inf)|non-finite") as caught:
        Trainer(config, [pairs], make_pairs(8, seed=9)).train()
    assert "lower lr (now 1000000000000.0)" in str(caught.value) and "step " in str(caught.value)
    assert not (tmp_path / "run" / "final.safetensors").exists()
    saved = list((tmp_path / "run").rglob("*.safetensors"))
    assert saved  # states of the first steps were saved before the weights went bad ...
    for file in saved:  # ... and every one of them is finite
        assert all(torch.isfinite(t).all() for t in read_state_dict(file).values()), file
    log = _log(tmp_path / "run")
    assert all(r["loss"] is None or r["loss"] == r["loss"] for r in log if "loss" in r)  # no NaN was logged


def _pair_file(folder: Path, count: int) -> Path:
    """``count`` shape pairs (seed 4) saved as PNGs beside a pairs JSONL that names them relatively."""
    rows = []
    for n, p in enumerate(make_pairs(count, seed=4)):
        p.preferred_image.save(folder / f"g{n}.png")
        p.rejected_image.save(folder / f"b{n}.png")
        rows.append({"prompt": p.preferred_prompt, "preferred_image": f"g{n}.png", "rejected_image": f"b{n}.png"})
    data = folder / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return data


def test_cli_diverging_run_is_one_line_error(tmp_path):
    data = _pair_file(tmp_path, 8)
    result = CliRunner().invoke(cli, ["train", "-d", f"pairs:{data}", "-o", str(tmp_path / "out"), "--set",
                                      f"spec_json={SPEC}", "--set", "lr=1e12", "--set", "max_steps=30", "--set",
                                      "max_grad_norm=0", "--set", "batch_size=4", "--set", "cpu=true",
                                      "--set", "valid_fraction=0.25", "--set", "eval_every=0"])
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and result.output.count("error: ") == 1
    assert "non-finite" in result.output or "training loss is nan" in result.output


# -- unreadable images ------------------------------------------------------------------------------------

def _with_bad_images(pairs: list[Pair], folder: Path, bad: list[int]) -> list[Pair]:
    out = []
    for n, pair in enumerate(pairs):
        if n in bad:
            path = folder / f"broken{n}.png"
            path.write_bytes(b"\x89PNG\r\n\x1a\n not really")
            pair = Pair(pair.group_id, pair.preferred_prompt, str(path), pair.rejected_prompt, pair.rejected_image)
        out.append(pair)
    return out


def test_unreadable_image_is_skipped_counted_and_the_resume_passes_it(tmp_path, pairs):
    data = _with_bad_images(make_pairs(120, seed=5), tmp_path, [7])  # 1 of 120 pairs: 0.8 % < 1 %
    settings = {"max_steps": 30, "save_every": 2, "batch_size": 8}

    def stop(step, trainer):
        if step == 4:
            raise Kill

    # every epoch (15 micro-batches of 8) meets the broken pair once; the first run is killed before that
    with pytest.raises(Kill):
        Trainer(_config(tmp_path / "run", **settings), [data], step_callback=stop).train()
    summary = Trainer(_config(tmp_path / "run", **settings), [data]).train()  # resumes at step 4
    assert summary["steps"] == 30 and summary["skipped_pairs"] == 1
    log = _log(tmp_path / "run")
    skips = [r for r in log if r.get("event") == "skipped_pairs"]
    assert len(skips) == 2 and all(r["pairs"] == 1 for r in skips)  # epochs 1 and 2
    assert all("broken7.png" in r["errors"][0] for r in skips)
    skipped_steps = [r["step"] for r in log if "loss" in r and r.get("skipped_pairs")]
    assert skipped_steps == [r["step"] for r in skips]
    state = json.loads((current_version(tmp_path / "run" / "state") / "trainer_state.json").read_text())
    assert state["bad_pairs"] == [[0, 7]] and "broken7.png" in state["bad_files"][0]


def test_too_many_unreadable_images_stop_with_the_list(tmp_path):
    data = _with_bad_images(make_pairs(40, seed=6), tmp_path, [1, 2, 3])  # 3 of 40 = 7.5 %
    with pytest.raises(DataError, match=r"of 40 training pairs have unreadable images, more than "
                                        r"max_bad_fraction=0.05: .*broken\d\.png.*broken\d\.png") as caught:
        Trainer(_config(tmp_path / "run", max_bad_fraction=0.05, max_steps=20), [data]).train()
    assert "raise max_bad_fraction" in str(caught.value)
    summary = Trainer(_config(tmp_path / "ok", max_bad_fraction=0.1, max_steps=20), [data]).train()
    assert summary["skipped_pairs"] == 3


def test_unreadable_validation_images_are_left_out(tmp_path, pairs):
    valid = _with_bad_images(make_pairs(12, seed=8), tmp_path, [0, 5])
    trainer = Trainer(_config(tmp_path / "run", max_steps=1), [pairs], valid)
    metrics = trainer.validate()
    assert metrics["valid_skipped"] == 2
    reference = Trainer(_config(tmp_path / "ref", max_steps=1), [pairs], [p for n, p in enumerate(valid) if n not in (0, 5)])
    assert reference.validate()["valid_accuracy"] == metrics["valid_accuracy"]


# -- resume with other settings ---------------------------------------------------------------------------

def test_resume_with_changed_settings_or_data_is_refused_unless_allowed(tmp_path, pairs):
    def stop(step, trainer):
        if step == 2:
            raise Kill

    with pytest.raises(Kill):
        Trainer(_config(tmp_path / "run"), [pairs], step_callback=stop).train()
    with pytest.raises(ConfigError, match=r"saved with other settings \(lr 0.001 -> 0.002; batch_size 4 -> 8\)"):
        Trainer(_config(tmp_path / "run", lr=2e-3, batch_size=8), [pairs]).train()
    with pytest.raises(ConfigError, match="the training/validation pairs differ"):
        Trainer(_config(tmp_path / "run"), [make_pairs(16, seed=30)]).train()
    summary = Trainer(_config(tmp_path / "run", lr=2e-3, resume_mismatch_ok=True), [pairs]).train()
    assert summary["steps"] == 4
    events = [r for r in _log(tmp_path / "run") if r.get("event") in ("resume_mismatch", "resumed")]
    assert events[0]["event"] == "resume_mismatch" and events[0]["differences"] == ["lr 0.001 -> 0.002"]


def test_cli_resume_mismatch_flag(tmp_path):
    data = _pair_file(tmp_path, 16)
    config = tmp_path / "c.yaml"
    config.write_text(f"spec_json: '{SPEC}'\nbatch_size: 4\nmax_steps: 2\nsave_every: 1\neval_every: 0\ncpu: true\n"
                      "valid_fraction: 0.25\nfreeze_ratio: 0.5\n")
    base = ["train", "-c", str(config), "-d", f"pairs:{data}", "-o", str(tmp_path / "out")]
    assert CliRunner().invoke(cli, base).exit_code == 0
    refused = CliRunner().invoke(cli, [*base, "--set", "max_steps=3", "--set", "lr=3e-5"])
    assert refused.exit_code == 2 and "Traceback" not in refused.output
    assert "error: cannot resume" in refused.output and "lr 1e-05 -> 3e-05" in refused.output
    assert "--resume-mismatch-ok" in refused.output
    allowed = CliRunner().invoke(cli, [*base, "--set", "max_steps=3", "--set", "lr=3e-5", "--resume-mismatch-ok"])
    assert allowed.exit_code == 0, allowed.output
    assert json.loads(allowed.output[allowed.output.index("{"):])["steps"] == 3


# -- configuration errors ---------------------------------------------------------------------------------

@pytest.mark.parametrize("text, message", [
    ("lr: [1, 2\n", r"bad\.yaml line \d+: invalid YAML"),
    ("- a\n- b\n", r"bad\.yaml: expected key: value settings at the top level, got list"),
    ("batchsize: 4\n", r"bad\.yaml: unknown setting 'batchsize' — did you mean batch_size\?"),
    ("batch_size: 2.5\n", r"bad\.yaml: setting batch_size: 2\.5 is not an integer"),
    ("lr: .nan\n", r"bad\.yaml: setting lr: nan is not a finite number"),
    ("freeze_backbone: maybe\n", r"bad\.yaml: setting freeze_backbone: 'maybe' is not true/false"),
    ("mixed_precision: fp8\n", r"setting mixed_precision: 'fp8' is not one of no, bf16, fp16"),
    ("batch_size: 0\n", r"setting batch_size: 0 must be an integer >= 1"),
    ("freeze_layers: {vision: 2, txt: 1}\n", r"setting freeze_layers: .* expected \{vision: N, text: M\}"),
    ("data: {a: 1}\n", r"bad\.yaml: setting data: expected a list"),
])
def test_bad_config_files_are_one_line_config_errors(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message) as caught:
        TrainConfig.from_yaml(path)
    assert "\n" not in str(caught.value)


def test_config_types_overrides_and_typed_values(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lr: 2e-5\nmixed_precision: no\nmax_steps: 1e3\ndata: pairs:a.jsonl\nfreeze_layers: {vision: 3}\n")
    config = load_config(TrainConfig, path, ["batch_size=16", "include_ties=yes"],
                         {"data": ["pairs:x=1,y.jsonl", 'pairs:"quoted".jsonl'], "output_dir": "o=ut"})
    assert (config.lr, config.mixed_precision, config.max_steps, config.batch_size) == (2e-5, "no", 1000, 16)
    assert config.include_ties is True and config.freeze_layers == {"vision": 3}
    assert config.data == ["pairs:x=1,y.jsonl", 'pairs:"quoted".jsonl'] and config.output_dir == "o=ut"
    with pytest.raises(ConfigError, match=r"--set: setting lr: 'fast' is not a number"):
        load_config(TrainConfig, None, ["lr=fast"])
    with pytest.raises(ConfigError, match=r"override 'lrr=1': unknown setting 'lrr' — did you mean lr\?"):
        load_config(TrainConfig, None, ["lrr=1"])
    with pytest.raises(ConfigError, match=r"bad override 'lr': expected KEY=VALUE"):
        load_config(TrainConfig, None, ["lr"])
    with pytest.raises(ConfigError, match=r"cannot read config file .*missing\.yaml"):
        load_config(TrainConfig, tmp_path / "missing.yaml")


def test_cli_config_errors_are_one_line_with_exit_2(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("lr: [oops\n")
    for args, expected in ((["-c", str(bad)], "bad.yaml line"), (["--set", "batch_size=lots"], "batch_size: 'lots'"),
                           (["--set", "nope=1"], "unknown setting 'nope'"), (["-c", "no-such-recipe"], "no-such-recipe"),
                           ([], "no training data")):
        result = CliRunner().invoke(cli, ["train", "-o", str(tmp_path / "o"), *args])
        assert result.exit_code == 2, (args, result.output)
        assert result.output.startswith("error: ") and expected in result.output and "Traceback" not in result.output
