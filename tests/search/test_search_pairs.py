"""Reward-labelled pairs (hand-checked pairing, Pick-a-Pic Parquet and pair-file round trips through
datasets, eval and train), the HTML gallery, and the search / pairs command lines."""

from __future__ import annotations

import json
import math
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

import rewardlab
from rewardlab.cli import cli
from rewardlab.errors import DataError
from rewardlab.report.gallery import GalleryImage, GallerySection, render_gallery, write_gallery
from rewardlab.scoring.ensemble import RewardEnsemble
from rewardlab.search.pairs import (
    CandidateGroup,
    build_pairs,
    discover_candidates,
    export_pairs,
    make_pairs_from_folder,
    score_groups,
)
from rewardlab.testing.shapes import COLOURS, SHAPES, draw

PROMPTS = ["a red circle", "a blue square", "a green triangle"]


def _candidate_folder(root: Path, per_prompt: int = 4) -> Path:
    rng = random.Random(0)
    for n, prompt in enumerate(PROMPTS):
        folder = root / f"prompt{n}"
        folder.mkdir(parents=True)
        (folder / "prompt.txt").write_text(prompt + "\n")
        for k in range(per_prompt):
            draw(rng.choice(list(COLOURS)), rng.choice(SHAPES), rng).save(folder / f"img{k}.png")
    return root


def test_pairs_by_hand():
    group = CandidateGroup("g", "p", [Path(f"{i}.png") for i in range(5)], [0.1, 0.5, 0.5, math.nan, 0.9])
    [pair] = build_pairs([group], "best-vs-worst")
    assert (pair.preferred.name, pair.rejected.name, round(pair.margin, 9)) == ("4.png", "0.png", 0.8)
    assert build_pairs([group], "best-vs-worst", min_margin=0.85) == []
    found = {(p.preferred.name, p.rejected.name) for p in build_pairs([group], "all-pairs", min_margin=0.3)}
    assert found == {("1.png", "0.png"), ("2.png", "0.png"), ("4.png", "0.png"), ("4.png", "1.png"),
                     ("4.png", "2.png")}  # the 0.5/0.5 tie and the NaN candidate are never paired
    tied = CandidateGroup("t", "p", [Path("a.png"), Path("b.png")], [0.3, 0.3])
    assert build_pairs([tied], "all-pairs") == [] and build_pairs([tied], "best-vs-worst") == []


