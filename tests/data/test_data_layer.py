"""One data layer: specs round-trip as data; every reader accepts every writer's pair files."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from PIL import Image

from rewardlab.cli import cli
from rewardlab.data import load_groups, load_pairs, parse_source
from rewardlab.errors import UsageError
from rewardlab.registry import ModelSpec, all_specs, spec_from_json, spec_to_json


@pytest.mark.parametrize("spec", all_specs(), ids=lambda s: s.name)
def test_every_registry_spec_round_trips_as_data(spec):
    assert ModelSpec.from_dict(spec.to_dict()) == spec
    assert spec_from_json(spec_to_json(spec)) == spec
    untrusted = spec_from_json(spec_to_json(spec), trusted=False)
    assert untrusted.sources == () and untrusted.backbone_sources == ()
    assert untrusted == ModelSpec(**{**spec.__dict__, "sources": (), "backbone_sources": ()})
    assert set(spec.to_row()) >= {"name", "architecture", "weights", "preprocess", "output", "range"}


def test_kind_path_is_parsed_once_for_every_reader(tmp_path):
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": "x", "image_a": "a.png", "image_b": "b.png",
                                                  "label": "b"}) + "\n")
    (tmp_path / "r.jsonl").write_text(json.dumps({"prompt": "x", "images": ["a.png", "b.png"], "ranking": [2, 1]}) + "\n")
    assert parse_source(f"pairs:{tmp_path / 'p.jsonl'}").kind == "pairs"
    assert parse_source(str(tmp_path / "p.jsonl")).kind == "pairs"  # sniffed
    assert parse_source(str(tmp_path / "r.jsonl")).kind == "rankings"
    assert parse_source("hf:pickapic:some/repo").layout == "pickapic"
    with pytest.raises(UsageError, match="unknown data kind"):
        parse_source("nonsense:file")
    (pair,) = load_pairs(f"pairs:{tmp_path / 'p.jsonl'}")
    (from_ranking,) = load_pairs(f"rankings:{tmp_path / 'r.jsonl'}")
    assert pair.preferred_image == from_ranking.preferred_image == str(tmp_path / "b.png")
    assert load_groups(f"pairs:{tmp_path / 'p.jsonl'}")[0].ranking == [1.0, 2.0]


def _shapes_pairs(folder, count=12):
    import random

    from rewardlab.testing.shapes import draw

    rng = random.Random(0)
    rows_ab, rows_t2i = [], []
    for n in range(count):
        good, bad = f"g{n}.png", f"b{n}.png"
        draw("red", "circle", rng).save(folder / good)
        draw("blue", "circle", rng).save(folder / bad)
        rows_ab.append({"prompt": "a red circle", "image_a": bad, "image_b": good, "label": "b", "id": str(n)})
        rows_t2i.append({"prompt": "a red circle", "preferred_image": good, "rejected_image": bad, "input_id": str(n)})
    (folder / "eval_pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows_ab))
    (folder / "cycle_pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows_t2i))


def test_eval_reads_cycle_pair_files_and_train_reads_eval_pair_files(tmp_path, tiny_checkpoint):
    _shapes_pairs(tmp_path)
    runner = CliRunner()
    for name in ("cycle_pairs.jsonl", "eval_pairs.jsonl"):
        out = tmp_path / f"{name}.json"
        result = runner.invoke(cli, ["eval", "-m", tiny_checkpoint, "-d", f"pairs:{tmp_path / name}", "--no-cache",
                                     "--no-progress", "--json", str(out)])
        assert result.exit_code == 0, result.output
        assert json.loads(out.read_text())["results"][0]["metrics"]["pairs"] == 12
    accuracies = [json.loads((tmp_path / f"{n}.json").read_text())["results"][0]["metrics"]["accuracy"]
                  for n in ("cycle_pairs.jsonl", "eval_pairs.jsonl")]
    assert accuracies[0] == accuracies[1]  # the same pairs, written in two layouts
    from rewardlab.scoring.loader import spec_to_json as to_json
    from rewardlab.testing import tiny_blip_spec

    config = tmp_path / "c.yaml"
    config.write_text(f"spec_json: '{to_json(tiny_blip_spec())}'\nfreeze_ratio: 0.0\nbatch_size: 4\nmax_steps: 2\n"
                      "eval_every: 2\nsave_every: 0\ncpu: true\nvalid_fraction: 0.25\n")
    result = runner.invoke(cli, ["train", "-c", str(config), "-d", f"pairs:{tmp_path / 'eval_pairs.jsonl'}",
                                 "-o", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "run" / "final.safetensors").is_file()
    Image.open(tmp_path / "g0.png").verify()
