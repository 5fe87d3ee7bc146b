"""Cycle-consistency data: pair rules in every candidate order, metrics, end-to-end runs, crash/resume."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from rewardlab.cli import cli
from rewardlab.cycle import (
    Candidate,
    CycleInput,
    DiffusersGenerator,
    Manifest,
    PairRules,
    PairStats,
    SsimDistance,
    build_pairs,
    export_pairs,
    run_i2t2i,
    run_t2i2t,
)
from rewardlab.testing.cycle_models import NAMED, FixedCaptioner, PaintGenerator, PixelCaptioner  # noqa: F401
from rewardlab.testing.diffusion import tiny_pipeline
from rewardlab.train import load_pair_file

SCORES = [("m1", 0, "x", 0.9), ("m2", 0, "y", 0.5), ("m3", 0, "z", 0.502), ("m4", 0, "w", 0.1)]


@pytest.mark.parametrize("higher", [True, False])
def test_pair_rules_same_result_in_every_candidate_order(higher):
    candidates = [Candidate("in", m, s, o, v) for m, s, o, v in SCORES]
    rules = PairRules(higher_is_better=higher, margin=0.005, floor=0.3 if higher else 0.6)
    results = set()
    for order in itertools.permutations(candidates):
        pairs = build_pairs(list(order), rules)
        results.add(tuple((good.model, bad.model) for good, bad in pairs))
    assert len(results) == 1
    (pairs,) = results
    if higher:  # similarity: bigger wins; m2-m3 within margin; m4 never preferred; floor 0.3 drops nothing else
        assert set(pairs) == {("m1", "m2"), ("m1", "m3"), ("m1", "m4"), ("m2", "m4"), ("m3", "m4")}
    else:  # distance: smaller wins; preferred must be <= 0.6: m1 (0.9) never preferred
        assert set(pairs) == {("m2", "m1"), ("m3", "m1"), ("m4", "m1"), ("m4", "m2"), ("m4", "m3")}


def test_pair_rules_duplicates_ties_and_floor_counted():
    candidates = [Candidate("i", "a", 0, "A cat.", 0.8), Candidate("i", "b", 0, "a cat.", 0.7),
                  Candidate("i", "c", 0, "a dog", 0.8), Candidate("i", "d", 0, "a bird", 0.35)]
    stats = PairStats()
    pairs = build_pairs(candidates, PairRules(True, margin=0.005, floor=0.5), stats)
    assert [(g.model, b.model) for g, b in pairs] == [("a", "d"), ("c", "d")]
    assert stats.dropped == {"duplicate output": 1, "exact tie": 1}
    stats = PairStats()
    assert build_pairs(candidates, PairRules(True, floor=0.9), stats) == []
    assert stats.dropped["preferred below quality floor"] == 2 and stats.dropped["exact tie"] == 1


def test_ssim_distance_fallback():
    metric = SsimDistance()
    rng = np.random.RandomState(0)
    base = (rng.rand(64, 64, 3) * 255).astype(np.uint8)
    image = Image.fromarray(base)
    slight = Image.fromarray(np.clip(base + rng.randint(-10, 10, base.shape), 0, 255).astype(np.uint8))
    heavy = Image.fromarray((rng.rand(64, 64, 3) * 255).astype(np.uint8))
    same, near, far = metric([image] * 3, [image, slight, heavy])
    assert same == pytest.approx(0.0, abs=1e-6)
    assert 0 < near < far
    assert metric([slight], [image])[0] == pytest.approx(near, abs=1e-6)


def test_t2i2t_end_to_end_with_tiny_diffusers_and_real_sbert(tmp_path):
    from sentence_transformers import SentenceTransformer

    from rewardlab.cycle.similarity import SbertSimilarity, default_sbert_path

    generators = [DiffusersGenerator(tiny_pipeline(tmp_path / f"g{i}", seed=i), name=f"tiny-sd-{i}", steps=2,
                                     guidance=3.0, height=16, width=16) for i in range(2)]
    inputs = [CycleInput("p0", "a red picture"), CycleInput("p1", "a blue picture"), CycleInput("p2", "a green field")]
    similarity = SbertSimilarity()
    manifest = run_t2i2t(inputs, generators, PixelCaptioner(), similarity, [0, 1], tmp_path / "run")
    rows = list(manifest.rows.values())
    assert len(rows) == 3 * 2 * 2
    sbert = SentenceTransformer(default_sbert_path(), device="cpu")
    for row in rows:
        a, b = sbert.encode([row["input"], row["reconstruction"]], normalize_embeddings=True)
        assert row["score"] == pytest.approx(float(np.dot(a, b)), abs=1e-5)
        assert (tmp_path / "run" / row["output"]).exists() and row["params"]["steps"] == 2
    stats, counts = export_pairs(tmp_path / "run" / "manifest.jsonl", tmp_path / "pairs", PairRules(True, 0.005, 0.4))
    written = [json.loads(line) for split in ("train", "valid", "test")
               for line in (tmp_path / "pairs" / f"{split}.jsonl").read_text().splitlines()]
    assert len(written) == stats.kept == sum(counts.values())
    for row in written:
        assert row["preferred_score"] > row["rejected_score"] and row["preferred_score"] >= 0.4
    expected = 0
    for input_id in ("p0", "p1", "p2"):
        cands = [Candidate(r["input_id"], r["model"], r["seed"], r["output"], r["score"]) for r in rows
                 if r["input_id"] == input_id]
        expected += len(build_pairs(cands, PairRules(True, 0.005, 0.4)))
    assert expected == len(written)
    for split in ("train", "valid", "test"):
        for pair in load_pair_file(tmp_path / "pairs" / f"{split}.jsonl", allow_outside=True):
            assert Image.open(pair.preferred_image).size == (16, 16)


def test_crash_and_resume_no_duplicates_same_output(tmp_path):
    inputs = [CycleInput(f"p{i}", f"a {c} picture") for i, c in enumerate(["red", "green", "blue", "white", "black"])]
    sim = lambda refs, cands: [float(len(set(r.split()) & set(c.split()))) / 3 for r, c in zip(refs, cands, strict=True)]  # noqa: E731
    sim.name = "word-overlap"
    full = run_t2i2t(inputs, [PaintGenerator("a"), PaintGenerator("b")], PixelCaptioner(), sim, [0, 1], tmp_path / "full")
    crashing = PaintGenerator("a", fail_after=5)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_t2i2t(inputs, [crashing, PaintGenerator("b")], PixelCaptioner(), sim, [0, 1], tmp_path / "resumed")
    partial = (tmp_path / "resumed" / "manifest.jsonl").read_text().splitlines()
    assert 0 < len(partial) < 20
    with open(tmp_path / "resumed" / "manifest.jsonl", "a") as handle:
        handle.write('{"input_id": "p9", "mod')  # a line torn by the crash
    resumed = run_t2i2t(inputs, [PaintGenerator("a"), PaintGenerator("b")], PixelCaptioner(), sim, [0, 1],
                        tmp_path / "resumed")
    keys = [(r["input_id"], r["model"], r["seed"]) for r in Manifest(tmp_path / "resumed" / "manifest.jsonl").rows.values()]
    lines = [json.loads(line) for line in (tmp_path / "resumed" / "manifest.jsonl").read_text().splitlines()
             if line.endswith("}")]
    assert len(lines) == len(set(keys)) == 20
    assert resumed.rows == full.rows
    for name in ("full", "resumed"):
        export_pairs(tmp_path / name / "manifest.jsonl", tmp_path / name / "pairs", PairRules(True, 0.005, None))
    for split in ("train", "valid", "test"):
        assert (tmp_path / "full" / "pairs" / f"{split}.jsonl").read_text() == \
            (tmp_path / "resumed" / "pairs" / f"{split}.jsonl").read_text()


def test_i2t2i_prefers_the_caption_that_reconstructs_best_and_cli_pairs(tmp_path):
    folder = tmp_path / "inputs"
    folder.mkdir()
    for name, colour in (("r", "red"), ("g", "green")):
        PaintGenerator().generate([f"a {colour} thing"], 7)[0].save(folder / f"{name}.png")
    captioners = [PixelCaptioner(), FixedCaptioner("always-blue", "a blue picture"),
                  FixedCaptioner("always-black", "a black picture")]
    from rewardlab.cycle import read_inputs

    run_i2t2i(read_inputs(folder, "i2t2i"), captioners, PaintGenerator(), SsimDistance(), 0, tmp_path / "run")
    result = CliRunner().invoke(cli, ["cycle", "pairs", "--manifest", str(tmp_path / "run" / "manifest.jsonl"),
                                      "--out", str(tmp_path / "pairs"), "--margin", "0"], catch_exceptions=False)
    assert result.exit_code == 0 and "inputs 2, candidates 6" in result.output
    rows = [json.loads(line) for s in ("train", "valid", "test")
            for line in (tmp_path / "pairs" / f"{s}.jsonl").read_text().splitlines()]
    by_input = {}
    for row in rows:
        assert row["preferred_score"] < row["rejected_score"]  # a distance: lower wins
        by_input.setdefault(row["input_id"], []).append(row)
    for input_id, colour in (("r", "red"), ("g", "green")):
        correct = f"a {colour} picture"
        assert all(r["rejected_text"] != correct for r in by_input[input_id])
        assert sum(r["preferred_text"] == correct for r in by_input[input_id]) == 2
    pairs = load_pair_file(tmp_path / "pairs" / f"{rows[0]['split']}.jsonl", allow_outside=True)
    assert pairs[0].preferred_image == pairs[0].rejected_image and Image.open(pairs[0].preferred_image).size == (16, 16)


def test_shards_together_equal_one_run(tmp_path):
    inputs = [CycleInput(f"p{i}", f"a {c} picture") for i, c in enumerate(["red", "green", "blue", "white", "black"])]
    sim = lambda refs, cands: [float(len(set(r.split()) & set(c.split()))) / 3 for r, c in zip(refs, cands, strict=True)]  # noqa: E731
    sim.name = "word-overlap"
    whole = run_t2i2t(inputs, [PaintGenerator("a"), PaintGenerator("b")], PixelCaptioner(), sim, [0, 1], tmp_path / "one")
    for index in range(2):
        run_t2i2t(inputs, [PaintGenerator("a"), PaintGenerator("b")], PixelCaptioner(), sim, [0, 1], tmp_path / "sharded",
                  shard=(index, 2))
    shards = sorted(p.name for p in (tmp_path / "sharded").glob("manifest*.jsonl"))
    assert shards == ["manifest-0-of-2.jsonl", "manifest-1-of-2.jsonl"]
    assert len(Manifest(tmp_path / "sharded" / shards[0]).rows) == 3 * 4 and len(Manifest(tmp_path / "sharded" / shards[1]).rows) == 2 * 4
    export_pairs(tmp_path / "one", tmp_path / "one" / "pairs", PairRules(True, 0.005, None))
    export_pairs(tmp_path / "sharded", tmp_path / "sharded" / "pairs", PairRules(True, 0.005, None))
    for split in ("train", "valid", "test"):
        assert (tmp_path / "one" / "pairs" / f"{split}.jsonl").read_text() == \
            (tmp_path / "sharded" / "pairs" / f"{split}.jsonl").read_text()
    assert len(whole.rows) == 20
