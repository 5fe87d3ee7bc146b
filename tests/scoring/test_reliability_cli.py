"""Hostile and careless input to the scoring CLI: one line naming the input, the right exit code, others scored."""

from __future__ import annotations

import csv
import io
import json
import os

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from rewardlab.cli import cli


def run(*args, env=None):
    return CliRunner().invoke(cli, [str(a) for a in args], env=env)


def one_error_line(result) -> str:
    lines = [line[line.index("error: "):] for line in result.output.splitlines() if "error: " in line]
    assert "Traceback" not in result.output, result.output
    assert lines, result.output
    return lines[0]


def test_unknown_model_suggests_close_names(image_dir):
    result = run("score", "-p", "x", image_dir, "-m", "imagereward-v1")
    assert result.exit_code == 2
    line = one_error_line(result)
    assert "unknown model 'imagereward-v1'" in line and "did you mean imagereward-v1.0" in line


def test_missing_checkpoint_path_is_named(image_dir, tmp_path):
    result = run("score", "-p", "x", image_dir, "-m", tmp_path / "nothing.safetensors")
    assert result.exit_code == 1
    assert "checkpoint file not found" in one_error_line(result) and "nothing.safetensors" in result.output


def test_checkpoint_of_the_wrong_model(image_dir, tiny_checkpoint, tmp_path):
    result = run("score", "-p", "x", image_dir, "-m", "pickscore-v1", "--checkpoint", tiny_checkpoint)
    line = one_error_line(result)
    assert result.exit_code == 1 and "holds a blip-reward model (tiny-blip-reward), not a clip model" in line
    import torch
    from safetensors.torch import load_file

    plain = tmp_path / "plain.pt"  # no embedded spec: the keys decide
    torch.save(load_file(tiny_checkpoint), plain)
    result = run("score", "-p", "x", image_dir, "-m", "pickscore-v1", "--checkpoint", plain)
    line = one_error_line(result)
    assert result.exit_code == 1 and "does not match the model" in line and "missing keys" in line


def test_cuda_on_a_cpu_machine(image_dir, tiny_checkpoint):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    result = run("score", "-p", "x", image_dir, "-m", tiny_checkpoint, "--device", "cuda")
    assert result.exit_code == 2 and "no CUDA GPU" in one_error_line(result)


@pytest.mark.parametrize("option,value,needle", [
    ("--batch-size", "-1", "--batch-size"), ("--batch-size", "0", "--batch-size"), ("--top-k", "0", "--top-k"),
    ("--min-score", "nan", "--min-score"), ("--min-score", "inf", "--min-score"),
])
def test_bad_numeric_options_fail_before_loading(image_dir, option, value, needle, monkeypatch):
    import rewardlab.scoring.loader as loader

    monkeypatch.setattr(loader, "load_model", lambda *a, **k: pytest.fail("model loaded before options were checked"))
    result = run("score", "-p", "x", image_dir, "-m", "imagereward-v1.0", option, value)
    assert result.exit_code == 2 and needle in result.output and "Traceback" not in result.output


def test_output_folder_missing_and_output_is_an_input(image_dir, tiny_checkpoint, tmp_path, monkeypatch):
    import rewardlab.scoring.loader as loader

    monkeypatch.setattr(loader, "load_model", lambda *a, **k: pytest.fail("model loaded before --output was checked"))
    result = run("score", "-p", "x", image_dir, "-m", tiny_checkpoint, "-o", tmp_path / "no" / "such" / "out.csv")
    assert result.exit_code == 2 and "does not exist" in one_error_line(result)
    victim = image_dir / "img0.png"
    before = victim.read_bytes()
    result = run("score", "-p", "x", image_dir, "-m", tiny_checkpoint, "-o", victim)
    assert result.exit_code == 2 and "is one of the inputs" in one_error_line(result)
    assert victim.read_bytes() == before


@pytest.mark.parametrize("row,needle", [
    ({"prompt": None, "image": "img0.png"}, "'prompt'"),
    ({"prompt": 12, "image": "img0.png"}, "'prompt' must be a non-empty string"),
    ({"prompt": "a cat"}, "needs a string 'image'"),
    ({"prompt": "a cat", "image": "../../etc/passwd"}, "outside the data folder"),
])
def test_prompts_file_rows_are_validated(image_dir, tiny_checkpoint, row, needle):
    good = {"prompt": "a cat", "image": "img1.png"}
    (image_dir / "jobs.jsonl").write_text(json.dumps(good) + "\n" + json.dumps(row) + "\n")
    result = run("score", "--prompts-file", image_dir / "jobs.jsonl", "-m", tiny_checkpoint)
    line = one_error_line(result)
    assert result.exit_code == 1 and "jobs.jsonl line 2" in line and needle in line


def test_prompts_file_paths_resolve_against_its_folder(image_dir, tiny_checkpoint, tmp_path, monkeypatch):
    (image_dir / "jobs.jsonl").write_text(json.dumps({"prompt": "a cat", "image": "img1.png"}) + "\n")
    monkeypatch.chdir(tmp_path)
    result = run("score", "--prompts-file", image_dir / "jobs.jsonl", "-m", tiny_checkpoint, "--format", "jsonl")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout.splitlines()[0])["image"] == str(image_dir / "img1.png")


