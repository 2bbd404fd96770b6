"""The inference engine: continuous batching over a paged KV cache, with prefix caching,
preemption by recompute and speculative decoding.

    engine = Engine(model, max_batch_size=32)
    completions = engine.generate(prompts, SamplingParams(temperature=0, max_tokens=64))

or, a request at a time (the server): `add_request(prompt, params) -> id`, then `step()` until
`has_work()` is false, each step returning the new tokens of every request it advanced;
`abort(id)` cancels one. A request whose sampling raises (or whose step's forward pass raises)
finishes with `finish_reason="error"` and the error's text; the engine goes on with the others.

## One step
1. Schedule (vLLM v1's policy). Running requests go first, in the order they were admitted:
   each gets its next token (a decode) or, when its prompt is still being prefilled, its next
   chunk. Waiting requests are then admitted first come first served while the batch has room
   (`max_batch_size`) and the step's token budget (`max_num_batched_tokens`) has tokens left.
   Decodes first keeps running requests' inter-token latency steady while new prompts arrive;
   a whole prompt is prefilled in one step unless `chunked_prefill`, which cuts it to the
   budget that is left, so a long prompt never stalls the decodes for more than one budget.
   `scheduling="static"` admits only into an empty batch (static batching, for comparison).
2. Blocks. A request is admitted with the cached blocks of its prompt's longest cached prefix
   (prefix caching) and blocks for the rest of its chunk; decodes grow their table a block at a
   time. When the pool runs out, the most recently admitted running request is preempted: its
   blocks are freed and it goes back to the front of the queue with its tokens so far, to be
   recomputed (vLLM's recompute preemption). Requests are never dropped.
3. Forward: one pass over every scheduled token, packed as one (N, C) row for the matmuls (no
   padding). Attention per layer: the new K/V are written into their block slots, then each
   request's K/V are gathered from its block table into a padded (B, nh, L, hs) tensor and fed
   to `scaled_dot_product_attention` with a mask of that request's length and causal order.
   Decodes (one query each) share one such call, multi-token rows (prefill chunks, speculative
   verification) another. (A GPU would use a paged-attention kernel that reads the blocks in
   place; on the CPU this gather costs about what the kernel saves.)
4. Sample each request whose row reached its last token; finish on a stop token (the engine's
   `stop_token_ids`, EOS, unless `ignore_eos`; the request's own `stop_token_ids`, such as chat's
   <|assistant_end|>, always), on `max_tokens`, or when the context is full; a finished request's
   blocks are freed at once.

`paged=False` is the contiguous cache for comparison: one block of the whole context per
request, taken at admission (what a static KV cache allocates), no prefix caching.

## Speculative decoding (Leviathan et al., 2023, https://arxiv.org/abs/2211.17192)
With a `draft_model` (same tokenizer, smaller), each decode proposes up to
`num_speculative_tokens` tokens with the draft, one at a time, and the target scores them all in
one pass. Draft token d with draft probability q(d) and target probability p(d) is accepted
with probability min(1, p(d)/q(d)); the first rejected one is replaced by a draw from
norm(max(0, p - q)); when all are accepted the target's next distribution gives a bonus token.
p and q are both taken after the request's sampling transforms, so the output has exactly the
target's sampling distribution (greedy: exactly the target's greedy tokens). The draft keeps its
own K/V in the same blocks (same block tables, its own tensors).
"""

from __future__ import annotations

import itertools
import logging
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F

from pipeline.inference.blocks import BlockManager, NoFreeBlocks
from pipeline.inference.sampling import InvalidParam, SamplingParams, probabilities, sample
from pipeline.model.gpt import GPT, apply_rope

log = logging.getLogger(__name__)


# --- the model, walked module by module over packed tokens -------------------------------------

