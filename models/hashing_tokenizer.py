"""A tokenizer that learns nothing from merchant data.

Words (lower-cased runs of letters/digits/apostrophes) are mapped to ids by a *stable* hash
(crc32; never Python's salted ``hash()``), so every merchant and the coordinator agree on ids
without sharing a vocabulary. Ids 0..3 are reserved: PAD=0, CLS=1, SEP=2, UNK=3.
"""

from __future__ import annotations

import re
import zlib

import torch

PAD_ID, CLS_ID, SEP_ID, UNK_ID = 0, 1, 2, 3
_RESERVED = 4
_WORD = re.compile(r"[a-z0-9']+")


class HashingTokenizer:
    """Fixed word-hashing tokenizer with ``vocab_size`` ids (4 reserved)."""

    def __init__(self, vocab_size: int = 8192, max_length: int = 64) -> None:
        if vocab_size <= _RESERVED:
            raise ValueError(f"vocab_size must be > {_RESERVED}, got {vocab_size}")
        if max_length < 3:
            raise ValueError(f"max_length must be >= 3, got {max_length}")
        self.vocab_size = vocab_size
        self.max_length = max_length

    def token_id(self, word: str) -> int:
        return _RESERVED + zlib.crc32(word.encode("utf-8")) % (self.vocab_size - _RESERVED)

    def encode(self, text: str) -> list[int]:
        words = _WORD.findall(text.lower())[: self.max_length - 2]
        return [CLS_ID] + [self.token_id(w) for w in words] + [SEP_ID]

    def __call__(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """Batch encoding padded to ``max_length``: ``input_ids`` and ``attention_mask``."""
        ids = torch.full((len(texts), self.max_length), PAD_ID, dtype=torch.long)
        for row, text in enumerate(texts):
            encoded = self.encode(text)
            ids[row, : len(encoded)] = torch.tensor(encoded)
        return {"input_ids": ids, "attention_mask": (ids != PAD_ID).long()}
