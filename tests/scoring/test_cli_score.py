"""`rewardlab models|score|rank` end to end on a tiny checkpoint, checked against the Python API."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

from rewardlab.cli import cli


@pytest.fixture()
def run():
    runner = CliRunner()

    def invoke(*args):
        return runner.invoke(cli, [str(a) for a in args], catch_exceptions=False)

    return invoke


def test_models_lists_registry(run):
    result = run("models", "--format", "jsonl")
    rows = [json.loads(line) for line in result.output.splitlines()]
    by_name = {r["name"]: r for r in rows}
    assert by_name["imagereward-v1.0"]["weights"] == "THUDM/ImageReward/ImageReward.pt"
    assert by_name["cyclereward-t2i"]["max_tokens"] == "128"


def test_score_jsonl_equals_api(run, tiny_checkpoint, tiny_scorer, image_dir):
    result = run("score", "-m", tiny_checkpoint, "-p", "a cat", image_dir, "--format", "jsonl", "--no-progress")
    assert result.exit_code == 0
    rows = [json.loads(line) for line in result.output.splitlines()]
    images = sorted(str(p) for p in image_dir.glob("*.png"))
    assert [r["image"] for r in rows] == images
    assert [r["score"] for r in rows] == pytest.approx(tiny_scorer.score("a cat", images), abs=1e-6)


def test_rank_sorted_topk_and_missing_file(run, tiny_checkpoint, tiny_scorer, image_dir):
    images = sorted(str(p) for p in image_dir.glob("*.png"))
    missing = str(image_dir / "gone.png")
    result = run("rank", "-m", tiny_checkpoint, "-p", "a cat", *images, missing, "--format", "jsonl",
                 "--top-k", "2", "--no-progress")
    assert result.exit_code == 1
    assert "gone.png: file not found" in result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    scores = tiny_scorer.score("a cat", images)
    best_two = sorted(range(len(images)), key=lambda i: -scores[i])[:2]
    assert [r["image"] for r in rows] == [images[i] for i in best_two]
    assert [r["rank"] for r in rows] == [1, 2]


def test_prompts_file_min_score_csv_and_metadata(run, tiny_checkpoint, tiny_scorer, image_dir, tmp_path):
    images = sorted(str(p) for p in image_dir.glob("*.png"))
    prompts = ["a cat", "a dog", "a cat", "a dog", "a cat"]
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text("".join(json.dumps({"prompt": p, "image": i}) + "\n" for p, i in zip(prompts, images, strict=True)))
    expected = tiny_scorer.score(prompts, images)
    threshold = sorted(expected)[2]
    out = tmp_path / "out.csv"
    result = run("score", "-m", tiny_checkpoint, "--prompts-file", jobs, "--format", "csv", "-o", out,
                 "--min-score", threshold, "--write-metadata", "--no-progress")
    assert result.exit_code == 0
    lines = out.read_text().splitlines()
    assert lines[0] == "image,prompt,score,error"
    assert len(lines) - 1 == sum(s >= threshold for s in expected)
    stored = float(Image.open(images[0]).text["rewardlab:tiny.safetensors"])
    assert stored == pytest.approx(expected[0], abs=1e-5)


def test_usage_errors(run, tiny_checkpoint, tmp_path):
    assert "give --prompt" in run("score", "-m", tiny_checkpoint, "x.png").output
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a"}\n')
    assert "line 1" in run("score", "-m", tiny_checkpoint, "--prompts-file", bad).output


def test_rank_report_gallery_sorted_and_self_contained(image_dir, tiny_checkpoint, tmp_path):
    report = tmp_path / "rank.html"
    result = CliRunner().invoke(cli, ["rank", "-p", "a cat", str(image_dir), "-m", tiny_checkpoint, "--format", "jsonl",
                                      "--report", str(report), "--no-progress"])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    page = report.read_text()
    assert page.count("data:image/") == len(rows) == 5 and "tiny.safetensors" in page
    names = [Path(r["image"]).name for r in sorted(rows, key=lambda r: r["rank"])]
    positions = [page.index(name) for name in names]
    assert positions == sorted(positions)  # best first, as ranked