def test_fifo_and_device_are_errors_and_others_still_scored(image_dir, tiny_checkpoint):
    os.mkfifo(image_dir / "pipe.png")
    os.symlink("/dev/zero", image_dir / "zero.png")
    result = run("score", "-p", "x", image_dir / "img0.png", image_dir / "pipe.png", image_dir / "zero.png",
                 image_dir / "img1.png", "-m", tiny_checkpoint, "--format", "jsonl")
    assert result.exit_code == 1
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["score"] is not None for r in rows] == [True, True, False, False]
    assert "2 of 4 images could not be scored" in result.output


def test_fifo_prompts_file_is_refused_without_reading(image_dir, tiny_checkpoint):
    os.mkfifo(image_dir / "jobs.jsonl")
    result = run("score", "--prompts-file", image_dir / "jobs.jsonl", "-m", tiny_checkpoint)
    assert "is a FIFO, not a regular file" in one_error_line(result)


def test_terminal_escapes_in_file_names_are_escaped(image_dir, tiny_checkpoint):
    evil = image_dir / "x\x1b[2J\x1b]0;owned\x07.png"
    Image.new("RGB", (40, 40), "red").save(image_dir / "img0.png")
    os.rename(image_dir / "img0.png", evil)
    (image_dir / "gone\x1b[31m.png").write_bytes(b"not an image")
    result = run("score", "-p", "x", evil, image_dir / "gone\x1b[31m.png", "-m", tiny_checkpoint)
    assert "\x1b" not in result.output and "\\x1b[2J" in result.output


def test_csv_cells_cannot_be_formulas(image_dir, tiny_checkpoint):
    result = run("score", "-p", '=HYPERLINK("http://evil","click")', image_dir / "img0.png", "-m", tiny_checkpoint,
                 "--format", "csv")
    assert result.exit_code == 0
    (row,) = list(csv.DictReader(io.StringIO(result.stdout)))
    assert row["prompt"].startswith("'=HYPERLINK")


def test_debug_flag_shows_the_traceback(image_dir):
    result = run("--debug", "score", "-p", "x", image_dir, "-m", "no-such-model")
    assert result.exception is not None and type(result.exception).__name__ == "UnknownModelError"
    env_result = run("score", "-p", "x", image_dir, "-m", "no-such-model", env={"REWARDLAB_DEBUG": "1"})
    assert type(env_result.exception).__name__ == "UnknownModelError"


def test_nan_weights_are_an_error_naming_the_checkpoint(tmp_path, image_dir):
    import torch

    from rewardlab.models import get_architecture
    from rewardlab.scoring.loader import save_checkpoint
    from rewardlab.testing import randomize, tiny_blip_spec

    spec = tiny_blip_spec()
    model = get_architecture(spec.architecture).build(spec)
    randomize(model, 0)
    path = tmp_path / "nan.safetensors"
    save_checkpoint(model, spec, path)
    from safetensors.torch import load_file, save_file

    state = load_file(str(path))
    state["mlp.layers.0.weight"] = torch.full_like(state["mlp.layers.0.weight"], float("nan"))
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    save_file(state, str(path), metadata=metadata)
    result = run("rank", "-p", "x", image_dir, "-m", path)
    line = one_error_line(result)
    assert result.exit_code == 1 and "non-finite scores" in line and "nan.safetensors" in line


def test_float_arrays_outside_unit_range_are_refused_with_a_hint(tiny_scorer):
    bright = np.full((32, 32, 3), 200.0, dtype=np.float32)
    result = tiny_scorer.score_detailed("x", [bright, bright / 255.0])
    assert "outside [0, 1]" in result.errors[0] and "divide 0-255 values by 255" in result.errors[0]
    assert 1 not in result.errors and np.isfinite(result.scores[1])


def test_eval_report_never_embeds_images_outside_the_data_folder(tmp_path, tiny_checkpoint):
    """A data file naming ../secret/private.png (or an absolute path) is refused; the report is not written.
    With --allow-outside-root the user takes responsibility and the images are scored and shown."""
    secret = tmp_path / "secret"
    secret.mkdir()
    Image.new("RGB", (40, 40), "red").save(secret / "private.png")
    data = tmp_path / "data"
    data.mkdir()
    Image.new("RGB", (40, 40), "blue").save(data / "ok.png")
    rows = [{"prompt": "p", "image_a": "ok.png", "image_b": "../secret/private.png", "label": "a"}]
    (data / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = tmp_path / "report.html"
    result = run("eval", "-m", tiny_checkpoint, "-d", f"pairs:{data / 'pairs.jsonl'}", "--report", report,
                 "--no-cache", "--no-progress")
    line = one_error_line(result)
    assert result.exit_code == 1 and "pairs.jsonl line 1 image_b" in line and "outside the data folder" in line
    assert not report.exists()
    rows[0]["image_b"] = str(secret / "private.png")
    (data / "pairs.jsonl").write_text(json.dumps(rows[0]) + "\n")
    assert "outside the data folder" in one_error_line(
        run("eval", "-m", tiny_checkpoint, "-d", f"pairs:{data / 'pairs.jsonl'}", "--no-cache", "--no-progress"))
    result = run("eval", "-m", tiny_checkpoint, "-d", f"pairs:{data / 'pairs.jsonl'}", "--report", report,
                 "--no-cache", "--no-progress", "--allow-outside-root")
    assert result.exit_code == 0 and report.read_text().count("data:image/") == 4  # 2 images x (human + model)