def test_export_round_trips_through_datasets_eval_and_train(tmp_path, tiny_checkpoint):
    root = _candidate_folder(tmp_path / "cands")
    ensemble = RewardEnsemble([rewardlab.load(tiny_checkpoint)])
    export = make_pairs_from_folder(ensemble, root, tmp_path / "out", strategy="all-pairs", min_margin=0.0)
    assert export.prompts == 3 and export.candidates == 12 and export.errors == 0
    scores = [json.loads(line) for line in (tmp_path / "out" / "scores.jsonl").read_text().splitlines()]
    direct = ensemble.scorers[0].score([r["prompt"] for r in scores],
                                       [str(tmp_path / "out" / r["image"]) for r in scores])
    assert [r["score"] for r in scores] == pytest.approx(direct, abs=1e-6)
    assert export.pairs == 3 * 6  # random scores: no ties among 4 candidates

    import datasets

    table = datasets.load_dataset("parquet", data_files=str(tmp_path / "out" / "pairs.parquet"), split="train")
    assert {"caption", "jpg_0", "jpg_1", "label_0", "label_1"} <= set(table.column_names)
    assert len(table) == export.pairs and 0 < sum(table["label_0"]) < len(table)  # preferred side shuffled
    for row in table:
        assert (row["label_0"] == 1.0) == (row["score_0"] > row["score_1"]) and row["label_0"] + row["label_1"] == 1
        assert row["jpg_0"] == (tmp_path / "out" / row["image_0_uid"]).read_bytes()
    from rewardlab.data.hf import load_hf
    from rewardlab.train.data import load_pair_file

    groups = load_hf("pickapic", str(tmp_path / "out" / "pairs.parquet"))
    assert len(groups) == export.pairs and all(g.ranking in ([1.0, 2.0], [2.0, 1.0]) for g in groups)
    with pytest.raises(DataError, match="outside the data folder"):  # the candidates live beside out/, not in it
        load_pair_file(tmp_path / "out" / "pairs.jsonl")
    pairs = load_pair_file(tmp_path / "out" / "pairs.jsonl", allow_outside=True)
    assert len(pairs) == export.pairs and all(Path(p.preferred_image).is_file() for p in pairs)

    runner = CliRunner()
    for data in (f"hf:pickapic:{tmp_path / 'out' / 'pairs.parquet'}", f"pairs:{tmp_path / 'out' / 'pairs.jsonl'}"):
        result = runner.invoke(cli, ["eval", "-m", tiny_checkpoint, "-d", data, "--no-cache", "--no-progress",
                                     "--allow-outside-root", "--json", str(tmp_path / "eval.json")],
                               catch_exceptions=False)
        assert result.exit_code == 0, result.output
        metrics = json.loads((tmp_path / "eval.json").read_text())["results"][0]["metrics"]
        assert metrics["pairs"] == export.pairs and metrics["accuracy"] == 1.0  # the labeller agrees with itself

    from rewardlab.scoring.loader import spec_to_json
    from rewardlab.testing import tiny_blip_spec

    config = tmp_path / "tiny.yaml"
    config.write_text(f"spec_json: '{spec_to_json(tiny_blip_spec())}'\nfreeze_ratio: 0.0\nbatch_size: 4\n"
                      "max_steps: 4\neval_every: 4\nsave_every: 0\nlr: 1.0e-4\ncpu: true\nvalid_fraction: 0.34\n")
    result = runner.invoke(cli, ["train", "-c", str(config), "-d", f"hf:pickapic:{tmp_path / 'out' / 'pairs.parquet'}",
                                 "-o", str(tmp_path / "student")], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    student = rewardlab.load(tmp_path / "student" / "final.safetensors")
    assert len(student.score("a red circle", [str(root / "prompt0" / "img0.png")])) == 1


def test_candidates_outside_the_folder_are_refused(tmp_path):
    root = _candidate_folder(tmp_path / "cands", per_prompt=2)
    Image.new("RGB", (8, 8)).save(tmp_path / "secret.png")
    (root / "prompt0" / "link.png").symlink_to(tmp_path / "secret.png")
    with pytest.raises(DataError, match="points outside"):
        discover_candidates(root)


def test_gallery_sorts_marks_labels_and_embeds_only_allowed_images(tmp_path):
    from rewardlab.testing import make_random_checkpoint

    first = make_random_checkpoint(tmp_path / "reward-a.safetensors", seed=1)
    second = make_random_checkpoint(tmp_path / "reward-b.safetensors", seed=2)
    ensemble = RewardEnsemble([rewardlab.load(first), rewardlab.load(second)], normalize="rank")
    assert ensemble.labels == ["reward-a.safetensors", "reward-b.safetensors"]
    root = _candidate_folder(tmp_path / "cands", per_prompt=3)
    groups = discover_candidates(root)
    score_groups(ensemble, groups)
    pairs = build_pairs(groups)
    export_pairs(pairs, groups, tmp_path / "out", ensemble.labels, formats=(), data_root=root)
    page = (tmp_path / "out" / "gallery.html").read_text()
    assert "reward-a.safetensors" in page and "reward-b.safetensors" in page
    assert page.count("data:image/png;base64,") == 9 and page.count("badge preferred") == 3
    outside = tmp_path / "elsewhere.png"
    Image.new("RGB", (8, 8), (255, 0, 0)).save(outside)
    section = GallerySection("<script>alert(1)</script>", [
        GalleryImage(str(outside), 0.2, {"m": 0.2}, caption="outside"),
        GalleryImage(np.zeros((4, 4, 3), np.uint8), 0.9, {"m": 0.9}, "chosen", "in memory"),
        GalleryImage(root / "prompt0" / "img0.png", None, {"m": None}, caption="broken", error="m: non-finite")],
        budget=[(4, 0.2), (12, 0.9)])
    html = render_gallery([section], ["m"], allowed_roots=[root])
    assert "<script>alert" not in html and "&lt;script&gt;" in html
    assert "not embedded (outside the data folder)" in html and html.count("data:image/png;base64,") == 2
    scores = [s.split('"')[0] for s in html.split('data-score="')[1:]]
    assert scores == ["0.9000", "0.2000", "–"]  # best first, errors last
    assert "<svg class='budget'" in html and "badge chosen" in html
    write_gallery(tmp_path / "g.html", [section], ["m"], allowed_roots=[root])
    from types import SimpleNamespace

    from rewardlab.report.gallery import ranking_gallery

    rows = [SimpleNamespace(image=str(root / "prompt0" / f"img{i}.png"), prompt="p", score=s, rank=r, error=None)
            for i, (s, r) in enumerate([(0.1, 2), (0.7, 1)])]
    ranked = ranking_gallery(tmp_path / "rank.html", rows, "tiny.safetensors", [root / "prompt0" / "img1.png"])
    text = ranked.read_text()
    assert text.count("data:image/png;base64,") == 1 and "badge chosen" in text  # only the named image embedded
    if shutil.which("chromium") is None:
        pytest.skip("chromium not on PATH: headless rendering not checked")
    import subprocess

    shot = tmp_path / "shot.png"
    subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={shot}",
                    "--window-size=900,700", (tmp_path / "g.html").as_uri()], check=True, timeout=120,
                   capture_output=True)
    pixels = np.asarray(Image.open(shot).convert("RGB"))
    assert pixels.std() > 5  # something was drawn


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    from rewardlab.testing.diffusion import tiny_pipeline

    folder = tmp_path_factory.mktemp("pipe")
    tiny_pipeline(folder / "build", seed=0).save_pretrained(folder / "pipe")
    return str(folder / "pipe")


