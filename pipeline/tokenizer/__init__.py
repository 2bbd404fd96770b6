"""The tokenizer half: byte-level BPE written here (`BPETokenizer`), the `tokenizer` stage that
trains it on clean documents, the `tokenize` stage that writes training-ready token shards, and the
chat template (`chat.py`) built on the special tokens defined in `bpe.py`."""

from pipeline.tokenizer.bpe import BPETokenizer

__all__ = ["BPETokenizer"]
