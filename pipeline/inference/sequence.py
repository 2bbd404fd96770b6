"""The engine's records: one request's state, what a step reports about it, and the run's counts.

A `Request` holds its prompt, the tokens sampled so far (with their log-probabilities), its
block table (the KV-cache blocks it holds, shared by the target and the draft model), how many of
its tokens have K/V in the cache, and why it finished. The scheduler moves it between the waiting
queue and the running batch; the engine appends its tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from pipeline.inference.sampling import SamplingParams

FinishReason = Literal["stop", "length", "abort", "error"]


@dataclass(frozen=True)
class TokenLogprobs:
    """A token's log-probability over the real vocabulary (the eval's and vLLM's reading: padding
    ids excluded), and the k most likely ids at its position with theirs, most likely first."""
    logprob: float
    top: list[tuple[int, float]]


@dataclass(eq=False)  # a request is itself: compared by identity in the queues
class Request:
    id: int
    prompt: list[int]
    params: SamplingParams
    generator: torch.Generator
    stop_ids: frozenset[int]
    output: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)  # of each output token, under the model
    # params.prompt_logprobs: each prompt token's (None for the first), filled as the prefill runs
    prompt_logprobs: list[TokenLogprobs | None] | None = None
    table: list[int] = field(default_factory=list)  # block table, shared by target and draft K/V
    num_computed: int = 0  # tokens whose target K/V are in the cache
    draft_computed: int = 0  # ... whose draft K/V are
    num_registered: int = 0  # leading full blocks registered for prefix caching
    finish_reason: FinishReason | None = None
    preemptions: int = 0

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.output

    @property
    def needs_prompt_logprobs(self) -> bool:
        """Its prompt's log-probabilities are asked for and not all computed: every prompt token
        must run through the model, so no prefix-cache hit."""
        return self.prompt_logprobs is not None and len(self.prompt_logprobs) < len(self.prompt)

    @property
    def decoding(self) -> bool:
        """Every token but the last (sampled, not yet read back) has its K/V in the cache."""
        return self.num_computed == len(self.prompt) + len(self.output) - 1


@dataclass
class RequestOutput:
    """What one step did for one request: its new tokens (possibly none: a prefill chunk) and
    their log-probabilities; with `params.logprobs`, their `TokenLogprobs` too, and with
    `params.prompt_logprobs`, the prompt's on the output of the first token."""
    request_id: int
    new_token_ids: list[int]
    finished: bool
    finish_reason: FinishReason | None
    num_output_tokens: int
    new_logprobs: list[float] = field(default_factory=list)
    error: str | None = None  # finish_reason "error": what went wrong
    new_token_logprobs: list[TokenLogprobs] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprobs | None] | None = None


@dataclass
class Completion:
    """One prompt's finished completion (`Engine.generate`): its token ids (a stop token that ended
    it included), the log-probability of each under the model (log-softmax of its logits, before
    any sampling transform: what the trainer computes for the same sequence), and why it ended."""
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: FinishReason | None

    @property
    def ids_before_stop(self) -> list[int]:
        """The token ids without the stop token that ended the completion (the answer's text)."""
        return self.token_ids[:-1] if self.finish_reason == "stop" else self.token_ids


@dataclass
class EngineStats:
    """Counts over an engine's life; `as_dict` gives the derived rates too."""
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
