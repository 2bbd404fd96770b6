"""Attention backends: where a block's keys and values come from and where they go.

A block computes q, k, v for its new tokens and hands them to a backend; the backend also says
at which positions those tokens sit (the model reads them for its position embeddings or rotary
angles). Three backends, one forward:
- none (training, scoring, a full forward): plain causal attention over the T tokens of each row;
- `KVCache`: the contiguous cache of incremental decoding: B rows of one common length, the new
  tokens continuing each row at position `length`;
- `PagedBatch`: one step of the paged cache (`PagedKVCache`, vLLM's PagedAttention, Kwon et al.,
  2023, https://arxiv.org/abs/2309.06180): the new tokens of several sequences packed into one row
  of N tokens, each sequence's K/V kept in fixed-size blocks named by its block table, so sequences
  of different lengths are decoded together without padding the matmuls.

Keys and values may have fewer heads than the queries (grouped-query attention: each K/V head
serves n_head / n_kv_head query heads; Ainslie et al., 2023): the caches store K/V with the heads
they are given, and `attention` lets each K/V head serve its group of query heads.

Shapes: q (B, n_head, T, hs); k, v (B, n_kv_head, T, hs); the result (B, n_head, T, hs).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, mask: torch.Tensor | None = None,
              causal: bool = False, dropout_p: float = 0.0) -> torch.Tensor:
    """`scaled_dot_product_attention` (the flash kernel on a CUDA GPU in bf16, a fused kernel on the
    CPU), with fewer K/V heads than query heads allowed."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, dropout_p=dropout_p,
                                          enable_gqa=q.size(-3) != k.size(-3))


def check_context(first: int, last: int, seq_len: int) -> None:
    if last >= seq_len:
        raise ValueError(f"positions {first}..{last}: past the model's context of {seq_len} tokens")


# --- the contiguous cache -------------------------------------------------------------------------

class KVCache:
    """The keys and values of the tokens read so far, for incremental decoding. `k[layer]` and
    `v[layer]` are (B, n_kv_head, max_len, hs), preallocated; `length` tokens of each row are filled,
    the same for the whole batch, and the next token's position is `length`. A forward with the
    cache writes its T new keys and values at [length, length + T) in every layer, then advances
    `length` by T (once, after the last layer). Make one with `GPT.new_kv_cache`."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, length: int = 0):
        self.k, self.v, self.length = k, v, length  # k, v: (n_layer, B, n_kv_head, max_len, hs)

    @property
    def batch_size(self) -> int:
        return self.k.size(1)

    @property
    def max_len(self) -> int:
        return self.k.size(3)

    def positions(self, B: int, T: int, seq_len: int) -> torch.Tensor:
        """(1, T): the new tokens continue every row at `length`."""
        check_context(self.length, self.length + T - 1, seq_len)
        if B != self.batch_size or self.length + T > self.max_len:
            raise ValueError(f"KV cache of batch {self.batch_size}, {self.length}/{self.max_len} tokens filled, "
                             f"cannot take {B} x {T} more")
        return torch.arange(self.length, self.length + T, device=self.k.device)[None]

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Store k, v at [length, length + T) of `layer`, then attend over the row's tokens so far."""
        start, T = self.length, q.size(2)
        self.k[layer, :, :, start:start + T] = k
        self.v[layer, :, :, start:start + T] = v
        keys, values = self.k[layer, :, :, :start + T], self.v[layer, :, :, :start + T]
        # query i sits at position start + i and sees keys 0 .. start + i (is_causal would align the
        # mask to the top left, hiding the cache); a single query sees every key, so needs no mask
        mask = None if T == 1 else torch.ones(T, start + T, dtype=torch.bool, device=q.device).tril(start)
        return attention(q, keys, values, mask=mask)

    def advance(self, T: int) -> None:
        self.length += T


# --- the paged cache ----------------------------------------------------------------------------

class PagedKVCache:
    """K and V of many sequences in `num_blocks` blocks of `block_size` token slots:
    `kv` is (n_layer, 2, num_blocks, block_size, n_kv_head, hs), so a block table's blocks side by
    side are the sequence's (T, n_kv_head, hs) keys. Token t of a sequence sits in block
    `table[t // block_size]`, slot `t % block_size`; which blocks a sequence holds is the block
    manager's business (pipeline/inference/blocks.py). Make one with `GPT.new_paged_kv_cache`."""

    def __init__(self, kv: torch.Tensor):
        self.kv = kv

    @property
    def num_blocks(self) -> int:
        return self.kv.size(2)

    @property
    def block_size(self) -> int:
        return self.kv.size(3)

    def batch(self, seqs: Sequence[tuple[Sequence[int], int, int]]) -> PagedBatch:
        """The attention context of one forward over `seqs`, each (block table, start, count): that
        sequence's `count` new tokens sit at positions start .. start + count - 1, and the forward's
        input holds them packed in this order, (1, N) for N = the counts' sum."""
        return PagedBatch(self, seqs)


