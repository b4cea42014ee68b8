"""Tokenizers: UTF-8 bytes (the default, needs no file) or a HF `tokenizer.json` loaded offline.

Both expose what the rest of the package and megatron-core's GPTDataset need:
`encode`, `decode`, `vocab_size`, `eod` (the end-of-document id appended after every document) and
`unique_identifiers` (megatron-core hashes it into its index-cache key, so a different tokenizer never
reuses another's cached sample order).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from pathlib import Path

from coe_dist.data.errors import DataError

EOD_TEXT = "<|endoftext|>"
# Tried in order when a tokenizer.json has no <|endoftext|>: the usual spellings of an EOS token.
EOS_CANDIDATES = (EOD_TEXT, "</s>", "<eos>", "<|end_of_text|>", "<|eos|>", "[EOS]")


class ByteTokenizer:
    """UTF-8 bytes 0..255 plus one end-of-document id, 256 (vocab 257)."""

    vocab_size = 257
    eod = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        # Split at eod so a multi-byte character is never glued across a document boundary.
        parts, run = [], bytearray()
        for i in ids:
            if i == self.eod:
                parts.append(run.decode("utf-8", errors="replace") + EOD_TEXT)
                run = bytearray()
            else:
                run.append(int(i))
        return "".join(parts) + run.decode("utf-8", errors="replace")

    @property
    def unique_identifiers(self) -> OrderedDict:
        return OrderedDict(cls="ByteTokenizer", vocab_size=self.vocab_size, eod=self.eod)

    def __repr__(self) -> str:
        return "ByteTokenizer(vocab_size=257, eod=256)"


class HFTokenizer:
    """A `tokenizers.Tokenizer` from a tokenizer.json, loaded offline (no hub access)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._tok = _load_hf(self.path)
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.eod = _find_eod(self._tok, self.path)
        # Content hash, not the path: a moved file keeps its caches, an edited one invalidates them.
        self._sha256 = hashlib.sha256(self.path.read_bytes()).hexdigest()

    def encode(self, text: str) -> list[int]:
        # No special tokens: documents are separated by the eod the preprocessor appends, nothing else.
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    @property
    def unique_identifiers(self) -> OrderedDict:
        return OrderedDict(cls="HFTokenizer", sha256=self._sha256, vocab_size=self.vocab_size, eod=self.eod)

    def __repr__(self) -> str:
        return f"HFTokenizer({str(self.path)!r}, vocab_size={self.vocab_size}, eod={self.eod})"


Tokenizer = ByteTokenizer | HFTokenizer


def _load_hf(path: Path):
    if not path.is_file():
        raise DataError(f"tokenizer file {str(path)!r} does not exist: set data.tokenizer to 'byte' or to "
                        "the path of a HF tokenizer.json, e.g. ../shared/data/tokenizers/gpt-neox-20b.tokenizer.json")
    from tokenizers import Tokenizer as RustTokenizer

    try:
        return RustTokenizer.from_file(str(path))
    except Exception as e:  # the Rust side raises a bare Exception with serde's message
        raise DataError(f"tokenizer file {str(path)!r} does not load as a HF tokenizers JSON ({e}): pass a "
                        "tokenizer.json saved by `tokenizers` / `transformers`, or 'byte'") from None


def _find_eod(tok, path: Path) -> int:
    for text in EOS_CANDIDATES:
        token_id = tok.token_to_id(text)
        if token_id is not None:
            return token_id
    raise DataError(f"tokenizer file {str(path)!r} has no end-of-document token (tried "
                    f"{', '.join(EOS_CANDIDATES)}): add one as a special token, or use 'byte'")


def load_tokenizer(spec: str) -> Tokenizer:
    """'byte' -> ByteTokenizer; anything else is the path of a tokenizer.json."""
    if spec == "byte":
        return ByteTokenizer()
    return HFTokenizer(spec)
