"""The paged KV cache's bookkeeping (vLLM's PagedAttention, Kwon et al., 2023,
https://arxiv.org/abs/2309.06180): fixed-size blocks of `block_size` token slots, a free list,
a reference count per block, and prefix caching by block hash.

A sequence owns a block table (a list of block ids); token t's K/V live in block
`table[t // block_size]` at offset `t % block_size`. Growing a sequence appends a block to its
table, so nothing is ever copied. A block that is full of tokens (computed, or being computed by
the step being scheduled) is registered under a hash of its tokens chained with its predecessor's
hash, so two sequences whose prompts open with the same full blocks share them (reference count
> 1). A block whose count drops to 0 but that holds a registered prefix stays cached
("evictable") until the free list is empty; it is then reused, least recently released first.
Evictable blocks count as free.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Sequence


class NoFreeBlocks(RuntimeError):
    """The pool is exhausted; the scheduler answers by preempting a sequence."""


def block_hashes(tokens: Sequence[int], block_size: int) -> list[int]:
    """One hash per full block of `tokens`, each chained to the previous block's, so a hash names
    the whole prefix up to the end of its block. Python's hash of an int tuple is the same in
    every process (PYTHONHASHSEED salts only str and bytes)."""
    hashes, parent = [], 0
    for start in range(0, len(tokens) - block_size + 1, block_size):
        parent = hash((parent, tuple(tokens[start:start + block_size])))
        hashes.append(parent)
    return hashes


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True):
        self.num_blocks, self.block_size, self.prefix_caching = num_blocks, block_size, prefix_caching
        self.free: deque[int] = deque(range(num_blocks))  # holding nothing worth keeping
        self.ref = [0] * num_blocks
        self.hash_of: dict[int, int] = {}  # block -> its prefix hash, for registered blocks
        self.cached: dict[int, int] = {}  # prefix hash -> block
        self.evictable: OrderedDict[int, None] = OrderedDict()  # ref 0 but cached, oldest first

    @property
    def num_free(self) -> int:
        return len(self.free) + len(self.evictable)

    @property
    def usage(self) -> float:
        """Fraction of blocks held by sequences (vLLM's kv_cache_usage)."""
        return 1.0 - self.num_free / self.num_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _allocate(self) -> int:
        if self.free:
            block = self.free.popleft()
        elif self.evictable:
            block, _ = self.evictable.popitem(last=False)
            del self.cached[self.hash_of.pop(block)]
        else:
            raise NoFreeBlocks(f"all {self.num_blocks} KV blocks are in use")
        self.ref[block] = 1
        return block

    def _release(self, block: int) -> None:
        assert self.ref[block] > 0, f"block {block} released more often than taken"
        self.ref[block] -= 1
        if self.ref[block] == 0:
            if block in self.hash_of:
                self.evictable[block] = None
            else:
                self.free.append(block)

    def grow(self, table: list[int], num_tokens: int) -> None:
        """Append blocks to `table` until it holds `num_tokens` slots. On NoFreeBlocks the blocks
        taken so far stay in the table (the caller frees or preempts the whole sequence)."""
        while len(table) * self.block_size < num_tokens:
            table.append(self._allocate())

    def free_table(self, table: list[int], keep_cached: bool = True) -> None:
        """Release a finished, cancelled or preempted sequence's blocks, its tail first, so the
        tail of a cached prefix is evicted before its head. `keep_cached=False` first unregisters
        them (their K/V may never have been written: the forward that was to write them failed)."""
        for block in reversed(table):
            if not keep_cached and block in self.hash_of:
                del self.cached[self.hash_of.pop(block)]
            self._release(block)
        table.clear()

    def reset_prefix_cache(self) -> None:
        """Forget every registered prefix: held blocks stay with their sequences (and go to the
        free list when released), evictable ones are free at once."""
        self.free.extend(self.evictable)
        self.evictable.clear()
        self.cached.clear()
        self.hash_of.clear()

    def match_prefix(self, tokens: Sequence[int], table: list[int]) -> int:
        """Take the cached blocks that hold the longest prefix of `tokens` into the empty `table`;
        returns the number of tokens covered. The last token is always left to compute, since
        its logits are needed."""
        assert not table, "prefix matching starts a sequence's table"
        if not self.prefix_caching:
            return 0
        for h in block_hashes(tokens[:len(tokens) - 1], self.block_size):
            block = self.cached.get(h)
            if block is None:
                break
            if self.ref[block] == 0:
                del self.evictable[block]
            self.ref[block] += 1
            table.append(block)
        return len(table) * self.block_size

    def register(self, tokens: Sequence[int], table: list[int], num_tokens: int, num_registered: int) -> int:
        """Register the table's blocks that the first `num_tokens` tokens fill (computed, or
        computed by the step being scheduled); returns how many blocks are registered now. A block
        whose content another block already holds stays private."""
        full = num_tokens // self.block_size
        if not self.prefix_caching or full <= num_registered:
            return num_registered
        hashes = block_hashes(tokens[:full * self.block_size], self.block_size)
        for i in range(num_registered, full):
            if hashes[i] not in self.cached:
                self.cached[hashes[i]] = table[i]
                self.hash_of[table[i]] = hashes[i]
        return full