def test_search_and_pairs_command_lines(tmp_path, pipeline_dir, tiny_checkpoint):
    runner = CliRunner()
    bad = runner.invoke(cli, ["search", "--pipeline", "/does/not/exist", "-p", "x", "-o", str(tmp_path / "r"),
                              "--method", "zero-order", "--threshold", "1.5"])
    assert bad.exit_code == 2 and "error: threshold 1.5" in bad.output  # checked before loading anything
    args = ["search", "--pipeline", pipeline_dir, "-p", "a red circle", "-p", "a blue square", "-r", tiny_checkpoint,
            "-n", "3", "--steps", "2", "--guidance-scale", "1", "-o", str(tmp_path / "run")]
    result = runner.invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "2 prompt(s), 0 already done, 12 NFEs" in result.output
    results = [json.loads(line) for line in (tmp_path / "run" / "results.jsonl").read_text().splitlines()]
    assert [r["num_candidates"] for r in results] == [3, 3]
    assert (tmp_path / "run" / "gallery.html").read_text().count("badge chosen") == 2
    again = runner.invoke(cli, args, catch_exceptions=False)
    assert "2 already done, 12 NFEs" in again.output
    pairs = runner.invoke(cli, ["pairs", str(tmp_path / "run"), "-r", tiny_checkpoint, "-o", str(tmp_path / "pairs")],
                          catch_exceptions=False)
    assert pairs.exit_code == 0, pairs.output
    summary = json.loads(pairs.output.strip().splitlines()[-1])
    assert summary["pairs"] == 2 and summary["candidates"] == 6
    rows = [json.loads(line) for line in (tmp_path / "pairs" / "pairs.jsonl").read_text().splitlines()]
    best = {r["prompt_id"]: r["best"] for r in results}
    for row in rows:  # the same reward: the preferred image is the search's chosen one
        assert row["preferred_image"].endswith(f"prompts/{row['input_id']}/c{best[row['input_id']]:05d}.png")
