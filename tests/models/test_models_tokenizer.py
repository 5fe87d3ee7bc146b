"""The shipped CLIP tokenizer (``clip_tokenizer.json``) against OpenAI's ``clip.tokenize`` on real prompts."""

from __future__ import annotations

import json
import subprocess

import pytest
from support import SHARED, official_python

from rewardlab.models.clip import build_clip_tokenizer, clean_prompt, clip_bpe_tokenizer, tokenizer
from rewardlab.registry import get_spec

pytestmark = pytest.mark.parity
DATA = SHARED
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


def test_tokens_equal_openai_on_3566_real_prompts(reference):
    prompts, ref = reference
    assert len(prompts) == len(HARD) + 466 + 100 + 3000
    assert _mismatches(prompts, ref) == []


def test_shipped_tokenizer_json_equals_a_fresh_build():
    """The shipped file is what scripts/build_clip_tokenizer.py builds from the BPE vocabulary."""
    shipped, fresh = clip_bpe_tokenizer(77), build_clip_tokenizer()
    fresh.enable_truncation(max_length=77)
    fresh.enable_padding(pad_id=49407, pad_token="<|endoftext|>")
    prompts = HARD + ["a photo of a cat", "x" * 500, ""]
    assert [e.ids for e in shipped.encode_batch(prompts)] == [e.ids for e in fresh.encode_batch(prompts)]
    assert shipped.get_vocab_size() == fresh.get_vocab_size() == 49408
    assert clean_prompt("  a &amp;amp; b  ") == "a & b" and clean_prompt("he’s") == "he's"


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
