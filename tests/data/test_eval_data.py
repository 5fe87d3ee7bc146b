"""Dataset adapters: file formats, HF layouts, and errors that name the row and field."""

from __future__ import annotations

import io
import json

import pytest
from PIL import Image

from rewardlab.data import DataError, load_groups, load_imagereward, load_rankings
from rewardlab.data.hf import load_hf


def _png_bytes(colour) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def test_pairs_labels_and_relative_paths(tmp_path):
    rows = [{"prompt": "p", "image_a": "a.png", "image_b": "b.png", "label": "a"},
            {"prompt": "p", "image_a": "a.png", "image_b": "b.png", "label": 1},
            {"prompt": "p", "image_a": "/abs/a.png", "image_b": "b.png", "label": "tie"}]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match="pairs.jsonl line 3 image_a: image '/abs/a.png' is outside the data folder"):
        load_groups(f"pairs:{tmp_path / 'pairs.jsonl'}")
    groups = load_groups(f"pairs:{tmp_path / 'pairs.jsonl'}", allow_outside=True)
    # a pair is a group of two, preferred first
    assert [g.ranking for g in groups] == [[1, 2], [1, 2], [1, 1]]
    assert groups[0].images == [str(tmp_path / "a.png"), str(tmp_path / "b.png")]
    assert groups[1].images == [str(tmp_path / "b.png"), str(tmp_path / "a.png")]
    assert groups[2].images[0] == "/abs/a.png"


def test_parquet_rankings(tmp_path):
    import pandas as pd

    pd.DataFrame({"prompt": ["x"], "images": [["1.png", "2.png", "3.png"]], "ranking": [[2, 1, 3]]}).to_parquet(
        tmp_path / "r.parquet")
    (group,) = load_rankings(tmp_path / "r.parquet", image_root="/data", allow_outside=True)
    assert group.ranking == [2, 1, 3] and group.images[0] == "/data/1.png"


def test_errors_name_file_row_and_field(tmp_path):
    (tmp_path / "p.jsonl").write_text('{"prompt": "p", "image_a": "a", "label": "a"}\n')
    with pytest.raises(DataError, match=r"p.jsonl line 1: unknown pair layout"):
        load_groups(f"pairs:{tmp_path / 'p.jsonl'}")
    (tmp_path / "q.jsonl").write_text('{"prompt": "p", "image_a": "a", "image_b": "b", "label": "maybe"}\n')
    with pytest.raises(DataError, match="label 'maybe'"):
        load_groups(f"pairs:{tmp_path / 'q.jsonl'}")
    (tmp_path / "t.json").write_text(json.dumps([{"id": "x7", "prompt": "p", "generations": ["a", "b"], "ranking": [1]}]))
    with pytest.raises(DataError, match="t.json item 1: ranking must be a list of 2"):
        load_imagereward(tmp_path / "t.json")
    (tmp_path / "bad.jsonl").write_text("{oops\n")
    with pytest.raises(DataError, match="bad.jsonl line 1"):
        load_rankings(tmp_path / "bad.jsonl")


def test_hf_layouts_from_in_memory_datasets(tmp_path):
    import datasets

    red, blue = _png_bytes((255, 0, 0)), _png_bytes((0, 0, 255))
    (tmp_path / "blue.png").write_bytes(blue)
    pick = datasets.Dataset.from_dict({
        "caption": ["a red square", "a tie", "unlabelled"], "jpg_0": [red, red, red], "jpg_1": [blue, blue, blue],
        "label_0": [1.0, 0.5, 0.0], "label_1": [0.0, 0.5, 0.0], "has_label": [True, True, False]})
    groups = load_hf("pickapic", pick)
    assert [g.ranking for g in groups] == [[1, 2], [1, 1]] and groups[0].images[0] == red
    hpd = datasets.Dataset.from_dict({"prompt": ["p"], "image": [[{"bytes": None, "path": str(tmp_path / "blue.png")},
                                                                          {"bytes": red, "path": None}]],
                                      "rank": [[2, 1]]})
    (group,) = load_hf("hpdv2", hpd)
    assert group.ranking == [2, 1] and group.images == [str(tmp_path / "blue.png"), red]
    i2t = datasets.Dataset.from_dict({"image": [red], "preferred_text": ["red"], "rejected_text": ["blue"]})
    (group,) = load_hf("cycleprefdb-i2t", i2t)
    assert group.prompts == ["red", "blue"] and group.images == [red, red] and group.ranking == [1, 2]
    t2i = datasets.Dataset.from_dict({"prompt": ["red"], "preferred_image": [red], "rejected_image": [blue]})
    assert load_hf("cycleprefdb-t2i", t2i)[0].images == [red, blue]
    with pytest.raises(DataError, match="Pick-a-Pic v2 layout needs column.*jpg_0"):
        load_hf("pickapic", datasets.Dataset.from_dict({"caption": ["x"]}))
    saved = tmp_path / "saved"
    t2i.save_to_disk(str(saved))
    assert load_hf("cycleprefdb-t2i", str(saved))[0].prompt == "red"
