"""`rewardlab eval` end to end on a small ImageRewardDB-format dataset drawn with PIL."""

from __future__ import annotations

import json
import shutil
import subprocess

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image, ImageDraw
from support import official_test_loop

from rewardlab.cli import cli
from rewardlab.data import load_imagereward

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (40, 60, 220), "yellow": (230, 220, 40)}


@pytest.fixture()
def dataset(tmp_path):
    """3 prompts x 4 images, ImageRewardDB layout (relative paths + rankings, one tie)."""
    items = []
    for p, (colour, shape) in enumerate([("red", "circle"), ("blue", "square"), ("green", "circle")]):
        generations, ranking = [], []
        for c, other in enumerate(COLOURS):
            image = Image.new("RGB", (48, 40), (240, 240, 240))
            draw = ImageDraw.Draw(image)
            (draw.ellipse if shape == "circle" else draw.rectangle)((8, 6, 40, 34), fill=COLOURS[other])
            rel = f"images/{p}_{c}.png"
            (tmp_path / "images").mkdir(exist_ok=True)
            image.save(tmp_path / rel)
            generations.append(rel)
            ranking.append(1 if other == colour else (2 if c < 2 else 3))
        items.append({"id": f"prompt{p}", "prompt": f"a {colour} {shape}", "generations": generations, "ranking": ranking})
    (tmp_path / "test.json").write_text(json.dumps(items))
    return tmp_path


def _run(*args):
    return CliRunner().invoke(cli, ["eval", *map(str, args), "--no-progress"], catch_exceptions=False)


def test_eval_matches_official_logic_and_caches(dataset, tiny_checkpoint, tiny_scorer, tmp_path):
    cache = tmp_path / "cache.sqlite"
    out = tmp_path / "out.json"
    result = _run("--model", tiny_checkpoint, "--data", f"imagereward:{dataset / 'test.json'}", "--json", out,
                  "--cache", cache)
    assert result.exit_code == 0, result.output
    metrics = json.loads(out.read_text())["results"][0]
    groups = load_imagereward(dataset / "test.json")
    scores = [tiny_scorer.score(g.prompt, g.images) for g in groups]
    expected, pairs = official_test_loop(scores, [g.ranking for g in groups])
    assert metrics["metrics"]["pairs"] == pairs == 3 * 5  # 6 pairs per prompt minus one tie
    assert metrics["metrics"]["accuracy"] == pytest.approx(expected, abs=1e-12)
    assert metrics["scored_now"] == 12
    assert "accuracy" in result.output and "tiny.safetensors" in result.output

    again = _run("--model", tiny_checkpoint, "--data", str(dataset / "test.json"), "--json", out, "--cache", cache)
    second = json.loads(out.read_text())["results"][0]
    assert again.exit_code == 0 and second["scored_now"] == 0
    assert second["metrics"]["accuracy"] == metrics["metrics"]["accuracy"]


def test_missing_image_reported_and_group_left_out(dataset, tiny_checkpoint, tmp_path):
    (dataset / "images" / "1_2.png").unlink()
    out = tmp_path / "o.json"
    result = _run("--model", tiny_checkpoint, "--data", f"imagereward:{dataset / 'test.json'}", "--json", out, "--no-cache")
    assert result.exit_code == 1
    assert "group prompt1" in result.stderr and "1_2.png: file not found" in result.stderr
    metrics = json.loads(out.read_text())["results"][0]["metrics"]
    assert metrics["pairs"] == 10 and metrics["groups"] == 2


def test_two_models_and_html_report(dataset, tiny_checkpoint, tmp_path):
    from rewardlab.testing import make_random_checkpoint, tiny_blip_spec

    other = make_random_checkpoint(tmp_path / "other.safetensors", tiny_blip_spec("gelu", name="tiny-gelu"), seed=5)
    report = tmp_path / "report.html"
    result = _run("--model", tiny_checkpoint, "--model", other, "--data", f"imagereward:{dataset / 'test.json'}",
                  "--report", report, "--no-cache")
    assert result.exit_code == 0
    page = report.read_text()
    assert page.count("<svg") == 2 and "other.safetensors" in page and "tiny.safetensors" in page
    assert page.count("data:image/png;base64") >= 3 * 4 and "Accuracy by images per prompt" in page
    assert "http://" not in page and "https://" not in page  # self-contained


def test_report_renders_in_headless_chromium(dataset, tiny_checkpoint, tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("chromium not installed (apt-get install chromium)")
    report = tmp_path / "report.html"
    _run("--model", tiny_checkpoint, "--data", f"imagereward:{dataset / 'test.json'}", "--report", report, "--no-cache")
    shot = tmp_path / "shot.png"
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                    "--disable-component-update", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
                    f"--screenshot={shot}", "--window-size=1200,1400", f"file://{report}"],
                   check=True, capture_output=True, timeout=120)
    pixels = np.asarray(Image.open(shot).convert("RGB"), dtype=np.float32)
    assert pixels.shape[:2] == (1400, 1200)
    blue = (pixels[..., 2] > 150) & (pixels[..., 0] < 120)  # histogram bars are #4a7bd0
    assert blue.sum() > 500, "histogram bars not drawn"
    assert pixels.std() > 20


def test_generator_ranking_against_human_order(tmp_path, tiny_checkpoint, tiny_scorer):
    from scipy.stats import kendalltau, spearmanr

    prompts = [{"id": i, "prompt": p} for i, p in enumerate(["a red circle", "a blue square", "a green circle"])]
    (tmp_path / "prompts.json").write_text(json.dumps(prompts))
    rng = np.random.RandomState(0)
    means = {}
    for gen in ("genA", "genB", "genC"):
        (tmp_path / "out" / gen).mkdir(parents=True)
        paths = []
        for item in prompts:
            path = tmp_path / "out" / gen / f"{item['id']}.png"
            Image.fromarray((rng.rand(40, 40, 3) * 255).astype(np.uint8)).save(path)
            paths.append(str(path))
        means[gen] = float(np.mean(tiny_scorer.score([p["prompt"] for p in prompts], paths)))
    human = {"genA": 1, "genB": 2, "genC": 3}
    (tmp_path / "human.json").write_text(json.dumps(human))
    out = tmp_path / "g.json"
    result = _run("--model", tiny_checkpoint, "--data", f"generators:{tmp_path / 'out'}", "--prompts",
                  tmp_path / "prompts.json", "--human-ranking", tmp_path / "human.json", "--json", out, "--no-cache")
    assert result.exit_code == 0, result.output
    info = json.loads(out.read_text())["results"][0]["generators"]
    assert info["order"] == sorted(means, key=lambda g: -means[g])
    assert info["mean_reward"] == pytest.approx(means, abs=1e-6)
    rewards, ranks = [means[g] for g in human], [-human[g] for g in human]
    assert info["spearman"] == pytest.approx(spearmanr(rewards, ranks).statistic)
    assert info["kendall"] == pytest.approx(kendalltau(rewards, ranks).statistic)
    assert "generators best first" in result.output