@dataclass
class _Group:
    """Sequences attended in one call: their block tables (G, nb) padded with block 0, the
    longest length L, where each packed token sits in the padded (G, T) query grid, and the mask
    (G, 1, T, L): a query at position p sees keys 0..p of its own sequence."""
    table: torch.Tensor
    length: int
    token_idx: torch.Tensor
    row_idx: torch.Tensor
    col_idx: torch.Tensor
    mask: torch.Tensor


class PagedBatch:
    """One forward's view of a `PagedKVCache`: per layer, the new K/V are written into their
    slots; then each sequence's K/V are gathered from its block table into a padded
    (G, n_kv_head, L, hs) tensor and `attention` runs with a mask of that sequence's length and
    causal order, once for all the one-token sequences (decodes) and once for the longer ones
    (prefill chunks, speculative verification). On a GPU a paged-attention kernel would read the
    blocks in place; on the CPU the gather is one copy per layer and costs about what it saves."""

    def __init__(self, cache: PagedKVCache, seqs: Sequence[tuple[Sequence[int], int, int]]):
        self.kv, self.block_size = cache.kv, cache.block_size
        dev, bs = self.kv.device, self.block_size
        tables, starts, counts = zip(*seqs)
        self.num_tokens = sum(counts)
        self.last = max(start + count - 1 for start, count in zip(starts, counts))
        self._positions = torch.tensor([p for start, count in zip(starts, counts) for p in range(start, start + count)],
                                       device=dev)
        self.slot_block = torch.tensor([table[p // bs] for table, start, count in seqs
                                        for p in range(start, start + count)], device=dev)
        self.slot_offset = self._positions % bs
        offsets = [0, *itertools.accumulate(counts)]  # where each sequence's tokens start in the packed row
        decodes = [i for i, c in enumerate(counts) if c == 1]
        longer = [i for i, c in enumerate(counts) if c > 1]
        self.groups = [self._group([tables[i] for i in g], [starts[i] for i in g], [counts[i] for i in g],
                                   [offsets[i] for i in g]) for g in (decodes, longer) if g]

    def _group(self, tables: list[Sequence[int]], starts: list[int], counts: list[int], offsets: list[int]) -> _Group:
        dev, bs = self.kv.device, self.block_size
        length = max(start + count for start, count in zip(starts, counts))
        n_blocks = -(-length // bs)
        table = torch.tensor([(list(t) + [0] * n_blocks)[:n_blocks] for t in tables], device=dev)
        token_idx = torch.tensor([o + j for o, c in zip(offsets, counts) for j in range(c)], device=dev)
        row_idx = torch.tensor([g for g, c in enumerate(counts) for _ in range(c)], device=dev)
        col_idx = torch.tensor([j for c in counts for j in range(c)], device=dev)
        T = max(counts)
        qpos = torch.zeros(len(counts), T, dtype=torch.long, device=dev)  # padded queries see key 0 only
        qpos[row_idx, col_idx] = self._positions[token_idx]
        mask = torch.arange(length, device=dev).view(1, 1, 1, -1) <= qpos.view(len(counts), 1, T, 1)
        return _Group(table, length, token_idx, row_idx, col_idx, mask)

    def positions(self, B: int, T: int, seq_len: int) -> torch.Tensor:
        check_context(0, self.last, seq_len)
        if (B, T) != (1, self.num_tokens):
            raise ValueError(f"a paged batch of {self.num_tokens} packed tokens cannot take input of shape {(B, T)}")
        return self._positions[None]

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        q, k, v = (t[0].transpose(0, 1) for t in (q, k, v))  # (N, heads, hs): the packed tokens
        k_store, v_store = self.kv[layer, 0], self.kv[layer, 1]  # (blocks, block_size, n_kv_head, hs)
        k_store[self.slot_block, self.slot_offset] = k
        v_store[self.slot_block, self.slot_offset] = v
        y = torch.empty_like(q)
        for g in self.groups:
            keys, values = (self._gather(store, g.table, g.length) for store in (k_store, v_store))
            qp = q.new_zeros(g.table.size(0), g.mask.size(2), *q.shape[1:])  # (G, T, n_head, hs)
            qp[g.row_idx, g.col_idx] = q[g.token_idx]
            out = attention(qp.transpose(1, 2), keys, values, mask=g.mask)  # (G, n_head, T, hs)
            y[g.token_idx] = out.transpose(1, 2)[g.row_idx, g.col_idx]
        return y.transpose(0, 1)[None]  # (1, n_head, N, hs)

    def _gather(self, store: torch.Tensor, table: torch.Tensor, length: int) -> torch.Tensor:
        """(G, n_kv_head, length, hs): each sequence's K or V, read from its blocks in table order
        (one copy; the rest are views)."""
        if table.size(1) == 1:  # one block per sequence (the engine's contiguous layout): only the filled slots
            return store[:, :length][table[:, 0]].transpose(1, 2)
        G, nb = table.shape  # index_select copies whole blocks (indexing with `table` copies element by element)
        blocks = store.index_select(0, table.flatten())
        return blocks.view(G, nb * self.block_size, *store.shape[2:])[:, :length].transpose(1, 2)

    def advance(self, T: int) -> None:
        """Nothing: the block manager, not the cache, knows how far each sequence has come."""
