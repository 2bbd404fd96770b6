"""Token shards: the hand-off from tokenization to training.

A shard is two files: `<name>.bin`, the raw token ids (little-endian uint16 while the vocabulary
fits, uint32 past 65,536 ids), and `<name>.idx`, a .npy int64 array of document start offsets
with one extra entry at the end, so document i is `tokens[idx[i]:idx[i+1]]` and
`idx[-1] == file size / dtype size`. The dtype is implied by the vocabulary size, which the
split folder's manifest records.

A split is the list of shards that tokens/manifest.json names under `train/` or `val/` (never the
folder's glob: a shard of an earlier config may still lie there), each checked against the sha256
the manifest records before it is used. Each shard is cut into windows of seq_len + 1
tokens that overlap by one token (inputs are window[:-1], targets window[1:]), so every token but
a shard's first is a target once per epoch. Windows run across document boundaries: the EOS id
after every document tells the model where one ends, as in GPT-2's training.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pipeline.artifacts import atomic_path, check_file, read_manifest

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


def read_tokens_manifest(tokens_dir: str | Path) -> dict:
    """The tokenize stage's manifest metrics: vocab_size and eos_id (required), and the rest."""
    path = Path(tokens_dir) / "manifest.json"
    try:
        metrics = json.loads(path.read_text(encoding="utf-8"))["metrics"]
    except (OSError, json.JSONDecodeError, KeyError) as e:
        raise ValueError(f"{path}: not a readable tokens manifest with `metrics` ({e})") from e
    for key in ("vocab_size", "eos_id"):
        if not isinstance(metrics.get(key), int):
            raise ValueError(f"{path}: metrics.{key} is missing or not an integer")
    return metrics


def split_shards(tokens_dir: str | Path, split: str) -> list[Path]:
    """The split's shards as tokens/manifest.json lists them, each .bin and .idx checked against
    the sha256 there (one read of the split; figures in docs/data.md)."""
    manifest = Path(tokens_dir) / "manifest.json"
    entries = [e["path"] for e in read_manifest(manifest)["outputs"]
               if Path(e["path"]).parent == Path(split) and e["path"].endswith(".bin")]
    if not entries:
        raise ValueError(f"{manifest}: names no {split}/*.bin token shards")
    paths = [Path(tokens_dir) / entry for entry in sorted(entries)]
    for path in tqdm(paths, desc=f"check {split} shards", unit="shard", disable=None):
        check_file(path, manifest)
        check_file(index_path(path), manifest)
    return paths


class TokenWindows:
    """Every (seq_len + 1)-token window of a split's shards, by index, as an int64 array."""

    def __init__(self, paths: list[Path], vocab_size: int, seq_len: int):
        self.seq_len = seq_len
        self.shards = [read_shard(p, vocab_size)[0] for p in paths]
        counts = [max(0, (len(tokens) - 1) // seq_len) for tokens in self.shards]
        self.ends = np.cumsum(counts)  # window i lives in the first shard whose end exceeds i
        if len(self) == 0:
            raise ValueError(f"{paths[0].parent}: fewer than {seq_len + 1} tokens in every shard; "
                             f"lower pretrain.seq_len or add data")

    def __len__(self) -> int:
        return int(self.ends[-1])

    def __getitem__(self, i: int) -> np.ndarray:
        shard = int(np.searchsorted(self.ends, i, side="right"))
        start = (i - (int(self.ends[shard - 1]) if shard else 0)) * self.seq_len
        # np.array copies out of the memmap, so a batch never pins the mapping (nanoGPT's note on a
        # memmap leak: https://stackoverflow.com/questions/45132940)
        return np.array(self.shards[shard][start:start + self.seq_len + 1], dtype=np.int64)

    def num_tokens(self) -> int:
        return sum(len(tokens) for tokens in self.shards)
