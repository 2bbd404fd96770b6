"""Held-out loss and bits per byte on the tokenize stage's val shards.

Loss is nats per token, so it depends on the tokenizer; bits per byte does not: the same nats
summed over the text, divided by ln 2 x the UTF-8 bytes of that text, compare models whose
tokenizers differ. Targets that are special tokens (<|endoftext|> between documents) have no text:
they count in neither the nats nor the bytes of bpb (they do count in the per-token loss, as in
pretraining's val loss).

Log-probabilities are taken over the tokenizer's ids only: the padded vocabulary rows
(pipeline/model/gpt.py) are masked, as `generate` does and as the exported HF model (which drops
them) computes, so our numbers and transformers' agree.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from pipeline.tokenizer.bpe import BPETokenizer
from pipeline.train.data import TokenWindows, read_tokens_manifest, split_shards


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


@torch.no_grad()
def val_loss_bpb(model: torch.nn.Module, tokens_dir: str | Path, tokenizer: BPETokenizer, *,
                 max_tokens: int, batch_size: int = 8) -> dict[str, float | int]:
    """Loss (nats per target token) and bpb over the first max_tokens of the val split, cut into the
    model's context-length windows as in pretraining."""
    vocab_size = read_tokens_manifest(tokens_dir)["vocab_size"]
    if tokenizer.n_vocab != vocab_size:
        raise ValueError(f"{tokens_dir}/manifest.json: vocab_size {vocab_size}, but the tokenizer has "
                         f"{tokenizer.n_vocab} ids; score the shards with the tokenizer that wrote them")
    windows = TokenWindows(split_shards(tokens_dir, "val"), vocab_size, model.config.seq_len)
    n_windows = max(1, min(len(windows), max_tokens // windows.seq_len))
    byte_lengths = torch.from_numpy(token_byte_lengths(tokenizer))
    nats = text_nats = 0.0
    targets_seen = n_bytes = 0
    for first in tqdm(range(0, n_windows, batch_size), desc="val loss", unit="batch", disable=None):
        batch = torch.from_numpy(np.stack([windows[i] for i in range(first, min(first + batch_size, n_windows))]))
        x, y = batch[:, :-1], batch[:, 1:]
        logp = token_logprobs(model(x), y, vocab_size).double()
        text = byte_lengths[y] > 0
        nats -= logp.sum().item()
        text_nats -= logp[text].sum().item()
        targets_seen += y.numel()
        n_bytes += int(byte_lengths[y].sum())
    return {"val_loss": nats / targets_seen, "bpb": bits_per_byte(text_nats, n_bytes),
            "val_tokens": targets_seen, "val_bytes": n_bytes}
