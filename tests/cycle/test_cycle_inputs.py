"""Cycle data robustness: non-finite scores, stable splits, input files, resume consistency, unreadable
images, batching with per-image seeds, Parquet pair files."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from rewardlab.cli import cli
from rewardlab.cycle import (
    Candidate,
    CycleInput,
    CycleInputError,
    PairRules,
    PairStats,
    SsimDistance,
    assign_splits,
    build_pairs,
    export_pairs,
    read_inputs,
    run_i2t2i,
    run_t2i2t,
    split_of,
)
from rewardlab.testing.cycle_models import FixedCaptioner, PaintGenerator, PixelCaptioner
from rewardlab.train import load_pair_file


def word_overlap(refs, cands):
    return [len(set(r.split()) & set(c.split())) / 3 for r, c in zip(refs, cands, strict=True)]


word_overlap.name = "word-overlap"


@pytest.mark.parametrize("higher", [True, False])
def test_non_finite_scores_never_enter_a_pair_in_any_order(higher):
    scores = [("a", 0.9), ("b", math.nan), ("c", 0.5), ("d", math.inf)]
    expected = ("a", "c") if higher else ("c", "a")
    for order in itertools.permutations(scores):
        stats = PairStats()
        pairs = build_pairs([Candidate("i", m, 0, m, v) for m, v in order], PairRules(higher, 0.005), stats)
        assert [(g.model, b.model) for g, b in pairs] == [expected]
        assert stats.dropped == {"non-finite score": 2} and stats.kept == 1


def test_splits_hash_stable_as_inputs_grow_and_close_to_fractions():
    ids = [f"prompt-{n}" for n in range(4000)]
    small, large = assign_splits(ids[:50], seed=3), assign_splits(ids, seed=3)
    assert all(large[i] == split for i, split in small.items())  # adding inputs never moves one
    assert small == {i: split_of(i, 3) for i in ids[:50]}
    counts = {s: sum(v == s for v in large.values()) for s in ("train", "valid", "test")}
    assert abs(counts["train"] / 4000 - 0.9) < 0.02 and abs(counts["valid"] / 4000 - 0.05) < 0.015
    assert counts["train"] + counts["valid"] + counts["test"] == 4000
    assert assign_splits(ids, seed=4) != large


def test_read_inputs_names_bad_lines_and_duplicate_ids(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "prompt": "a cat"}\n{"id": "b", "text": "a dog"}\n')
    with pytest.raises(CycleInputError, match=r"bad\.jsonl line 2: needs a string 'prompt' \(has: id, text\)"):
        read_inputs(bad, "t2i2t")
    duplicate = tmp_path / "dup.jsonl"
    duplicate.write_text('{"id": "a", "prompt": "a cat"}\n\n{"id": "a", "prompt": "a dog"}\n')
    with pytest.raises(CycleInputError, match=r"dup\.jsonl: input id 'a' appears twice \(lines/entries 1 and 3\)"):
        read_inputs(duplicate, "t2i2t")
    torn = tmp_path / "torn.jsonl"
    torn.write_text('{"id": "a", "prompt": "a cat"}\n{"id": "b", "pro\n')
    with pytest.raises(CycleInputError, match=r"torn\.jsonl line 2: not valid JSON"):
        read_inputs(torn, "t2i2t")
    (tmp_path / "empty.txt").write_text("\n  \n")
    with pytest.raises(CycleInputError, match="no inputs found"):
        read_inputs(tmp_path / "empty.txt", "t2i2t")
    text = tmp_path / "prompts.txt"
    text.write_text("a cat\n\n  a dog  \n")
    assert read_inputs(text, "t2i2t") == [CycleInput("0", "a cat"), CycleInput("1", "a dog")]


def test_read_inputs_folder_ids_keep_subfolders_and_refuse_clashes(tmp_path):
    image = Image.new("RGB", (8, 8))
    for sub in ("x", "y"):
        (tmp_path / "data" / sub).mkdir(parents=True)
        image.save(tmp_path / "data" / sub / "1.png")
    image.save(tmp_path / "data" / "top.png")
    inputs = read_inputs(tmp_path / "data", "i2t2i")
    assert [i.input_id for i in inputs] == ["top", "x/1", "y/1"]
    assert inputs[1].value == str((tmp_path / "data" / "x" / "1.png").resolve())
    image.save(tmp_path / "data" / "top.jpg")
    with pytest.raises(CycleInputError, match=r"input id 'top' appears twice \(lines/entries top\.jpg and top\.png\)"):
        read_inputs(tmp_path / "data", "i2t2i")
    (tmp_path / "list.jsonl").write_text('{"id": "cat", "image": "data/x/1.png"}\n')
    assert read_inputs(tmp_path / "list.jsonl", "i2t2i") == [CycleInput("cat", inputs[1].value)]


def test_resume_refuses_an_edited_prompt_file_and_repeated_model_names(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red picture\na blue picture\n")
    run_t2i2t(read_inputs(prompts, "t2i2t"), [PaintGenerator("a")], PixelCaptioner(), word_overlap, [0], tmp_path / "run")
    prompts.write_text("a green picture\na red picture\na blue picture\n")  # a line inserted on top: ids shift
    with pytest.raises(CycleInputError, match=r"input id '0' was 'a red picture' in this run and is now 'a green picture'"):
        run_t2i2t(read_inputs(prompts, "t2i2t"), [PaintGenerator("a")], PixelCaptioner(), word_overlap, [0],
                  tmp_path / "run")
    with pytest.raises(ValueError, match="generator names must be unique.*repeated: a"):
        run_t2i2t(read_inputs(prompts, "t2i2t"), [PaintGenerator("a"), PaintGenerator("a")], PixelCaptioner(),
                  word_overlap, [0], tmp_path / "other")
    result = CliRunner().invoke(cli, ["cycle", "pairs", "--manifest", str(tmp_path / "nowhere"), "--out",
                                      str(tmp_path / "p")])
    assert result.exit_code != 0 and "nowhere" in result.output


class CountingGenerator(PaintGenerator):
    def __init__(self):
        super().__init__("paint")
        self.prompts = []

    def generate(self, prompts, seed):
        self.prompts.extend(prompts)
        return super().generate(prompts, seed)


def test_unreadable_image_is_logged_skipped_and_retried(tmp_path):
    folder = tmp_path / "inputs"
    folder.mkdir()
    for name, colour in (("a", "red"), ("b", "green"), ("c", "blue")):
        PaintGenerator().generate([f"a {colour} thing"], 1)[0].save(folder / f"{name}.png")
    good_b = (folder / "b.png").read_bytes()
    (folder / "b.png").write_bytes(b"not a png")
    captioners = [PixelCaptioner(), FixedCaptioner("always-black", "a black picture")]
    generator = CountingGenerator()
    manifest = run_i2t2i(read_inputs(folder, "i2t2i"), captioners, generator, SsimDistance(), 0, tmp_path / "run",
                         batch_size=2)
    assert sorted({r["input_id"] for r in manifest.rows.values()}) == ["a", "c"] and len(manifest.rows) == 4
    assert [e["input_id"] for e in manifest.errors] == ["b"] and "cannot decode image" in manifest.errors[0]["error"]
    logged = [json.loads(line) for line in (tmp_path / "run" / "errors.jsonl").read_text().splitlines()]
    assert logged == manifest.errors and logged[0]["input"].endswith("b.png")
    scores_before = {k: r["score"] for k, r in manifest.rows.items()}
    (folder / "b.png").write_bytes(good_b)
    generator.prompts.clear()
    resumed = run_i2t2i(read_inputs(folder, "i2t2i"), captioners, generator, SsimDistance(), 0, tmp_path / "run",
                        batch_size=2)
    assert generator.prompts == ["a green picture", "a black picture"]  # only b's two captions are redone
    assert len(resumed.rows) == 6 and not resumed.errors
    assert all(resumed.rows[k]["score"] == v for k, v in scores_before.items())


def test_diffusers_generator_images_do_not_depend_on_batching(tmp_path):
    from rewardlab.cycle import DiffusersGenerator
    from rewardlab.testing.diffusion import tiny_pipeline

    generator = DiffusersGenerator(tiny_pipeline(tmp_path / "g", seed=0), name="tiny", steps=2, guidance=3.0,
                                   height=16, width=16)
    batch = generator.generate(["a red cat", "a blue dog", "a green bird"], seed=5)
    alone = [generator.generate([p], seed=5)[0] for p in ("a red cat", "a blue dog", "a green bird")]
    for a, b in zip(batch, alone, strict=True):
        diff = np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int))
        assert a.size == (16, 16) and diff.max() <= 1  # 8-bit rounding of float batch effects at most
    other_seed = np.asarray(generator.generate(["a red cat"], seed=6)[0], dtype=int)
    assert np.abs(other_seed - np.asarray(alone[0], dtype=int)).max() > 10


def test_batched_run_equals_unbatched_and_parquet_matches_jsonl(tmp_path):
    inputs = [CycleInput(f"p{i}", f"a {c} picture") for i, c in enumerate(["red", "green", "blue", "white", "black"])]

    class PerPromptPaint(PaintGenerator):  # each image from (prompt, seed) alone, as the protocol asks
        def generate(self, prompts, seed):  # "b" paints white instead on seed 1: a worse candidate
            wrong = self.name == "b" and seed == 1
            return [PaintGenerator.generate(self, ["white" if wrong else p], seed + len(p))[0] for p in prompts]

    gens = [PerPromptPaint("a"), PerPromptPaint("b")]
    one = run_t2i2t(inputs, gens, PixelCaptioner(), word_overlap, [0, 1], tmp_path / "one", batch_size=1)
    three = run_t2i2t(inputs, gens, PixelCaptioner(), word_overlap, [0, 1], tmp_path / "three", batch_size=3)
    assert one.rows == three.rows and len(one.rows) == 20
    for row in one.rows.values():
        assert (tmp_path / "one" / row["output"]).read_bytes() == (tmp_path / "three" / row["output"]).read_bytes()
        assert row["backward_model"] == "pixel-captioner" and row["backward_params"] == PixelCaptioner.params
    stats, counts = export_pairs(tmp_path / "three", tmp_path / "pairs", PairRules(True, 0.005), formats=("jsonl", "parquet"))
    import pandas as pd

    for split in ("train", "valid", "test"):
        from_jsonl = [json.loads(line) for line in (tmp_path / "pairs" / f"{split}.jsonl").read_text().splitlines()]
        from_parquet = pd.read_parquet(tmp_path / "pairs" / f"{split}.parquet").to_dict("records")
        assert len(from_jsonl) == counts[split]
        assert [{k: (int(v) if isinstance(v, np.integer) else v) for k, v in r.items()} for r in from_parquet] == from_jsonl
        assert load_pair_file(tmp_path / "pairs" / f"{split}.parquet", allow_outside=True) == \
            load_pair_file(tmp_path / "pairs" / f"{split}.jsonl", allow_outside=True)
    # per prompt other than the white one: 3 right candidates beat b/seed 1 (overlap 1 vs 2/3), 3 ties
    assert sum(counts.values()) == stats.kept == 4 * 3 and stats.dropped == {"exact tie": 4 * 3 + 6}
    result = CliRunner().invoke(cli, ["cycle", "pairs", "--manifest", str(tmp_path / "three"), "--out",
                                      str(tmp_path / "cli"), "--format", "parquet"], catch_exceptions=False)
    assert result.exit_code == 0 and "pairs kept 12" in result.output and "exact tie: 18" in result.output
    assert sorted(f.name for f in (tmp_path / "cli").iterdir()) == ["test.parquet", "train.parquet", "valid.parquet"]
    def resolved(pairs):
        return [(p.group_id, p.preferred_prompt, Path(p.preferred_image).resolve(), Path(p.rejected_image).resolve())
                for p in pairs]

    assert resolved(load_pair_file(tmp_path / "cli" / "train.parquet", allow_outside=True)) == \
        resolved(load_pair_file(tmp_path / "pairs" / "train.jsonl", allow_outside=True))


def test_cli_reports_a_bad_prompt_file_by_name(tmp_path):
    bad = tmp_path / "prompts.jsonl"
    bad.write_text('{"prompt": "a cat"}\n{"prompt": ""}\n')
    result = CliRunner().invoke(cli, ["cycle", "t2i2t", "--prompts", str(bad), "--generator", "diffusers:x",
                                      "--captioner", "hf:y", "--out", str(tmp_path / "out")])
    assert result.exit_code == 1
    assert "prompts.jsonl line 2: 'prompt' must be a non-empty string" in result.output
    good = tmp_path / "prompts.txt"
    good.write_text("a cat\n")
    result = CliRunner().invoke(cli, ["cycle", "t2i2t", "--prompts", str(good), "--generator", "diffusers:x",
                                      "--captioner", "hf:y", "--seeds", "0,x", "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and "--seeds" in result.output and "'0,x'" in result.output


@pytest.mark.parametrize("kind", ["i2t2i", "t2i2t"])
def test_exported_pairs_identical_for_every_manifest_order(tmp_path, kind):
    """The direction bug end to end: manifest lines in any order give the same pair file."""
    scores = {"m1": 0.2, "m2": 0.5, "m3": 0.503, "m4": 0.8}
    higher = kind == "t2i2t"
    rows = [{"kind": kind, "input_id": "x", "input": "/data/x.png" if kind == "i2t2i" else "a cat", "model": m,
             "seed": 0, "params": {}, "output": f"a {m} caption" if kind == "i2t2i" else f"images/{m}.png",
             "reconstruction": "", "metric": "m", "score": v} for m, v in scores.items()]
    outputs = set()
    for n, order in enumerate(itertools.permutations(rows)):
        run = tmp_path / f"run{n}"
        run.mkdir()
        (run / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in order))
        export_pairs(run, run / "pairs", PairRules(higher, margin=0.005, floor=0.6))
        outputs.add((run / "pairs" / f"{split_of('x')}.jsonl").read_text())
    assert len(outputs) == 1
    pairs = [(r["preferred_model"], r["rejected_model"]) for r in map(json.loads, outputs.pop().splitlines())]
    if higher:  # higher wins, winner >= 0.6: only m4 can be preferred
        assert pairs == [("m4", "m1"), ("m4", "m2"), ("m4", "m3")]
    else:  # lower wins, winner <= 0.6; m2/m3 within the margin
        assert pairs == [("m1", "m2"), ("m1", "m3"), ("m1", "m4"), ("m2", "m4"), ("m3", "m4")]


def test_ssim_distance_from_scikit_image_equals_the_hand_formula():
    """The 1 − SSIM fallback now comes from scikit-image; it equals Wang et al.'s formula written out
    (11×11 Gaussian window, σ = 1.5, valid region, population statistics) to 1e-6."""
    import torch.nn.functional as F

    from rewardlab.cycle.similarity import SsimDistance

    def by_hand(distance, a, b):
        coords = torch.arange(11, dtype=torch.float64) - 5
        g = torch.exp(-(coords**2) / (2 * 1.5**2))
        g = (g / g.sum()).float()
        w = (g[:, None] * g[None, :])[None, None]
        x, y = distance._luma(a), distance._luma(b)
        mx, my = F.conv2d(x, w), F.conv2d(y, w)
        vx, vy, cov = F.conv2d(x * x, w) - mx**2, F.conv2d(y * y, w) - my**2, F.conv2d(x * y, w) - mx * my
        ssim = ((2 * mx * my + 1e-4) * (2 * cov + 9e-4)) / ((mx**2 + my**2 + 1e-4) * (vx + vy + 9e-4))
        return float(1 - ssim.mean())

    rng = np.random.RandomState(0)
    distance = SsimDistance()
    for _ in range(3):
        a = Image.fromarray((rng.rand(64, 80, 3) * 255).astype(np.uint8))
        noisy = np.clip(np.asarray(a).astype(int) + rng.randint(-40, 40, (64, 80, 3)), 0, 255).astype(np.uint8)
        b = Image.fromarray(noisy)
        assert distance.distance(a, b) == pytest.approx(by_hand(distance, a, b), abs=1e-6)
        assert distance.distance(a, a) == pytest.approx(0.0, abs=1e-9)
