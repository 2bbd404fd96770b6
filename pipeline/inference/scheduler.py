"""The scheduler: which requests a step runs, with which of their tokens, and the KV-cache blocks
they need (vLLM v1's policy).

1. Running requests go first, in the order they were admitted: each gets its next token (a
   decode) or, while its prompt is still being prefilled, its next chunk. Waiting requests are
   then admitted first come first served while the batch has room (`max_batch_size`) and the
   step's token budget (`max_num_batched_tokens`) has tokens left. Decodes first keeps running
   requests' inter-token latency steady while new prompts arrive; a whole prompt is prefilled in
   one step unless `chunked_prefill`, which cuts it to the budget that is left, so a long prompt
   never stalls the decodes for more than one budget. `scheduling="static"` admits only into an
   empty batch (static batching, for comparison).
2. A request is admitted with the cached blocks of its prompt's longest cached prefix (prefix
   caching) and blocks for the rest of its chunk; decodes grow their table a block at a time. The
   blocks that the step fills are registered for prefix caching as they are scheduled, so a
   request admitted later in the same step already shares them: the step's forward writes every
   new K/V of a layer before any sequence attends, so it reads them in time (the G completions of
   one GRPO prompt prefill its full blocks once).
3. When the pool runs out, the most recently admitted running request is preempted: its blocks
   are freed and it goes back to the front of the queue with its tokens so far, to be recomputed
   (vLLM's recompute preemption). Requests are never dropped.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass
from typing import Literal

from pipeline.inference.blocks import BlockManager, NoFreeBlocks
from pipeline.inference.sequence import EngineStats, Request

log = logging.getLogger(__name__)


@dataclass
class ScheduledRow:
    """One request's part of a step: its new tokens, which start at cache position `start`."""
    req: Request
    tokens: list[int]
    start: int
    k: int = 0  # draft tokens reserved for (speculative decodes)


class Scheduler:
    def __init__(self, blocks: BlockManager, stats: EngineStats, *, seq_len: int, max_batch_size: int,
                 max_num_batched_tokens: int, chunked_prefill: bool,
                 scheduling: Literal["continuous", "static"], num_speculative_tokens: int):
        self.blocks, self.stats, self.seq_len = blocks, stats, seq_len
        self.max_batch_size, self.max_num_batched_tokens = max_batch_size, max_num_batched_tokens
        self.chunked_prefill, self.scheduling, self.num_speculative_tokens = chunked_prefill, scheduling, num_speculative_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []

    def add(self, req: Request) -> None:
        self.waiting.append(req)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, req: Request, *, computed: bool = True) -> None:
        """Take a finished, aborted or failed request out and free its blocks. `computed=False`
        (its step's forward failed): its blocks' K/V may be unwritten, so none stays cached."""
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        self.blocks.free_table(req.table, keep_cached=computed)

    def schedule(self) -> list[ScheduledRow]:
        budget: float = self.max_num_batched_tokens
        rows: list[ScheduledRow] = []
        for req in list(self.running):
            if req not in self.running:  # preempted below by an earlier request of this step
                continue
            n = len(req.tokens) - req.num_computed
            if not req.decoding:  # still prefilling (chunked)
                n = min(n, budget)
                if n <= 0:
                    continue
            extra = self._speculation(req) if req.decoding else 0
            if not self._reserve(req, req.num_computed + n + extra):
                continue  # req itself was preempted
            rows.append(self._row(req, n, extra))
            budget -= n + extra
        if self.scheduling == "static":
            if self.running:
                return rows
            budget = float("inf")  # a static batch starts whole: all its prompts in one prefill
        while self.waiting and len(self.running) < self.max_batch_size and budget > 0:
            req = self.waiting[0]
            if not req.table and not req.needs_prompt_logprobs:
                req.num_computed = self.blocks.match_prefix(req.tokens, req.table)
            n = len(req.tokens) - req.num_computed
            if n > budget:
                if not self.chunked_prefill:
                    break
                n = budget
            try:
                self.blocks.grow(req.table, req.num_computed + n)
            except NoFreeBlocks:
                self.blocks.free_table(req.table)  # wait for blocks, holding none
                req.num_computed = 0
                break
            self.waiting.popleft()
            self.running.append(req)
            self.stats.prefix_blocks_queried += (len(req.tokens) - 1) // self.blocks.block_size
            self.stats.prefix_blocks_hit += req.num_computed // self.blocks.block_size
            rows.append(self._row(req, n))
            budget -= n
        return rows

    def _row(self, req: Request, n: int, extra: int = 0) -> ScheduledRow:
        """The row of `req`'s next n tokens; the blocks they fill are registered now (see 2. above)."""
        start = req.num_computed
        req.num_registered = self.blocks.register(req.tokens, req.table, start + n, req.num_registered)
        return ScheduledRow(req, req.tokens[start:start + n], start, extra)

    def _speculation(self, req: Request) -> int:
        """Draft tokens for this decode: up to K, leaving room for the bonus token within
        max_tokens and the context."""
        return max(0, min(self.num_speculative_tokens, req.params.max_tokens - len(req.output) - 1,
                          self.seq_len - len(req.tokens)))

    def _reserve(self, req: Request, num_tokens: int) -> bool:
        """Blocks for `num_tokens` slots, preempting the latest admitted requests until they fit;
        False when `req` itself had to go."""
        while True:
            try:
                self.blocks.grow(req.table, num_tokens)
                return True
            except NoFreeBlocks:
                victim = self.running[-1]
                self._preempt(victim)
                if victim is req:
                    return False

    def _preempt(self, req: Request) -> None:
        """Recompute preemption: free the blocks, requeue at the front with the tokens so far."""
        self.running.remove(req)
        self.blocks.free_table(req.table)
        req.num_computed = req.draft_computed = req.num_registered = 0
        req.preemptions += 1
        self.stats.preemptions += 1
        self.waiting.appendleft(req)
        log.debug("preempted request %d at %d tokens", req.id, len(req.tokens))
