"""Tokenizers: the model's real one when it is on disk, else a deterministic fallback."""
from __future__ import annotations

import hashlib
import re
from typing import Optional, Protocol

_WORD = re.compile(r"\w+|[^\w\s]")


class Tokenizer(Protocol):
    name: str

    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: list[int]) -> str: ...


class HashTokenizer:
    """Maps each word or punctuation mark to a stable id in ``[reserved, vocab_size)``.

    The same text gives the same ids on every machine; ``decode`` inverts what it has seen.
    """

    name = "djinn-hash"

    def __init__(self, vocab_size: int, reserved: int = 3):
        if vocab_size <= reserved:
            raise ValueError(f"vocab_size {vocab_size} too small")
        self.vocab_size, self.reserved = vocab_size, reserved
        self._seen: dict[int, str] = {}

    def _id(self, word: str) -> int:
        h = int.from_bytes(hashlib.blake2b(word.encode(), digest_size=8).digest(), "big")
        return self.reserved + h % (self.vocab_size - self.reserved)

    def encode(self, text: str) -> list[int]:
        ids = []
        for word in _WORD.findall(text):
            i = self._id(word)
            self._seen.setdefault(i, word)
            ids.append(i)
        return ids

    def decode(self, ids: list[int]) -> str:
        return " ".join(self._seen.get(i, f"<{i}>") for i in ids)


class HFTokenizer:
    def __init__(self, tok):
        self._tok = tok
        self.name = type(tok).__name__

    def encode(self, text: str) -> list[int]:
        return list(self._tok(text, add_special_tokens=False)["input_ids"])

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids)


def load_tokenizer(source: Optional[str], vocab_size: int, eos_token_id: Optional[int] = None) -> Tokenizer:
    """The real tokenizer from ``source``, a local directory (a path or an HF-cache snapshot), else
    :class:`HashTokenizer`; never a hub id, so never a network call."""
    if source:
        try:
            from transformers import AutoTokenizer

            return HFTokenizer(AutoTokenizer.from_pretrained(source, local_files_only=True))
        except Exception:
            pass
    return HashTokenizer(vocab_size)
