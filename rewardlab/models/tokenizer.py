"""Text tokenizers built from vocabularies shipped inside the package (nothing downloaded)."""

from __future__ import annotations

from functools import cache
from importlib import resources

import torch
from tokenizers import Tokenizer


@cache
def bert_tokenizer(max_tokens: int) -> Tokenizer:
    """bert-base-uncased WordPiece plus BLIP's ``[DEC]`` (30522) and ``[ENC]`` (30523) tokens."""
    from tokenizers.implementations import BertWordPieceTokenizer

    vocab = resources.files("rewardlab.models") / "assets" / "bert-base-uncased-vocab.txt"
    tok = BertWordPieceTokenizer(str(vocab), lowercase=True)
    tok.add_special_tokens(["[DEC]", "[ENC]"])
    tok.enable_truncation(max_length=max_tokens)
    tok.enable_padding(pad_id=0, pad_token="[PAD]")
    return tok


class TextTokenizer:
    """Turns prompts into ``input_ids``/``attention_mask`` tensors padded to the longest in the batch."""

    def __init__(self, tokenizer: Tokenizer, clean=None):
        self._tok = tokenizer
        self._clean = clean

    def __call__(self, prompts: list[str], device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        prompts = [self._clean(p) for p in prompts] if self._clean else list(prompts)
        encodings = self._tok.encode_batch(prompts)
        ids = torch.tensor([e.ids for e in encodings], dtype=torch.long, device=device)
        mask = torch.tensor([e.attention_mask for e in encodings], dtype=torch.long, device=device)
        return {"input_ids": ids, "attention_mask": mask}
