"""Token shards: the hand-off from tokenization to training.

A shard is two files: `<name>.bin`, the raw token ids (little-endian uint16 while the vocabulary
fits, uint32 past 65,536 ids), and `<name>.idx`, a .npy int64 array of document start offsets
with one extra entry at the end, so document i is `tokens[idx[i]:idx[i+1]]` and
`idx[-1] == file size / dtype size`. The dtype is implied by the vocabulary size, which the
split folder's manifest records.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from pipeline.artifacts import atomic_path

INDEX_SUFFIX = ".idx"


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


def index_path(bin_path: str | os.PathLike) -> Path:
    return Path(bin_path).with_suffix(INDEX_SUFFIX)


def write_shard(bin_path: str | os.PathLike, documents: Iterable[Iterable[int]], vocab_size: int) -> tuple[int, int]:
    """Write documents (each a sequence of ids) as one shard; return (documents, tokens)."""
    dtype = token_dtype(vocab_size)
    offsets = [0]
    with atomic_path(bin_path) as tmp, open(tmp, "wb") as f:
        for doc in documents:
            ids = np.asarray(doc, dtype=np.int64)
            if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
                raise ValueError(f"{bin_path}: token id out of range for vocab_size {vocab_size}")
            f.write(ids.astype(dtype).tobytes())
            offsets.append(offsets[-1] + ids.size)
    with atomic_path(index_path(bin_path)) as tmp, open(tmp, "wb") as f:
        np.save(f, np.asarray(offsets, dtype=np.int64))
    return len(offsets) - 1, offsets[-1]


def read_shard(bin_path: str | os.PathLike, vocab_size: int) -> tuple[np.memmap | np.ndarray, np.ndarray]:
    """Memory-map a shard's tokens and load its document offsets, checking they agree."""
    dtype = token_dtype(vocab_size)
    offsets = np.load(index_path(bin_path))
    size = os.path.getsize(bin_path)
    if size % dtype.itemsize or size // dtype.itemsize != offsets[-1]:
        raise ValueError(f"{bin_path}: {size} bytes do not hold the {offsets[-1]} {dtype} tokens its "
                         f"index names (wrong vocab_size, or a damaged file)")
    tokens = np.memmap(bin_path, dtype=dtype, mode="r") if size else np.zeros(0, dtype)
    return tokens, offsets