# attend(layer, q, k, v) with q, k, v (N, nh, hs) for the N packed tokens -> y (N, nh, hs)
Attend = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _rope_at(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """The model's rotation of x (N, nh, hs) at each token's own position: the tokens are laid
    along apply_rope's time axis and given their positions' rows of the tables."""
    return apply_rope(x.transpose(0, 1).unsqueeze(0), cos[positions], sin[positions])[0].transpose(0, 1)


def run_blocks(model: GPT, tokens: torch.Tensor, positions: torch.Tensor, attend: Attend) -> torch.Tensor:
    """GPT's forward (pipeline/model/gpt.py) over N packed tokens (N,) at `positions` (N,), with
    attention delegated to `attend`; returns the final hidden states (N, C) after ln_f. Eval
    mode only: no dropout."""
    N, C, nh = tokens.numel(), model.config.n_embd, model.config.n_head
    x = model.wte(tokens)
    if model.wpe is not None:
        x = x + model.wpe(positions)
    for i, block in enumerate(model.blocks):
        q, k, v = block.attn.c_attn(block.ln_1(x)).view(N, 3, nh, C // nh).unbind(1)  # each (N, nh, hs)
        if block.attn.rope:
            q = _rope_at(q, block.attn.cos, block.attn.sin, positions)
            k = _rope_at(k, block.attn.cos, block.attn.sin, positions)
        x = x + block.attn.c_proj(attend(i, q, k, v).reshape(N, C))
        x = x + block.mlp(block.ln_2(x))
    return model.ln_f(x)


def logits_of(model: GPT, hidden: torch.Tensor) -> torch.Tensor:
    """fp32 logits with the padding ids (>= vocab_size) masked: they are not tokens."""
    logits = model.lm_head(hidden).float()
    logits[..., model.config.vocab_size:] = -float("inf")
    return logits


def forward_full(model: GPT) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """idx (n, T) -> (logits (n, T, V), hidden (n, T, C)) with no cache: every position
    recomputed, as beam and contrastive search (pipeline/inference/sampling.py) need."""

    @torch.no_grad()
    def forward(idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n, T = idx.shape

        def attend(_, q, k, v):  # (n*T, nh, hs) -> per sequence, causal
            nh = q.size(1)
            q, k, v = (t.view(n, T, nh, -1).transpose(1, 2) for t in (q, k, v))  # (n, nh, T, hs)
            return F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(n * T, nh, -1)

        positions = torch.arange(T, device=idx.device).repeat(n)
        hidden = run_blocks(model, idx.flatten(), positions, attend).view(n, T, -1)
        return logits_of(model, hidden), hidden

    return forward


# --- requests ----------------------------------------------------------------------------------

FinishReason = Literal["stop", "length", "abort", "error"]


@dataclass(eq=False)  # a request is itself: compared by identity in the queues
class Request:
    id: int
    prompt: list[int]
    params: SamplingParams
    generator: torch.Generator
    stop_ids: frozenset[int]
    output: list[int] = field(default_factory=list)
    table: list[int] = field(default_factory=list)  # block table, shared by target and draft K/V
    num_computed: int = 0  # tokens whose target K/V are in the cache
    draft_computed: int = 0  # ... whose draft K/V are
    num_registered: int = 0  # leading full blocks registered for prefix caching
    finish_reason: FinishReason | None = None
    preemptions: int = 0

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.output


@dataclass
class RequestOutput:
    """What one step did for one request: its new tokens (possibly none: a prefill chunk)."""
    request_id: int
    new_token_ids: list[int]
    finished: bool
    finish_reason: FinishReason | None
    num_output_tokens: int
    error: str | None = None  # finish_reason "error": what went wrong


@dataclass
class EngineStats:
    steps: int = 0
    prompt_tokens_computed: int = 0  # prompt tokens run through the model (recomputes count again)
    prefix_blocks_queried: int = 0  # full prompt blocks looked up at admission
    prefix_blocks_hit: int = 0  # ... found in the prefix cache
    generated_tokens: int = 0
    preemptions: int = 0
    draft_tokens: int = 0
    accepted_tokens: int = 0
    usage_sum: float = 0.0  # KV-block usage summed over steps (after scheduling)
    usage_max: float = 0.0
    slot_fill_sum: float = 0.0  # tokens in the cache / slots of the blocks held (internal fragmentation)

    def as_dict(self) -> dict:
        steps = max(self.steps, 1)
        return {
            "steps": self.steps, "prompt_tokens_computed": self.prompt_tokens_computed,
            "generated_tokens": self.generated_tokens, "preemptions": self.preemptions,
            "kv_usage_mean": self.usage_sum / steps, "kv_usage_max": self.usage_max,
            "kv_slot_fill_mean": self.slot_fill_sum / steps,
            "prefix_cache_hit_rate": self.prefix_blocks_hit / self.prefix_blocks_queried
            if self.prefix_blocks_queried else None,
            "draft_tokens": self.draft_tokens, "accepted_tokens": self.accepted_tokens,
            "acceptance_rate": self.accepted_tokens / self.draft_tokens if self.draft_tokens else None,
        }


# --- the engine --------------------------------------------------------------------------------

@dataclass
class _Row:
    """One request's part of a forward pass: its new tokens start at cache position `start`."""
    req: Request
    tokens: list[int]
    start: int
    k: int = 0  # draft tokens reserved for (speculative decodes)


class Engine:
    def __init__(self, model: GPT, *, max_batch_size: int, block_size: int = 16, num_blocks: int | None = None,
                 draft_model: GPT | None = None, num_speculative_tokens: int = 4,
                 paged: bool = True, prefix_caching: bool = True, chunked_prefill: bool = False,
                 max_num_batched_tokens: int | None = None, scheduling: Literal["continuous", "static"] = "continuous",
                 stop_token_ids: Sequence[int] = (), seed: int = 0):
        cfg = model.config
        self.model, self.draft = model.eval(), draft_model.eval() if draft_model is not None else None
        self.seq_len, self.max_batch_size = cfg.seq_len, max_batch_size
        if self.draft is not None:
            d = self.draft.config
            if d.vocab_size != cfg.vocab_size or d.seq_len < cfg.seq_len:
                raise ValueError(f"draft model (vocab {d.vocab_size}, context {d.seq_len}) must share the target's "
                                 f"vocabulary ({cfg.vocab_size}) and cover its context ({cfg.seq_len})")
        if not paged:  # contiguous: one whole-context block per request
            block_size, num_blocks, prefix_caching = cfg.seq_len, max_batch_size, False
        per_request = -(-cfg.seq_len // block_size)
        num_blocks = num_blocks if num_blocks is not None else max_batch_size * per_request
        if num_blocks < per_request:
            raise ValueError(f"num_blocks={num_blocks} x block_size={block_size} cannot hold one full context "
                             f"of {cfg.seq_len} tokens")
        self.block_size, self.paged, self.chunked_prefill, self.scheduling = block_size, paged, chunked_prefill, scheduling
        self.max_num_batched_tokens = max_num_batched_tokens or max(cfg.seq_len, 512)
        if not chunked_prefill and self.max_num_batched_tokens < cfg.seq_len:
            raise ValueError(f"max_num_batched_tokens={self.max_num_batched_tokens} is below the context "
                             f"({cfg.seq_len}): a long prompt could never be scheduled without chunked_prefill")
        self.blocks = BlockManager(num_blocks, block_size, prefix_caching)
        self.num_speculative_tokens = num_speculative_tokens if self.draft is not None else 0
        self.kv = self._new_kv(model, num_blocks)
        self.draft_kv = self._new_kv(self.draft, num_blocks) if self.draft is not None else None
        self.stop_token_ids = frozenset(stop_token_ids)
        self.generator = torch.Generator().manual_seed(seed)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[int, Request] = {}
        self.stats = EngineStats()
        self._ids = itertools.count()
        self.device = next(model.parameters()).device

    def _new_kv(self, model: GPT, num_blocks: int) -> torch.Tensor:
        c = model.config
        p = next(model.parameters())
        # (layer, k|v, block, slot, head, head dim): a block table's blocks gathered side by side
        # are the sequence's (T, nh, hs) keys without a further copy
        return torch.zeros(c.n_layer, 2, num_blocks, self.block_size, c.n_head, c.n_embd // c.n_head,
                           dtype=p.dtype, device=p.device)

    # --- the request-at-a-time interface -------------------------------------------------------

    def check_request(self, prompt: Sequence[int], params: SamplingParams) -> None:
        """Raise InvalidParam unless the prompt is non-empty, no longer than the context and of
        known token ids, and the stop tokens are known ids. Reads only the model's sizes: safe
        from any thread."""
        vocab = self.model.config.vocab_size
        if not prompt:
            raise InvalidParam("prompt", "prompt: empty (a completion needs at least one token to start from)")
        if len(prompt) > self.seq_len:
            raise InvalidParam("prompt", f"prompt: {len(prompt)} tokens, the model's context is {self.seq_len}")
        for name, ids in (("prompt", prompt), ("stop_token_ids", params.stop_token_ids)):
            bad = [t for t in ids if not 0 <= t < vocab]
            if bad:
                raise InvalidParam(name, f"{name}: token ids {bad[:5]} outside the vocabulary [0, {vocab})")

    def add_request(self, prompt: Sequence[int], params: SamplingParams) -> int:
        """Queue a request (checked by `check_request`); returns its id."""
        prompt = [int(t) for t in prompt]
        self.check_request(prompt, params)
        eos = frozenset() if params.ignore_eos else self.stop_token_ids
        req = Request(next(self._ids), prompt, params, params.generator(self.generator), eos | set(params.stop_token_ids))
        self.requests[req.id] = req
        self.waiting.append(req)
        return req.id

    def abort(self, request_id: int) -> bool:
        """Cancel a request, freeing its blocks; False when it is unknown or already finished."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return False
        if req in self.running:
            self.running.remove(req)
        else:
            self.waiting.remove(req)
        self.blocks.free_table(req.table)
        req.finish_reason = "abort"
        return True

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @torch.no_grad()
    def step(self) -> list[RequestOutput]:
        """Schedule, run one forward pass (plus the draft's when speculating), sample; returns
        an output for every request the step advanced."""
        rows = self._schedule()
        if not rows:
            return []
        self.stats.steps += 1
        self.stats.usage_sum += self.blocks.usage
        self.stats.usage_max = max(self.stats.usage_max, self.blocks.usage)
        held = sum(len(w.req.table) for w in rows) * self.block_size
        self.stats.slot_fill_sum += sum(w.start + len(w.tokens) for w in rows) / held
        failed: dict[int, Exception] = {}  # request id -> what its draft sampling raised
        try:
            spec = [w for w in rows if w.k > 0]
            drafts = self._propose(spec, failed) if spec else {}
            for w in rows:
                w.tokens = w.tokens + drafts.get(w.req.id, ([], []))[0]
            hidden = self._forward(self.model, self.kv, rows)
            # the rows whose last token is the request's last (a finished prefill, a decode) need
            # logits: of that token and of each draft token after it; one lm_head call for all
            ends = list(itertools.accumulate(len(w.tokens) for w in rows))
            done = [w.start + len(w.tokens) >= len(w.req.tokens) for w in rows]
            needed = [list(range(end - 1 - len(drafts.get(w.req.id, ([], []))[0]), end)) if d else []
                      for w, end, d in zip(rows, ends, done)]
            rows_needed = torch.tensor([i for ix in needed for i in ix], dtype=torch.long, device=self.device)
            # sampling runs on the CPU, where each request's generator lives: one copy per step
            logits = logits_of(self.model, hidden[rows_needed]).cpu()
        except Exception as e:  # the batch's forward pass: no telling whose; its requests fail, the engine goes on
            return [self._fail(w.req, e) for w in rows]
        outputs, at = [], 0
        for w, d, ix in zip(rows, done, needed):
            row_logits = logits[at:at + len(ix)]
            at += len(ix)
            try:  # one request's failure is its own
                if w.req.id in failed:
                    raise failed[w.req.id]
                outputs.append(self._advance(w, d, row_logits, drafts.get(w.req.id)))
            except Exception as e:
                outputs.append(self._fail(w.req, e))
        return outputs

    def _advance(self, w: _Row, done: bool, logits: torch.Tensor,
                 drafts: tuple[list[int], list[torch.Tensor]] | None) -> RequestOutput:
        """One request's part of a step after the forward pass: count its prefill chunk, or
        sample (accept drafts) and emit its new tokens."""
        req, n = w.req, len(w.tokens)
        if req.num_computed < len(req.prompt):
            self.stats.prompt_tokens_computed += min(n, len(req.prompt) - req.num_computed)
        if not done:  # a prefill chunk: nothing to sample yet
            req.num_computed += n
            out = RequestOutput(req.id, [], False, None, len(req.output))
        else:
            new = self._accept(req, logits, *drafts) if drafts is not None \
                else [sample(logits[0], req.params, req.tokens, req.generator)]
            req.num_computed = len(req.tokens) + len(new) - 1
            out = self._emit(req, new)
        if req.finish_reason is None:
            req.num_registered = self.blocks.register(req.tokens, req.table, req.num_computed, req.num_registered)
        return out

    def _fail(self, req: Request, error: Exception) -> RequestOutput:
        """Finish a request whose step raised: free its blocks, report the error."""
        log.error("request %d failed: %r", req.id, error, exc_info=error)
        if req in self.running:
            self.running.remove(req)
        self.blocks.free_table(req.table)
        self.requests.pop(req.id, None)
        req.finish_reason = "error"
        return RequestOutput(req.id, [], True, "error", len(req.output), error=f"{type(error).__name__}: {error}")

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[list[int]]:
        """The completion ids of each prompt, in order."""
        ids = [self.add_request(p, params) for p in prompts]
        out: dict[int, list[int]] = {i: [] for i in ids}
        while self.has_work():
            for o in self.step():
                out[o.request_id].extend(o.new_token_ids)
        return [out[i] for i in ids]

    def kv_stats(self) -> dict:
        return self.stats.as_dict()

    # --- scheduling ----------------------------------------------------------------------------

    def _decoding(self, req: Request) -> bool:
        return req.num_computed == len(req.tokens) - 1

    def _schedule(self) -> list[_Row]:
        budget: float = self.max_num_batched_tokens
        rows: list[_Row] = []
        for req in list(self.running):
            if req not in self.running:  # preempted below by an earlier request of this step
                continue
            n = len(req.tokens) - req.num_computed
            if not self._decoding(req):  # still prefilling (chunked)
                n = min(n, budget)
                if n <= 0:
                    continue
            extra = self._speculation(req) if self._decoding(req) else 0
            if not self._reserve(req, req.num_computed + n + extra):
                continue  # req itself was preempted
            rows.append(_Row(req, req.tokens[req.num_computed:req.num_computed + n], req.num_computed, extra))
            budget -= n + extra
        if self.scheduling == "static":
            if self.running:
                return rows
            budget = float("inf")  # a static batch starts whole: all its prompts in one prefill
        while self.waiting and len(self.running) < self.max_batch_size and budget > 0:
            req = self.waiting[0]
            if not req.table:
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
            self.stats.prefix_blocks_queried += (len(req.tokens) - 1) // self.block_size
            self.stats.prefix_blocks_hit += req.num_computed // self.block_size
            rows.append(_Row(req, req.tokens[req.num_computed:req.num_computed + n], req.num_computed))
            budget -= n
        return rows

    def _speculation(self, req: Request) -> int:
        """Draft tokens for this decode: up to K, leaving room for the bonus token within
        max_tokens and the context."""
        if self.draft is None:
            return 0
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

    # --- forward over the paged cache ----------------------------------------------------------

    def _forward(self, model: GPT, kv: torch.Tensor, rows: list[_Row]) -> torch.Tensor:
        """Hidden states (N, C) of every row's new tokens, packed in row order; their K/V are
        written into the rows' blocks on the way."""
        dev, bs = self.device, self.block_size
        tokens = torch.tensor([t for w in rows for t in w.tokens], device=dev)
        positions = torch.tensor([w.start + i for w in rows for i in range(len(w.tokens))], device=dev)
        tables = [w.req.table for w in rows]
        slot_block = torch.tensor([tables[r][p // bs] for r, w in enumerate(rows)
                                   for p in range(w.start, w.start + len(w.tokens))], device=dev)
        slot_offset = positions % bs
        offsets = [0, *itertools.accumulate(len(w.tokens) for w in rows)]
        # decodes (one query) in one attention call, longer rows in another
        groups = [g for g in ([r for r, w in enumerate(rows) if len(w.tokens) == 1],
                              [r for r, w in enumerate(rows) if len(w.tokens) > 1]) if g]
        plans = [self._plan(rows, g, offsets) for g in groups]

        def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            k_store, v_store = kv[layer, 0], kv[layer, 1]  # (blocks, bs, nh, hs)
            k_store[slot_block, slot_offset] = k
            v_store[slot_block, slot_offset] = v
            y = torch.empty_like(q)
            for table, length, token_idx, row_idx, col_idx, mask in plans:
                keys, values = (self._gather(s, table, length) for s in (k_store, v_store))
                qp = q.new_zeros(table.size(0), int(col_idx.max()) + 1, *q.shape[1:])  # (G, T, nh, hs)
                qp[row_idx, col_idx] = q[token_idx]
                out = F.scaled_dot_product_attention(qp.transpose(1, 2), keys, values, attn_mask=mask)
                y[token_idx] = out.transpose(1, 2)[row_idx, col_idx]
            return y

        return run_blocks(model, tokens, positions, attend)

    def _plan(self, rows: list[_Row], group: list[int], offsets: list[int]):
        """Per attention group: the padded block tables, the longest length, where each packed
        token sits in the padded (G, T) query grid, and the mask (G, 1, T, L): a query at
        position p sees keys 0..p of its own request."""
        dev, bs = self.device, self.block_size
        length = max(rows[r].start + len(rows[r].tokens) for r in group)
        n_blocks = -(-length // bs)
        table = torch.tensor([(rows[r].req.table + [0] * n_blocks)[:n_blocks] for r in group], device=dev)
        token_idx = torch.tensor([offsets[r] + i for r in group for i in range(len(rows[r].tokens))], device=dev)
        row_idx = torch.tensor([g for g, r in enumerate(group) for _ in rows[r].tokens], device=dev)
        col_idx = torch.tensor([i for r in group for i in range(len(rows[r].tokens))], device=dev)
        T = int(col_idx.max()) + 1
        qpos = torch.zeros(len(group), T, dtype=torch.long, device=dev)  # padded queries see key 0 only
        qpos[row_idx, col_idx] = torch.tensor([rows[r].start + i for r in group for i in range(len(rows[r].tokens))],
                                              device=dev)
        mask = (torch.arange(length, device=dev).view(1, 1, 1, -1) <= qpos.view(len(group), 1, T, 1))
        return table, length, token_idx, row_idx, col_idx, mask

    def _gather(self, store: torch.Tensor, table: torch.Tensor, length: int) -> torch.Tensor:
        """(G, nh, length, hs): each request's K or V, read from its blocks in table order (one
        copy; the rest are views)."""
        if table.size(1) == 1:  # one block per request (the contiguous cache): copy only the filled slots
            return store[:, :length][table[:, 0]].transpose(1, 2)
        G, nb = table.shape
        return store[table].view(G, nb * self.block_size, *store.shape[2:])[:, :length].transpose(1, 2)

    # --- sampling, speculation, finishing ------------------------------------------------------

    def _propose(self, rows: list[_Row], failed: dict[int, Exception]) -> dict[int, tuple[list[int], list[torch.Tensor]]]:
        """Draft tokens and their draft distributions q for each decode row, drawn one position
        at a time with the draft model (its first pass also catches up its cache on tokens it
        has not seen: the prompt, or the last accepted draft and the bonus token). A request
        whose draft sampling raises stops proposing; its error goes to `failed`."""
        out: dict[int, tuple[list[int], list[torch.Tensor]]] = {}
        active = [(w.req, w.k) for w in rows]
        for req, _ in active:
            out[req.id] = ([], [])
        for j in itertools.count():
            active = [(req, k) for req, k in active if k > j and req.id not in failed]
            if not active:
                break
            drows = []
            for req, _ in active:
                seq = req.tokens + out[req.id][0]
                drows.append(_Row(req, seq[req.draft_computed:], req.draft_computed))
            hidden = self._forward(self.draft, self.draft_kv, drows)
            ends = torch.tensor(list(itertools.accumulate(len(w.tokens) for w in drows)), device=self.device)
            last = logits_of(self.draft, hidden[ends - 1]).cpu()
            for (req, _), w, logits in zip(active, drows, last):
                tokens, qs = out[req.id]
                req.draft_computed = w.start + len(w.tokens)
                try:
                    q = probabilities(logits, req.params, req.tokens + tokens)
                except Exception as e:
                    failed[req.id] = e
                    continue
                tokens.append(int(q.argmax()) if req.params.greedy else int(torch.multinomial(q, 1, generator=req.generator)))
                qs.append(q)
        self.stats.draft_tokens += sum(len(t) for t, _ in out.values())
        return out

    def _accept(self, req: Request, logits: torch.Tensor, drafts: list[int], qs: list[torch.Tensor]) -> list[int]:
        """The exact rule: accept draft d with probability min(1, p(d)/q(d)); at the first
        rejection draw from norm(max(0, p - q)); if all pass, a bonus token from the last p."""
        new: list[int] = []
        for j, (d, q) in enumerate(zip(drafts, qs)):
            p = probabilities(logits[j], req.params, req.tokens + new)
            accept = p[d] >= q[d] or float(torch.rand(1, generator=req.generator)) < float(p[d] / q[d])
            if not accept:
                residual = (p - q).clamp(min=0)
                residual = residual / residual.sum() if residual.sum() > 0 else p
                new.append(int(residual.argmax()) if req.params.greedy
                           else int(torch.multinomial(residual, 1, generator=req.generator)))
                break
            new.append(d)
            self.stats.accepted_tokens += 1
        else:
            p = probabilities(logits[len(drafts)], req.params, req.tokens + new)
            new.append(int(p.argmax()) if req.params.greedy else int(torch.multinomial(p, 1, generator=req.generator)))
        # the draft's cache is valid up to the last accepted draft token
        req.draft_computed = min(req.draft_computed, len(req.tokens) + len(new) - 1)
        return new

    def _emit(self, req: Request, new: list[int]) -> RequestOutput:
        """Append sampled tokens, cut at a stop token or a limit; finish and free if done."""
        reason: FinishReason | None = None
        kept = []
        for t in new:
            kept.append(t)
            if t in req.stop_ids:
                reason = "stop"
                break
            if len(req.output) + len(kept) >= req.params.max_tokens or len(req.tokens) + len(kept) >= self.seq_len:
                reason = "length"
                break
        req.output.extend(kept)
        self.stats.generated_tokens += len(kept)
        if reason is not None:
            req.finish_reason = reason
            self.running.remove(req)
            self.blocks.free_table(req.table)
            del self.requests[req.id]
        return RequestOutput(req.id, kept, reason is not None, reason, len(req.output))
