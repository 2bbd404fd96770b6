"""The tokenizer half: byte-level BPE written here (`BPETokenizer`), the `tokenizer` stage that
trains it on clean documents, and the `tokenize` stage that writes training-ready token shards."""

from pipeline.tokenizer.bpe import BPETokenizer

__all__ = ["BPETokenizer"]
