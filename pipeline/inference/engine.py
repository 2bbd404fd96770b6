"""The inference engine: continuous batching over a paged KV cache, with prefix caching,
preemption by recompute and speculative decoding. Every generation in the pipeline runs here.

    engine = Engine(model, max_batch_size=32)
    completions = engine.generate(prompts, SamplingParams(temperature=0, max_tokens=64))

or, a request at a time (the server): `add_request(prompt, params) -> id`, then `step()` until
`has_work()` is false, each step returning the new tokens of every request it advanced;
`abort(id)` cancels one. A request whose sampling raises (or whose step's forward pass raises)
finishes with `finish_reason="error"` and the error's text; the engine goes on with the others.

The parts, each in its own file: request state (sequence.py), the block manager (blocks.py), the
scheduler (scheduler.py), the model runner (model_runner.py), speculative decoding
(speculative.py) and the sampler (sampling.py). A step is schedule -> run -> postprocess:
1. the scheduler picks the step's rows (decodes first, then admissions; see scheduler.py) and
   their KV-cache blocks, preempting when the pool runs out;
2. with a draft model, the decodes get draft tokens (speculative.py);
3. the model runner runs the target over every row's new tokens in one forward of the model's
   own code, and returns the logits of each row that reached its request's last token;
4. each such request samples its next token (or accepts drafts) with its own generator, records
   the token's log-probability (with `logprobs`, also over the real vocabulary with the top k;
   with `prompt_logprobs`, the prompt's, from logits of every prompt position), and finishes on a stop token (the engine's `stop_token_ids`, EOS,
   unless `ignore_eos`; the request's own `stop_token_ids`, such as chat's <|assistant_end|>,
   always), on `max_tokens`, or when the context is full; a finished request's blocks are freed
   at once.

`paged=False` is the contiguous cache for comparison: one block of the whole context per
request, taken at admission (what a static KV cache allocates), no prefix caching.

The engine does not copy the weights: it decodes with the model as it is at each step (GRPO
updates its policy between rollouts). Cached prefixes hold K/V of the weights that computed them,
so after the weights change call `reset_prefix_cache()` (vLLM's name for the same thing).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence
from typing import Literal

import torch
from tqdm import tqdm

from pipeline.inference.blocks import BlockManager
from pipeline.inference.model_runner import ModelRunner
from pipeline.inference.sampling import InvalidParam, SamplingParams, mask_padding, sample
from pipeline.inference.scheduler import ScheduledRow, Scheduler
from pipeline.inference.sequence import Completion, EngineStats, Request, RequestOutput, TokenLogprobs
from pipeline.inference.speculative import Drafts, Speculator
from pipeline.model.gpt import GPT

log = logging.getLogger(__name__)


class Engine:
    def __init__(self, model: GPT, *, max_batch_size: int, block_size: int = 16, num_blocks: int | None = None,
                 draft_model: GPT | None = None, num_speculative_tokens: int = 4,
                 paged: bool = True, prefix_caching: bool = True, chunked_prefill: bool = False,
                 max_num_batched_tokens: int | None = None, scheduling: Literal["continuous", "static"] = "continuous",
                 max_model_len: int | None = None, stop_token_ids: Sequence[int] = (), seed: int = 0):
        cfg = model.config
        # the longest a request may grow, prompt and output together (vLLM's max_model_len): the
        # model's context, or less to size the KV pool for short work (rollouts, eval's answers)
        seq_len = cfg.seq_len if max_model_len is None else max_model_len
        if not 0 < seq_len <= cfg.seq_len:
            raise ValueError(f"max_model_len={max_model_len}: must be in 1..{cfg.seq_len} (the model's context)")
        self.model, self.seq_len, self.vocab_size = model, seq_len, cfg.vocab_size
        if draft_model is not None:
            d = draft_model.config
            if d.vocab_size != cfg.vocab_size or d.seq_len < seq_len:
                raise ValueError(f"draft model (vocab {d.vocab_size}, context {d.seq_len}) must share the target's "
                                 f"vocabulary ({cfg.vocab_size}) and cover its context ({seq_len})")
        if not paged:  # contiguous: one whole-context block per request
            block_size, num_blocks, prefix_caching = seq_len, max_batch_size, False
        per_request = -(-seq_len // block_size)
        num_blocks = num_blocks if num_blocks is not None else max_batch_size * per_request
        if num_blocks < per_request:
            raise ValueError(f"num_blocks={num_blocks} x block_size={block_size} cannot hold one full context "
                             f"of {seq_len} tokens")
        max_num_batched_tokens = max_num_batched_tokens or max(seq_len, 512)
        if not chunked_prefill and max_num_batched_tokens < seq_len:
            raise ValueError(f"max_num_batched_tokens={max_num_batched_tokens} is below the context "
                             f"({seq_len}): a long prompt could never be scheduled without chunked_prefill")
        self.stats = EngineStats()
        self.blocks = BlockManager(num_blocks, block_size, prefix_caching)
        self.scheduler = Scheduler(self.blocks, self.stats, seq_len=seq_len, max_batch_size=max_batch_size,
                                   max_num_batched_tokens=max_num_batched_tokens, chunked_prefill=chunked_prefill,
                                   scheduling=scheduling,
                                   num_speculative_tokens=num_speculative_tokens if draft_model is not None else 0)
        self.runner = ModelRunner(model, num_blocks, block_size)
        self.speculator = Speculator(ModelRunner(draft_model, num_blocks, block_size), self.stats) \
            if draft_model is not None else None
        self.stop_token_ids = frozenset(stop_token_ids)
        self.generator = torch.Generator().manual_seed(seed)
        self.requests: dict[int, Request] = {}
        self._ids = itertools.count()

    @classmethod
    def for_prompts(cls, model: GPT, prompts: Sequence[Sequence[int]], max_tokens: int, *, max_batch_size: int,
                    **options) -> Engine:
        """An engine sized for a known batch of work: `max_model_len` the longest prompt plus
        max_tokens (at most the context), so the KV pool holds max_batch_size such requests and no
        more. `options` as for the constructor."""
        longest = min(model.config.seq_len, max(map(len, prompts), default=0) + max_tokens)
        return cls(model, max_batch_size=max(1, max_batch_size), max_model_len=max(1, longest), **options)

    # --- the request-at-a-time interface -------------------------------------------------------

    def check_request(self, prompt: Sequence[int], params: SamplingParams) -> None:
        """Raise InvalidParam unless the prompt is non-empty, no longer than the context and of
        known token ids, and the stop tokens are known ids. Reads only the model's sizes: safe
        from any thread."""
        if not prompt:
            raise InvalidParam("prompt", "prompt: empty (a completion needs at least one token to start from)")
        if len(prompt) > self.seq_len:
            raise InvalidParam("prompt", f"prompt: {len(prompt)} tokens, the context is {self.seq_len}")
        for name, ids in (("prompt", prompt), ("stop_token_ids", params.stop_token_ids)):
            bad = [t for t in ids if not 0 <= t < self.vocab_size]
            if bad:
                raise InvalidParam(name, f"{name}: token ids {bad[:5]} outside the vocabulary [0, {self.vocab_size})")

    def add_request(self, prompt: Sequence[int], params: SamplingParams) -> int:
        """Queue a request (checked by `check_request`); returns its id."""
        prompt = [int(t) for t in prompt]
        self.check_request(prompt, params)
        eos = frozenset() if params.ignore_eos else self.stop_token_ids
        req = Request(next(self._ids), prompt, params, params.generator(self.generator), eos | set(params.stop_token_ids),
                      prompt_logprobs=None if params.prompt_logprobs is None else [None])
        self.requests[req.id] = req
        self.scheduler.add(req)
        return req.id

    def abort(self, request_id: int) -> bool:
        """Cancel a request, freeing its blocks; False when it is unknown or already finished."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return False
        self.scheduler.finish(req)
        req.finish_reason = "abort"
        return True

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix (the model's weights changed, so their K/V are stale)."""
        self.blocks.reset_prefix_cache()

    @torch.no_grad()
    def step(self) -> list[RequestOutput]:
        """Schedule, run one forward pass (plus the draft's when speculating), sample; returns
        an output for every request the step advanced."""
        rows = self.scheduler.schedule()
        if not rows:
            return []
        self._count(rows)
        failed: dict[int, Exception] = {}  # request id -> what its draft sampling raised
        try:
            drafts, logits = self._run(rows, failed)
        except Exception as e:  # the batch's forward pass: no telling whose; its requests fail, the engine goes on
            return [self._fail(w.req, e, computed=False) for w in rows]
        return self._postprocess(rows, drafts, logits, failed)

    def _run(self, rows: list[ScheduledRow], failed: dict[int, Exception]) -> tuple[Drafts, torch.Tensor]:
        """The draft tokens of the speculative decodes, then the target's forward over every
        row: the logits of each row that reached its request's last token (a decode, a finished
        prefill), of that token and of each draft token after it, in row order."""
        spec = [w for w in rows if w.k > 0]
        drafts = self.speculator.propose(spec, failed) if spec else {}
        logits_at, end = [], 0
        for w in rows:
            w.tokens = w.tokens + drafts.get(w.req.id, ([], []))[0]
            end += len(w.tokens)
            logits_at += range(end - self._num_prompt_logits(w) - self._num_logits(w, drafts), end)
        return drafts, self.runner.run([(w.req.table, w.start, w.tokens) for w in rows], logits_at)

    @staticmethod
    def _num_prompt_logits(w: ScheduledRow) -> int:
        """Positions of the row that predict a prompt token whose log-probability is asked for:
        they come first in the row's logits, right before the sampling positions."""
        if not w.req.needs_prompt_logprobs:
            return 0
        return max(0, min(w.start + len(w.tokens), len(w.req.prompt) - 1) - w.start)

    @staticmethod
    def _num_logits(w: ScheduledRow, drafts: Drafts) -> int:
        if w.start + len(w.tokens) < len(w.req.tokens):  # a prefill chunk: nothing to sample yet
            return 0
        return 1 + len(drafts.get(w.req.id, ([], []))[0])

    def _postprocess(self, rows: list[ScheduledRow], drafts: Drafts, logits: torch.Tensor,
                     failed: dict[int, Exception]) -> list[RequestOutput]:
        """Sample (or accept drafts), record each token's log-probability, emit; one request's
        failure is its own."""
        logprobs = logits.log_softmax(dim=-1)  # the model's own distribution, before any sampling transform
        mask_padding(logits, self.vocab_size)
        counts = [self._num_logits(w, drafts) for w in rows]
        prompt_counts = [self._num_prompt_logits(w) for w in rows]
        # each row's logits: its prompt positions (if asked for), then its sampling positions
        firsts = [f + p for f, p in zip(itertools.accumulate([0, *map(sum, zip(counts, prompt_counts))]), prompt_counts)]
        # the decodes and finished prefills without drafts sample together, in one call of the sampler
        plain = [k for k, w in enumerate(rows) if counts[k] and w.req.id not in drafts and w.req.id not in failed]
        sampled = dict(zip((rows[k].req.id for k in plain),
                           self._sample([rows[k].req for k in plain], logits[[firsts[k] for k in plain]])))
        outputs = []
        for w, first, n, p in zip(rows, firsts, counts, prompt_counts):
            span = slice(first, first + n)
            try:
                token = sampled.get(w.req.id)
                if w.req.id in failed or isinstance(token, Exception):
                    raise failed.get(w.req.id, token)
                if p:
                    self._record_prompt_logprobs(w, logits[first - p:first])
                outputs.append(self._advance(w, token, logits[span], logprobs[span], drafts))
            except Exception as e:
                outputs.append(self._fail(w.req, e))
        return outputs

    def _sample(self, reqs: list[Request], logits: torch.Tensor) -> list[int | Exception]:
        """Each request's next token; a request whose sampling raises gets its exception instead
        (found by sampling the batch again a row at a time: no row has drawn a number yet)."""
        if not reqs:
            return []
        try:
            return sample(logits, [r.params for r in reqs], [r.tokens for r in reqs], [r.generator for r in reqs],
                          [r.output for r in reqs])
        except Exception:
            out: list[int | Exception] = []
            for r, row in zip(reqs, logits):
                try:
                    out += sample(row[None], [r.params], [r.tokens], [r.generator], [r.output])
                except Exception as e:
                    out.append(e)
            return out

    def _count(self, rows: list[ScheduledRow]) -> None:
        s, usage = self.stats, self.blocks.usage
        s.steps += 1
        s.usage_sum += usage
        s.usage_max = max(s.usage_max, usage)
        held = sum(len(w.req.table) for w in rows) * self.blocks.block_size
        s.slot_fill_sum += sum(w.start + len(w.tokens) for w in rows) / held

    def _advance(self, w: ScheduledRow, token: int | None, logits: torch.Tensor, logprobs: torch.Tensor,
                 drafts: Drafts) -> RequestOutput:
        """One request's part of a step after the forward pass: count its prefill chunk, or take
        its sampled token (accept drafts) and emit its new tokens."""
        req, n = w.req, len(w.tokens)
        if req.num_computed < len(req.prompt):
            self.stats.prompt_tokens_computed += min(n, len(req.prompt) - req.num_computed)
        if len(logits) == 0:  # a prefill chunk: nothing to sample yet
            req.num_computed += n
            return RequestOutput(req.id, [], False, None, len(req.output))
        new = self.speculator.accept(req, logits, *drafts[req.id]) if req.id in drafts else [token]
        req.num_computed = len(req.tokens) + len(new) - 1
        k = req.params.logprobs
        reported = self._token_logprobs(logits[:len(new)], new, k) if k is not None else []
        return self._emit(req, new, [float(logprobs[j, t]) for j, t in enumerate(new)], reported)

    def _token_logprobs(self, logits: torch.Tensor, tokens: list[int], k: int) -> list[TokenLogprobs]:
        """Each token's log-probability under its row of logits, over the real vocabulary, with
        the k most likely ids."""
        logp = logits[:, :self.vocab_size].log_softmax(dim=-1)
        picked = logp.gather(1, torch.tensor(tokens)[:, None])[:, 0].tolist()
        values, ids = logp.topk(min(k, self.vocab_size), dim=-1)
        return [TokenLogprobs(lp, list(zip(i, v))) for lp, i, v in zip(picked, ids.tolist(), values.tolist())]

    def _record_prompt_logprobs(self, w: ScheduledRow, logits: torch.Tensor) -> None:
        """The log-probabilities of the prompt tokens this row's positions predict (a chunk
        recomputed after a preemption overwrites its own)."""
        req = w.req
        del req.prompt_logprobs[w.start + 1:]
        req.prompt_logprobs += self._token_logprobs(logits, req.prompt[w.start + 1:w.start + 1 + len(logits)],
                                                    req.params.prompt_logprobs)

    def _emit(self, req: Request, new: list[int], logprobs: list[float],
              reported: list[TokenLogprobs]) -> RequestOutput:
        """Append sampled tokens, cut at a stop token or a limit; finish and free if done."""
        reason: Literal["stop", "length"] | None = None
        kept = []
        for t in new:
            kept.append(t)
            if t in req.stop_ids:
                reason = "stop"
                break
            if len(req.output) + len(kept) >= req.params.max_tokens or len(req.tokens) + len(kept) >= self.seq_len:
                reason = "length"
                break
        first = not req.output
        req.output.extend(kept)
        req.logprobs.extend(logprobs[:len(kept)])
        self.stats.generated_tokens += len(kept)
        if reason is not None:
            req.finish_reason = reason
            self.scheduler.finish(req)
            del self.requests[req.id]
        return RequestOutput(req.id, kept, reason is not None, reason, len(req.output), logprobs[:len(kept)],
                             new_token_logprobs=reported[:len(kept)],
                             prompt_logprobs=req.prompt_logprobs if first else None)

    def _fail(self, req: Request, error: Exception, computed: bool = True) -> RequestOutput:
        """Finish a request whose step raised: free its blocks, report the error."""
        log.error("request %d failed: %r", req.id, error, exc_info=error)
        self.scheduler.finish(req, computed=computed)
        self.requests.pop(req.id, None)
        req.finish_reason = "error"
        return RequestOutput(req.id, [], True, "error", len(req.output), error=f"{type(error).__name__}: {error}")

    # --- whole batches ------------------------------------------------------------------------

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams], *,
                 desc: str | None = None) -> list[Completion]:
        """Each prompt's completion, in order: one `SamplingParams` for all, or one per prompt
        (a seed each, say). Requests run as the scheduler admits them, `max_batch_size` at a time;
        `desc` names a progress bar of finished requests. Raises if any request failed."""
        per_prompt = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        if len(per_prompt) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(per_prompt)} SamplingParams")
        ids = [self.add_request(p, sp) for p, sp in zip(prompts, per_prompt)]
        reqs = [self.requests[i] for i in ids]
        errors: dict[int, str] = {}
        with tqdm(total=len(ids), desc=desc, unit="request", disable=None if desc else True) as bar:
            while self.has_work():
                for o in self.step():
                    bar.update(o.finished)
                    if o.error is not None:
                        errors[o.request_id] = o.error
        if errors:
            raise RuntimeError(f"{len(errors)} of {len(ids)} requests failed; the first: {next(iter(errors.values()))}")
        return [Completion(r.output, r.logprobs, r.finish_reason) for r in reqs]

    def kv_stats(self) -> dict:
        return self.stats.as_dict()
