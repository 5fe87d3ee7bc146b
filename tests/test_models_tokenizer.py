"""The bundled CLIP tokenizer against OpenAI's ``clip.tokenize`` on real prompts, with and without ftfy."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from support import official_python

from rewardlab.models.clip import clean_prompt, fix_text_subset, tokenizer
from rewardlab.registry import get_spec

pytestmark = pytest.mark.parity
DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "imagereward"
HARD = ["Mark Zuckerberg but he’s actually human", "“a tech company office in a downtown class a building”",
        "a mage ， stephen bliss", "ﬁne ﬂowers", "ＡＢＣ　ｘｙｚ！", "it‘s a ‛test‟", "&amp;lt;b&amp;gt; bold"]


def _prompts() -> list[str]:
    if not DATA.is_dir():
        pytest.skip(f"real prompts not found at {DATA}")
    prompts = [r["prompt"] for r in json.loads((DATA / "test.json").read_text())]
    prompts += [r["prompt"] for r in json.loads((DATA / "benchmark-prompts.json").read_text())]
    prompts += [r["text"] for r in json.loads((DATA / "refl_data.json").read_text())[:3000]]
    return HARD + prompts


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[list[str], list[list[int]]]:
    prompts = _prompts()
    path = tmp_path_factory.mktemp("prompts") / "p.json"
    path.write_text(json.dumps(prompts))
    script = "import clip, json, sys; print(json.dumps(clip.tokenize(json.load(open(sys.argv[1])), truncate=True).tolist()))"
    out = subprocess.run([official_python(), "-c", script, str(path)], check=True, capture_output=True, text=True,
                         timeout=600)
    return prompts, json.loads(out.stdout.strip().splitlines()[-1])


def _mismatches(prompts: list[str], reference: list[list[int]], model: str = "clipscore-vit-l-14") -> list[str]:
    encoded = tokenizer(get_spec(model))(prompts)
    return [p for p, ids, mask, ref in zip(prompts, encoded["input_ids"].tolist(), encoded["attention_mask"].tolist(),
                                            reference, strict=True) if ids[: sum(mask)] != ref[: ref.index(49407) + 1]]


def test_tokens_equal_openai_on_3566_real_prompts_with_ftfy(reference):
    pytest.importorskip("ftfy")
    prompts, ref = reference
    assert len(prompts) == len(HARD) + 466 + 100 + 3000
    assert _mismatches(prompts, ref) == []


def test_tokens_equal_openai_on_real_prompts_without_ftfy(reference, monkeypatch):
    monkeypatch.setitem(sys.modules, "ftfy", None)  # the import fails: the built-in subset is used
    prompts, ref = reference
    assert _mismatches(prompts, ref) == []


def test_fix_text_subset_by_hand():
    assert fix_text_subset("he’s “quoted” ‚x‛") == "he's \"quoted\" 'x'"
    assert fix_text_subset("ａ，ｂ　ﬁ") == "a,b fi"
    assert fix_text_subset("café 猫 — ok") == "café 猫 — ok"  # everything else untouched
    assert clean_prompt("  a &amp;amp; b  ") == "a & b"


HF_FAST = """
import json, sys, clip.simple_tokenizer as st
from transformers import CLIPTokenizerFast
folder, prompts = sys.argv[1], json.load(open(sys.argv[2]))
bpe = st.SimpleTokenizer()
json.dump(bpe.encoder, open(folder + "/vocab.json", "w"))
merges = sorted(bpe.bpe_ranks, key=bpe.bpe_ranks.get)
open(folder + "/merges.txt", "w").write("#version: 0.2\\n" + "\\n".join(" ".join(m) for m in merges) + "\\n")
tok = CLIPTokenizerFast(vocab_file=folder + "/vocab.json", merges_file=folder + "/merges.txt")
print(json.dumps(tok(prompts, padding=True, truncation=True, max_length=77)["input_ids"]))
"""


def test_pickscore_tokens_equal_transformers_fast_tokenizer(tmp_path):
    """PickScore's processor tokenizes with transformers' fast CLIP tokenizer (no ftfy, no HTML unescaping)."""
    prompts = _prompts()
    (tmp_path / "p.json").write_text(json.dumps(prompts))
    out = subprocess.run([official_python(), "-c", HF_FAST, str(tmp_path), str(tmp_path / "p.json")], check=True,
                         capture_output=True, text=True, timeout=600)
    reference = json.loads(out.stdout.strip().splitlines()[-1])
    assert _mismatches(prompts, reference, "pickscore-v1") == []
    assert _mismatches(HARD[:3], reference[:3], "clipscore-vit-l-14") == HARD[:3]  # the cleaning is what differs
