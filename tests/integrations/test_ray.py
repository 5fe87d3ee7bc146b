"""Scoring and evaluation on Ray Data (rewardlab.integrations.ray) on a local 2-CPU Ray instance.

References: the direct Scorer and the single-process CLI on the same rows (scores must be bitwise equal),
and the single-process evaluation (metrics must be equal).
"""

from __future__ import annotations

import io
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image, ImageDraw

pytest.importorskip("ray.data")

from support import REPO  # noqa: E402

from rewardlab.cli import cli  # noqa: E402
from rewardlab.integrations import ray as rr  # noqa: E402


@pytest.fixture(scope="module")
def ray_instance():
    import ray

    rr.start_local(num_cpus=2)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield
    ray.shutdown()


@pytest.fixture()
def one_thread():
    """The actors run one intra-op thread each (num_cpus=1); CPU float sums depend on the thread count,
    so the single-process reference runs with one thread too."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _save_images(folder: Path, count: int, seed: int = 0) -> list[str]:
    rng = np.random.RandomState(seed)
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(count):
        h, w = 24 + (i * 7) % 30, 28 + (i * 5) % 26
        Image.fromarray((rng.rand(h, w, 3) * 255).astype(np.uint8)).save(folder / f"{i}.png")
        names.append(f"images/{i}.png")
    return names


@pytest.fixture()
def clean_manifest(tmp_path) -> Path:
    """40 rows with relative image paths; row 9 names a missing file (a per-row error in both paths)."""
    names = _save_images(tmp_path / "images", 40)
    names[9] = "images/missing.png"
    lines = [json.dumps({"prompt": f"a shape number {i % 5}", "image": name}) for i, name in enumerate(names)]
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


def _run(*args, catch: bool = False):
    return CliRunner().invoke(cli, [*map(str, args)], catch_exceptions=catch)


def _ray_score(manifest, output, checkpoint, *extra):
    return _run("score", "--ray", "--manifest", manifest, "--output", output, "--model", checkpoint,
                "--batch-size", 8, "--shard-rows", 16, "--workers", 2, "--no-progress", *extra)


# -- no Ray needed ---------------------------------------------------------------------------------------

class FakeScorer:
    """Records what it is asked to score; returns the given values (NaN for unreadable inputs)."""

    def __init__(self, values):
        self.values, self.calls = values, []

    def score_detailed(self, prompts, images, batch_size=None):
        from rewardlab import ScoreResult

        self.calls.append((list(prompts), list(images), batch_size))
        errors = {i: f"image #{i} (NoneType): unsupported" for i, image in enumerate(images) if image is None}
        return ScoreResult([math.nan if i in errors else v for i, v in enumerate(self.values)], errors)


def test_score_rows_validates_keeps_batch_slots_and_refuses_non_finite(tmp_path):
    scorer = FakeScorer([1.0, 2.0, float("inf"), 4.0, 5.0, float("nan"), 7.0])
    prompts = ["a", 3, "c", "d", None, "f", "g"]
    images = ["x.png", "y.png", b"\x89PNG", None, "z.png", np.zeros((4, 4, 3), np.uint8), {"path": "w.png"}]
    names = [f"m.jsonl line {i + 1}" for i in range(7)]
    scores, errors = rr.score_rows(scorer, prompts, images, names, batch_size=4, base_dir=tmp_path)
    assert scores == [1.0, None, None, None, None, None, 7.0]
    assert errors[1] == "m.jsonl line 2: prompt is int, not a string"
    assert errors[2] == "m.jsonl line 3: the model returned a non-finite score (inf)"
    assert errors[3] == "m.jsonl line 4: no image (missing or null)"
    assert errors[4] == "m.jsonl line 5: no prompt (missing or null)"
    assert errors[5] == "m.jsonl line 6: the model returned a non-finite score (nan)"
    sent_prompts, sent_images, batch = scorer.calls[0]
    assert batch == 4 and len(sent_images) == 7  # invalid rows keep their slot in the batches
    assert sent_images[0] == str(tmp_path / "x.png") and sent_images[6] == str(tmp_path / "w.png")
    assert sent_images[1] is None and sent_prompts[1] == "" and sent_images[3] is None


@pytest.mark.parametrize(("value", "reason"), [
    ("", "empty image path"), (b"", "empty image bytes"), (float("nan"), "no image (missing or null)"),
    ({"bytes": None, "path": None}, "image struct has neither bytes nor path"),
    ([1, 2], "image is list, not a path, encoded bytes or an array"),
])
def test_image_input_rejects_what_is_not_an_image(value, reason):
    assert rr.image_input(value) == (None, reason)


def test_plan_shards_counts_rows_and_offsets_of_jsonl(tmp_path):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"prompt": "a", "image": "0.png"}\n\n{"prompt": "b", "image": "1.png"}\n'
                        'not json\n  \n{"prompt": "d", "image": "3.png"}')  # no final newline
    shards = rr.plan_shards(manifest, shard_rows=2)
    assert [(s.first_row, s.rows, s.first_line) for s in shards] == [(0, 2, 1), (2, 2, 4)]
    names, prompts, images, errors = rr.read_shard(manifest, shards[1])
    assert names == [f"{manifest} line 4", f"{manifest} line 6"] and prompts == [None, "d"]
    assert images == [None, "3.png"] and errors[0].startswith(f"{manifest} line 4: not valid JSON")


def test_cli_usage_errors_need_no_ray(tmp_path, clean_manifest, tiny_checkpoint):
    result = _run("score", "--manifest", clean_manifest, "--output", tmp_path / "o", "--model", tiny_checkpoint)
    assert result.exit_code == 2 and "--manifest only apply with --ray" in result.output
    result = _run("score", "--ray", "--manifest", clean_manifest, "--output", tmp_path / "o", "--top-k", 1)
    assert result.exit_code == 2 and "--top-k cannot be used with --ray" in result.output
    result = _run("score", "--ray", "--output", tmp_path / "o")
    assert result.exit_code == 2 and "--ray needs --manifest" in result.output
    result = _run("score", "--ray", "--manifest", tmp_path / "m.csv", "--output", tmp_path / "o")
    assert result.exit_code == 2 and "neither .jsonl nor .parquet" in result.output
    result = _run("score", "--ray", "--manifest", clean_manifest, "--output", tmp_path / "o", "--model", "nope")
    assert result.exit_code == 2 and "nope" in result.output
    (tmp_path / "file").write_text("x")
    result = _run("score", "--ray", "--manifest", clean_manifest, "--output", tmp_path / "file")
    assert result.exit_code == 2 and "is a file" in result.output
    result = _run("score", "--prompt", "x", str(clean_manifest.parent / "images" / "0.png"), "--output", tmp_path)
    assert result.exit_code == 2 and "is a folder" in result.output  # single-process --output stays a file
    result = _run("eval", "--model", tiny_checkpoint, "--data", "x.json", "--workers", 2)
    assert result.exit_code == 2 and "--workers only apply with --ray" in result.output
    assert not (tmp_path / "o").exists()


# -- on the local Ray instance ---------------------------------------------------------------------------

def test_score_dataset_is_bitwise_equal_to_scorer(ray_instance, one_thread, tmp_path, tiny_checkpoint, tiny_scorer):
    import ray

    paths = [str(tmp_path / n) for n in _save_images(tmp_path / "images", 24, seed=1)]
    paths[5] = str(tmp_path / "images" / "gone.png")
    prompts = [f"prompt {i % 3}" for i in range(24)]
    encoded = []
    for path in paths[:12]:
        buffer = io.BytesIO()
        if Path(path).exists():
            Image.open(path).save(buffer, format="PNG")
        encoded.append(buffer.getvalue() if Path(path).exists() else b"not an image")
    rows = [{"id": i, "prompt": p, "image": x} for i, (p, x) in enumerate(zip(prompts, paths, strict=True))]
    ds = ray.data.from_items(rows, override_num_blocks=1)
    out = sorted(rr.score_dataset(ds, tiny_checkpoint, batch_size=8).take_all(), key=lambda r: r["id"])
    expected = tiny_scorer.score(prompts, paths, batch_size=8, errors="nan")
    assert [r["score"] for r in out if r["id"] != 5] == [s for i, s in enumerate(expected) if i != 5]
    assert out[5]["score"] is None and out[5]["error"] == f"{paths[5]}: file not found"
    assert all(r["error"] is None for r in out if r["id"] != 5)

    ds = ray.data.from_items([{"id": i, "prompt": prompts[i], "image": b} for i, b in enumerate(encoded)],
                             override_num_blocks=1)
    out = rr.score_dataset(ds, tiny_checkpoint, batch_size=8, id_column="id", drop_image=True).take_all()
    out.sort(key=lambda r: r["id"])
    expected = tiny_scorer.score(prompts[:12], encoded, batch_size=8, errors="nan")
    assert [r["score"] for r in out if r["error"] is None] == [s for i, s in enumerate(expected) if i != 5]
    assert out[5]["error"].startswith("id 5: image #5 (bytes): cannot decode image bytes")
    assert "image" not in out[0]


def test_score_cli_equals_single_process_cli(ray_instance, one_thread, tmp_path, clean_manifest, tiny_checkpoint,
                                             monkeypatch):
    result = _ray_score(clean_manifest, tmp_path / "out", tiny_checkpoint)
    assert result.exit_code == 1, result.output  # one row's image is missing
    assert "40 rows in 3 shards (3 scored now, 0 already done)" in result.output
    assert f"{clean_manifest} line 10: " in result.stderr and "missing.png: file not found" in result.stderr
    table = rr.read_scores(tmp_path / "out")
    assert table["row"].tolist() == list(range(40))

    monkeypatch.chdir(tmp_path)  # both commands resolve image paths against the manifest's folder, not the cwd
    single = _run("score", "--prompts-file", clean_manifest, "--model", tiny_checkpoint, "--batch-size", 8,
                  "--format", "jsonl", "--no-progress")
    reference = [json.loads(line) for line in single.stdout.splitlines()]
    assert len(reference) == 40
    by_image = {Path(r["image"]).relative_to(clean_manifest.parent).as_posix(): r for r in reference}
    for row in table.itertuples():
        expected = by_image[row.image]
        assert row.prompt == expected["prompt"]
        if "error" in expected:
            assert math.isnan(row.score) and row.error.endswith(expected["error"])
        else:
            assert row.score == expected["score"] and not isinstance(row.error, str)  # bitwise


def test_bad_rows_become_error_rows_and_the_rest_is_scored(ray_instance, one_thread, tmp_path, tiny_checkpoint, tiny_scorer):
    names = _save_images(tmp_path / "images", 12, seed=2)
    lines = [json.dumps({"prompt": f"p{i}", "image": name}) for i, name in enumerate(names)]
    lines[2] = json.dumps({"prompt": 7, "image": names[2]})
    lines[4] = '{"prompt": "truncated", "ima'
    lines[6] = json.dumps(["not", "an", "object"])
    lines[8] = json.dumps({"prompt": "no image"})
    manifest = tmp_path / "dirty.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    result = _ray_score(manifest, tmp_path / "out", tiny_checkpoint)
    assert result.exit_code == 1 and "4 of 12 rows could not be scored" in result.stderr
    table = rr.read_scores(tmp_path / "out")
    errors = dict(zip(table["row"], table["error"], strict=True))
    assert errors[2] == f"{manifest} line 3: prompt is int, not a string"
    assert errors[4].startswith(f"{manifest} line 5: not valid JSON")
    assert errors[6] == f"{manifest} line 7: expected a JSON object, got list"
    assert errors[8] == f"{manifest} line 9: no image (missing or null)"
    bad = {2, 4, 6, 8}
    # reference: the direct Scorer on the same list, the bad rows standing in as unreadable images
    images = [None if i in bad else str(tmp_path / n) for i, n in enumerate(names)]
    expected = tiny_scorer.score_detailed([f"p{i}" for i in range(12)], images, batch_size=8).scores
    assert [s for i, s in enumerate(table["score"]) if i not in bad] == [s for i, s in enumerate(expected)
                                                                         if i not in bad]
    assert all(math.isfinite(s) for i, s in enumerate(table["score"]) if i not in bad)


@pytest.mark.slow
def test_a_model_that_cannot_load_is_one_clear_error(ray_instance, tmp_path, clean_manifest):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a checkpoint")
    result = _ray_score(clean_manifest, tmp_path / "out", bad)
    assert result.exit_code == 1 and result.output.startswith(f"error: cannot read checkpoint {bad}")
    assert not list((tmp_path / "out").glob("part-*"))


def test_parquet_manifest_with_image_bytes(ray_instance, one_thread, tmp_path, tiny_checkpoint, tiny_scorer):
    import pyarrow as pa
    import pyarrow.parquet as pq

    paths = [tmp_path / n for n in _save_images(tmp_path / "images", 10, seed=3)]
    encoded = [p.read_bytes() for p in paths]
    encoded[3] = encoded[3][:40]  # truncated PNG
    images = [*encoded[:7], None, *encoded[8:]]
    table = pa.table({"prompt": [f"q{i}" for i in range(10)], "image": pa.array(images, pa.binary())})
    pq.write_table(table, tmp_path / "m.parquet", row_group_size=3)
    result = _ray_score(tmp_path / "m.parquet", tmp_path / "out", tiny_checkpoint, "--shard-rows", 8)
    assert result.exit_code == 1, result.output
    out = rr.read_scores(tmp_path / "out")
    assert out["error"][7] == f"{tmp_path / 'm.parquet'} row 7: no image (missing or null)"
    assert "row 3: " in out["error"][3] and "cannot decode image bytes" in out["error"][3]
    expected = tiny_scorer.score_detailed([f"q{i}" for i in range(10)], images, batch_size=8).scores
    assert [s for i, s in enumerate(out["score"]) if i not in (3, 7)] == [s for i, s in enumerate(expected)
                                                                          if i not in (3, 7)]


def test_resume_after_an_interrupted_run_gives_the_same_output(ray_instance, one_thread, tmp_path, clean_manifest,
                                                               tiny_checkpoint, tiny_scorer, monkeypatch):
    rows = [json.loads(line) for line in clean_manifest.read_text().splitlines()]
    reference = tiny_scorer.score_detailed([r["prompt"] for r in rows],
                                           [str(clean_manifest.parent / r["image"]) for r in rows], batch_size=8)

    def check(output: Path) -> None:
        table = rr.read_scores(output)
        assert table["row"].tolist() == list(range(40))  # no duplicates, none missing
        assert [s for i, s in enumerate(table["score"]) if i != 9] == [s for i, s in enumerate(reference.scores)
                                                                       if i != 9]
        assert table["error"][9].endswith(reference.errors[9])

    # the driver dies after writing the first shard it receives (the others are lost or in flight)
    written = []
    real_write = rr.write_shard

    def dying_write(path, shard, pieces):
        if written:
            raise KeyboardInterrupt("killed")
        written.append(shard.index)
        return real_write(path, shard, pieces)

    output = tmp_path / "out"
    monkeypatch.setattr(rr, "write_shard", dying_write)
    with pytest.raises(KeyboardInterrupt):
        rr.score_manifest(clean_manifest, output, tiny_checkpoint, batch_size=8, shard_rows=8, workers=2,
                          progress=False)
    monkeypatch.setattr(rr, "write_shard", real_write)
    assert len(list(output.glob("part-*.parquet"))) == 1
    (output / ".part-000004.parquet.abc.tmp").write_bytes(b"half a shard")  # a kill during a write
    first = output / rr.SHARD_NAME.format(written[0])
    stamp = first.stat().st_mtime_ns

    result = rr.score_manifest(clean_manifest, output, tiny_checkpoint, batch_size=8, shard_rows=8, workers=2,
                               progress=False)
    assert (result.shards, result.shards_scored, result.rows, result.errors) == (5, 4, 40, 1)
    assert first.stat().st_mtime_ns == stamp  # the finished shard was skipped
    assert not list(output.glob(".*.tmp"))
    check(output)

    # damage: one shard deleted, one truncated; the rerun redoes exactly those two
    (output / "part-000001.parquet").unlink()
    damaged = output / "part-000003.parquet"
    damaged.write_bytes(damaged.read_bytes()[:100])
    result = rr.score_manifest(clean_manifest, output, tiny_checkpoint, batch_size=8, shard_rows=8, workers=2,
                               progress=False)
    assert result.shards_scored == 2
    check(output)

    changed = _ray_score(clean_manifest, output, tiny_checkpoint)  # --shard-rows 16 now
    assert changed.exit_code == 2 and "holds a job with other settings (shard_rows: 8 then, 16 now" in changed.output


def _ranking_dataset(folder: Path) -> Path:
    """6 prompts x 4 images (ImageRewardDB layout) with one tie per prompt and one missing image."""
    colours = [(220, 30, 30), (30, 200, 60), (40, 60, 220), (230, 220, 40)]
    (folder / "images").mkdir(parents=True)
    items = []
    for p in range(6):
        generations = []
        for c, colour in enumerate(colours):
            image = Image.new("RGB", (40 + p, 36), (240, 240, 240))
            ImageDraw.Draw(image).ellipse((6 + c, 5, 30 + p, 30), fill=colour)
            image.save(folder / "images" / f"{p}_{c}.png")
            generations.append(f"images/{p}_{c}.png")
        items.append({"id": f"prompt{p}", "prompt": f"a shape {p}", "generations": generations,
                      "ranking": [1 + (p + c) % 3 for c in range(4)]})
    (folder / "images" / "4_2.png").unlink()
    (folder / "test.json").write_text(json.dumps(items))
    return folder / "test.json"


def test_eval_on_ray_equals_single_process(ray_instance, one_thread, tmp_path, tiny_checkpoint, tiny_scorer):
    from rewardlab.data import load_imagereward
    from rewardlab.eval import evaluate

    data = _ranking_dataset(tmp_path / "data")
    groups = load_imagereward(data)
    single = evaluate(tiny_scorer, groups, None, batch_size=4)
    distributed = rr.evaluate_on_ray(tiny_checkpoint, groups, batch_size=4, workers=2, groups_per_task=2)
    assert json.dumps(distributed.metrics) == json.dumps(single.metrics)  # NaN (recall@4) compares equal here
    assert distributed.metrics["groups"] == 5 and distributed.metrics["pairs"] > 0
    assert distributed.by_group_size == single.by_group_size
    assert distributed.errors == single.errors and "group prompt4" in single.errors[0]
    np.testing.assert_array_equal(np.array(distributed.scores), np.array(single.scores))

    outputs = []
    for extra in (["--no-cache"], ["--ray", "--workers", 2]):
        out = tmp_path / f"{extra[0]}.json"
        result = _run("eval", "--model", tiny_checkpoint, "--data", data, "--batch-size", 4, "--json", out,
                      "--no-progress", *extra)
        assert result.exit_code == 1 and "4_2.png: file not found" in result.stderr
        outputs.append(json.loads(out.read_text())["results"])
    assert outputs[0] == outputs[1]


@pytest.mark.slow
def test_killed_subprocess_resumes_to_the_same_output(tmp_path, tiny_checkpoint):
    """A real kill: the CLI in its own process (own local Ray instance) is killed after its first shard."""
    names = _save_images(tmp_path / "images", 96, seed=4)
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps({"prompt": f"p{i % 7}", "image": n}) + "\n" for i, n in enumerate(names)))
    command = [sys.executable, "-m", "rewardlab.cli", "score", "--ray", "--manifest", str(manifest), "--model",
               tiny_checkpoint, "--batch-size", "4", "--shard-rows", "4", "--workers", "1", "--no-progress"]
    env = {**__import__("os").environ, "PYTHONPATH": str(REPO)}
    process = subprocess.Popen([*command, "--output", str(tmp_path / "killed")], cwd=REPO, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and not list((tmp_path / "killed").glob("part-*.parquet")):
        time.sleep(0.2)
    process.kill()
    process.wait()
    done = len(list((tmp_path / "killed").glob("part-*.parquet")))
    assert 0 < done < 24
    for target in ("killed", "whole"):
        finished = subprocess.run([*command, "--output", str(tmp_path / target)], cwd=REPO, env=env,
                                  capture_output=True, text=True, timeout=300)
        assert finished.returncode == 0, finished.stderr
    resumed, whole = rr.read_scores(tmp_path / "killed"), rr.read_scores(tmp_path / "whole")
    assert resumed["row"].tolist() == list(range(96)) and resumed.equals(whole)
