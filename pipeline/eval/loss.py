"""Held-out loss and bits per byte on the tokenize stage's val shards.

Loss is nats per token, so it depends on the tokenizer; bits per byte does not: the same nats
summed over the text, divided by ln 2 x the UTF-8 bytes of that text, compare models whose
tokenizers differ. Targets that are special tokens (<|endoftext|> between documents) have no text:
they count in neither the nats nor the bytes of bpb (they do count in the per-token loss, as in
pretraining's val loss).

Log-probabilities are taken over the tokenizer's ids only: the padded vocabulary rows
(pipeline/model/gpt.py) are masked, as `generate` does and as the exported HF model (which drops
them) computes, so our numbers and transformers' agree.

Each source's val shards (a text corpus such as TinyStories on its own, every web shard together
as "web") are scored apart, and every target's nats are summed into the document it belongs to:
the intervals resample documents, since tokens of one document are not independent draws.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from pipeline.stats import bootstrap_ratio
from pipeline.token_shards import TokenWindows, read_shard, read_tokens_manifest, split_shards
from pipeline.tokenizer.bpe import BPETokenizer

log = logging.getLogger(__name__)


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """log p(target) (B, T) from logits (B, T, padded vocab), over the first vocab_size ids; targets
    of -1 get 0."""
    logp = F.log_softmax(logits[..., :vocab_size].float(), dim=-1)
    picked = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return picked.masked_fill(targets < 0, 0.0)


def bits_per_byte(nats: float, n_bytes: int) -> float:
    """Total nats over a text / (ln 2 x its UTF-8 bytes)."""
    return nats / (math.log(2) * n_bytes)


def token_byte_lengths(tokenizer: BPETokenizer) -> np.ndarray:
    """UTF-8 bytes each id stands for; 0 for special tokens (they are not text)."""
    lengths = np.zeros(tokenizer.n_vocab, dtype=np.int64)
    lengths[:len(tokenizer.vocab)] = [len(token) for token in tokenizer.vocab]
    return lengths


@dataclass
class DocumentScores:
    """Per-document sums of one source's scored val documents (the units the intervals resample)."""

    nats: np.ndarray       # -log p over every target token (EOS included)
    tokens: np.ndarray     # target tokens
    text_nats: np.ndarray  # -log p over the targets that are text (special tokens excluded)
    bytes: np.ndarray      # UTF-8 bytes of those text targets

    @classmethod
    def concat(cls, parts: list[DocumentScores]) -> DocumentScores:
        return cls(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("nats", "tokens", "text_nats", "bytes")))

    def summary(self) -> dict[str, Any]:
        """val loss and bpb over these documents, each with its bootstrap interval over documents."""
        return {"val_loss": bootstrap_ratio(self.nats, self.tokens),
                "bpb": bootstrap_ratio(self.text_nats / math.log(2), self.bytes),
                "tokens": int(self.tokens.sum()), "bytes": int(self.bytes.sum()), "documents": len(self.tokens)}


@torch.no_grad()
def shard_document_scores(model: torch.nn.Module, shard: Path, vocab_size: int, byte_lengths: torch.Tensor, *,
                          max_tokens: int, batch_size: int) -> DocumentScores:
    """The first max_tokens of one val shard in the model's context-length windows (as pretraining's
    val loss reads them), each target's log-probability summed into the document it belongs to."""
    windows = TokenWindows([shard], vocab_size, model.config.seq_len)
    offsets = read_shard(shard, vocab_size)[1]
    n_windows = max(1, min(len(windows), max_tokens // windows.seq_len))
    n_docs = len(offsets) - 1
    sums = np.zeros((4, n_docs))
    for first in tqdm(range(0, n_windows, batch_size), desc=f"val loss {shard.stem}", unit="batch", disable=None):
        rows = range(first, min(first + batch_size, n_windows))
        batch = torch.from_numpy(np.stack([windows[i] for i in rows]))
        x, y = batch[:, :-1], batch[:, 1:]
        nats = -token_logprobs(model(x), y, vocab_size).double()
        n_bytes = byte_lengths[y]
        # the target at window position j is shard token i * seq_len + 1 + j
        positions = np.array([i * windows.seq_len for i in rows])[:, None] + 1 + np.arange(y.size(1))
        docs = np.searchsorted(offsets, positions.ravel(), side="right") - 1
        for row, values in enumerate((nats, torch.ones_like(nats), nats * (n_bytes > 0), n_bytes.double())):
            sums[row] += np.bincount(docs, weights=values.numpy().ravel(), minlength=n_docs)
    scored = sums[1] > 0
    return DocumentScores(*(sums[row][scored] for row in range(4)))


def source_groups(shards: list[Path], text_sources: Collection[str]) -> dict[str, list[Path]]:
    """Val shards by source: each text corpus (inputs.text) on its own, every web shard under "web"."""
    groups: dict[str, list[Path]] = {}
    for shard in shards:
        groups.setdefault(shard.stem if shard.stem in text_sources else "web", []).append(shard)
    return groups


def val_document_scores(model: torch.nn.Module, tokens_dir: str | Path, tokenizer: BPETokenizer, *,
                        max_tokens: int, batch_size: int = 8,
                        text_sources: Collection[str] = ()) -> dict[str, DocumentScores]:
    """{source: its scored documents}: up to max_tokens of each source's val shards (source_groups)."""
    vocab_size = read_tokens_manifest(tokens_dir)["vocab_size"]
    if tokenizer.n_vocab != vocab_size:
        raise ValueError(f"{tokens_dir}/manifest.json: vocab_size {vocab_size}, but the tokenizer has "
                         f"{tokenizer.n_vocab} ids; score the shards with the tokenizer that wrote them")
    byte_lengths = torch.from_numpy(token_byte_lengths(tokenizer))
    seq_len, out = model.config.seq_len, {}
    for source, shards in source_groups(split_shards(tokens_dir, "val"), text_sources).items():
        parts, budget = [], max_tokens
        for shard in shards:
            if budget < seq_len:
                break
            if read_shard(shard, vocab_size)[1][-1] <= seq_len:  # not one whole window: nothing to score
                log.warning("%s: fewer than %d tokens, not scored", shard, seq_len + 1)
                continue
            parts.append(shard_document_scores(model, shard, vocab_size, byte_lengths, max_tokens=budget,
                                               batch_size=batch_size))
            budget -= int(parts[-1].tokens.sum())
        if parts:
            out[source] = DocumentScores.concat(parts)
    if not out:
        raise ValueError(f"{tokens_dir}/val: fewer than {seq_len + 1} tokens in every shard; lower pretrain.seq_len "
                         f"or add data")
    return out


def val_loss_bpb(model: torch.nn.Module, tokens_dir: str | Path, tokenizer: BPETokenizer, *, max_tokens: int,
                 batch_size: int = 8, text_sources: Collection[str] = ()) -> dict[str, Any]:
    """val loss (nats per target token) and bpb with bootstrap intervals over documents, over all
    scored documents and per source (`val_document_scores`)."""
    by_source = val_document_scores(model, tokens_dir, tokenizer, max_tokens=max_tokens, batch_size=batch_size,
                                    text_sources=text_sources)
    return {**DocumentScores.concat(list(by_source.values())).summary(),
            "by_source": {source: scores.summary() for source, scores in by_source.items()}}
