"""Sampling: the one sampler of the repository, as stateless functions on logits.

Per request, the logits of the next token go through, in this order (the order of HF
`generate`'s logits processors and vLLM's sampler):
    repetition penalty -> frequency and presence penalties -> temperature -> top-k -> top-p
    -> min-p -> softmax -> draw.
Each filter sets the logits it removes to -inf, so the draw is one inverse-CDF draw (`draw`) over
the whole vocabulary: with every filter off it is plain sampling from softmax(logits / T).
Temperature 0 is greedy (argmax after the penalties), as in vLLM.

The arithmetic is float32 and cannot produce NaN, whatever the logits or the (valid) settings:
NaN logits count as -inf (not a token) and +inf as float32's largest value; the repetition
penalty clamps what it scales to float32's range; temperature divides logits shifted so the
largest is 0; every filter keeps the most likely token. A row with no finite logit at all has no distribution and
raises. `SamplingParams` checks its values as float32 holds them (1e-300 is 0 there).

`SamplingParams` carries the settings under vLLM's field names; each request gets its own
`torch.Generator`, seeded from `seed` (or by the engine when `seed` is None), so a request's
tokens do not depend on what else is in the batch. Every generation in the pipeline (the server,
GRPO's rollouts, eval's greedy and sampled answers, the stages' samples) goes through the engine
and so through `sample`; speculative decoding compares `probabilities` of the draft and the target.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

GREEDY_EPS = 1e-5  # temperatures below this are greedy (vLLM's _SAMPLING_EPS)
FLOAT32_MAX = torch.finfo(torch.float32).max
SEED_RANGE = (-2**63, 2**63 - 1)  # a torch.long, as vLLM checks it
MAX_LOGPROBS = 20  # top log-probabilities per token at most (vLLM's default max_logprobs, OpenAI's chat limit)


class InvalidParam(ValueError):
    """A request setting out of range; `param` names it (the server's 400 says which)."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


def as_float32(value: float) -> float:
    """The value the sampling arithmetic sees: overflow is inf, underflow 0."""
    try:
        value = float(value)
    except OverflowError:  # an int beyond float64
        value = float("inf") if value > 0 else -float("inf")
    return torch.tensor(value, dtype=torch.float32).item()


@dataclass
class SamplingParams:
    """One request's decoding settings, named as vLLM's `SamplingParams`."""

    temperature: float = 1.0  # 0: greedy; at most 2, as OpenAI
    top_k: int = 0  # keep the k most likely tokens; 0 (or -1, vLLM's old spelling): all
    top_p: float = 1.0  # keep the smallest set whose probability reaches top_p (Holtzman et al., 2019)
    min_p: float = 0.0  # drop tokens below min_p x the most likely token's probability (Nguyen et al., 2024)
    repetition_penalty: float = 1.0  # > 1 discourages tokens already in the prompt or output (Keskar et al., 2019)
    presence_penalty: float = 0.0  # OpenAI's: subtracted once from the logit of every token already generated
    frequency_penalty: float = 0.0  # OpenAI's: subtracted per time a token was generated
    max_tokens: int = 16  # completion tokens at most
    ignore_eos: bool = False  # keep going past EOS (fixed output lengths for benchmarks); stop_token_ids still stop
    seed: int | None = None  # per-request generator seed; None: drawn from the engine's seeded generator
    stop_token_ids: list[int] = field(default_factory=list)  # extra stop tokens beside the engine's
    logprobs: int | None = None  # report each output token's log-probability with the k most likely (0: none)
    prompt_logprobs: int | None = None  # ... and each prompt token's (the first: none), so no prefix-cache hit

    def __post_init__(self) -> None:
        """Each value checked as float32 holds it, so a value that passes cannot overflow or
        vanish in the arithmetic (top_p=1e-300 is 0 in float32: refused)."""
        t, p, m, r, pp, fp = (as_float32(v) for v in (self.temperature, self.top_p, self.min_p, self.repetition_penalty,
                                                       self.presence_penalty, self.frequency_penalty))
        checks = [
            ("temperature", 0 <= t <= 2, "must be in [0, 2]"),
            ("top_k", self.top_k >= -1, "must be >= 0 (0 or -1: off)"),
            ("top_p", 0 < p <= 1, "must be in (0, 1] (as float32)"),
            ("min_p", 0 <= m <= 1, "must be in [0, 1]"),
            ("repetition_penalty", 0 < r < float("inf"), "must be > 0 and finite (as float32)"),
            ("presence_penalty", -2 <= pp <= 2, "must be in [-2, 2]"),
            ("frequency_penalty", -2 <= fp <= 2, "must be in [-2, 2]"),
            ("max_tokens", self.max_tokens >= 1, "must be >= 1"),
            ("seed", self.seed is None or SEED_RANGE[0] <= self.seed <= SEED_RANGE[1],
             f"must be in [{SEED_RANGE[0]}, {SEED_RANGE[1]}]"),
            ("logprobs", self.logprobs is None or 0 <= self.logprobs <= MAX_LOGPROBS, f"must be in [0, {MAX_LOGPROBS}]"),
            ("prompt_logprobs", self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= MAX_LOGPROBS,
             f"must be in [0, {MAX_LOGPROBS}]"),
        ]
        for name, ok, why in checks:
            if not ok:
                raise InvalidParam(name, f"{name}={getattr(self, name)!r}: {why}")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_EPS

    @property
    def penalized(self) -> bool:
        """Whether the logits depend on the request's tokens so far."""
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    def generator(self, fallback: torch.Generator) -> torch.Generator:
        """This request's generator: from `seed`, or seeded by a draw from the engine's generator."""
        seed = self.seed if self.seed is not None else int(torch.randint(0, 2**62, (1,), generator=fallback))
        return torch.Generator().manual_seed(seed)


# --- logits processors: (V,) or (n, V) float logits in, same shape out ------------------------

def apply_repetition_penalty(logits: torch.Tensor, history: Sequence[int], penalty: float) -> torch.Tensor:
    """CTRL's penalty as HF and vLLM apply it: a seen token's logit is divided by `penalty` when
    positive and multiplied by it when negative, so it always becomes less likely. What overflows
    is clamped to float32's range (a finite logit stays finite; -inf stays -inf)."""
    if penalty == 1.0 or not history:
        return logits
    ids = torch.tensor(sorted(set(history)), dtype=torch.long)
    seen = logits[..., ids]
    penalized = torch.where(seen > 0, seen / penalty, seen * penalty).clamp(-FLOAT32_MAX, FLOAT32_MAX)
    logits = logits.clone()
    logits[..., ids] = torch.where(seen.isfinite(), penalized, seen)
    return logits


def apply_presence_frequency_penalties(logits: torch.Tensor, output: Sequence[int], presence: float,
                                       frequency: float) -> torch.Tensor:
    """OpenAI's penalties, on the generated tokens only (vLLM's reading): a token generated c times
    loses c x frequency + presence from its logit. At most 2 x (c + 1) against float32's range of
    1e38: nothing overflows, and -inf stays -inf."""
    if (presence == 0.0 and frequency == 0.0) or not output:
        return logits
    ids, counts = torch.tensor(list(output), dtype=torch.long).unique(return_counts=True)
    logits = logits.clone()
    logits[..., ids] -= counts * frequency + presence
    return logits


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return logits / temperature


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits (ties at the k-th value are broken by position, so exactly k stay)."""
    if k <= 0 or k >= logits.size(-1):
        return logits
    keep = logits.topk(k, dim=-1).indices
    return torch.full_like(logits, -float("inf")).scatter(-1, keep, logits.gather(-1, keep))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus: keep the most likely tokens until their probability reaches p (the first always stays)."""
    if p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    sorted_probs = sorted_logits.softmax(dim=-1)
    drop_sorted = (sorted_probs.cumsum(dim=-1) - sorted_probs) >= p  # the mass before this token reaches p
    drop_sorted[..., 0] = False  # p below float32's resolution would otherwise drop them all
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, -float("inf"))


def min_p_filter(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Keep tokens whose probability is at least min_p x the top token's."""
    if min_p <= 0.0:
        return logits
    probs = logits.softmax(dim=-1)
    return logits.masked_fill(probs < min_p * probs.amax(dim=-1, keepdim=True), -float("inf"))


def process_logits(logits: torch.Tensor, params: SamplingParams, history: Sequence[int],
                   output: Sequence[int] = ()) -> torch.Tensor:
    """All of a request's transforms, in the order above (temperature 0: only the penalties), on
    float32 logits made safe first: NaN is no token (-inf), +inf the largest float32. Raises
    ValueError when a row has no finite logit: no distribution to draw from."""
    logits = logits.float().nan_to_num(nan=-float("inf"), posinf=FLOAT32_MAX, neginf=-float("inf"))
    if not logits.amax(dim=-1).isfinite().all():
        raise ValueError("no token has a finite logit (the model's output is -inf or NaN everywhere)")
    logits = apply_repetition_penalty(logits, history, params.repetition_penalty)
    logits = apply_presence_frequency_penalties(logits, output, params.presence_penalty, params.frequency_penalty)
    if params.greedy:
        return logits
    # shifted so the largest is 0: dividing by a small temperature can then only push the
    # others towards -inf (probability 0), never overflow to +inf
    logits = apply_temperature(logits - logits.amax(dim=-1, keepdim=True), params.temperature)
    logits = top_k_filter(logits, params.top_k)
    logits = top_p_filter(logits, params.top_p)
    return min_p_filter(logits, params.min_p)


def probabilities(logits: torch.Tensor, params: SamplingParams, history: Sequence[int],
                  output: Sequence[int] = ()) -> torch.Tensor:
    """The distribution the next token is drawn from; greedy is the one-hot of the argmax.
    Speculative decoding compares these for the draft and the target."""
    logits = process_logits(logits, params, history, output)
    if params.greedy:
        return F.one_hot(logits.argmax(dim=-1), logits.size(-1)).float()
    return logits.softmax(dim=-1)


def draw(probs: torch.Tensor, generators: Sequence[torch.Generator | None]) -> list[int]:
    """One id per row of probs (n, V), by inverting the row's CDF at one uniform number from its
    own generator: the first id whose cumulative probability exceeds it (so an id of probability
    0 is never drawn). One random number per token, whatever else is in the batch; about a fifth
    of `torch.multinomial`'s time over a 4096-token vocabulary."""
    cdf = probs.double().cumsum(dim=-1)
    u = torch.cat([torch.rand(1, generator=g, dtype=torch.float64) for g in generators])
    return torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).clamp(max=probs.size(-1) - 1)[:, 0].tolist()


def sample(logits: torch.Tensor, params: Sequence[SamplingParams], histories: Sequence[Sequence[int]],
           generators: Sequence[torch.Generator | None], outputs: Sequence[Sequence[int]] | None = None) -> list[int]:
    """The next token of each row of logits (n, V): row i under params[i], with its history
    (prompt and output: the repetition penalty's), its output so far (the frequency and presence
    penalties'; default none) and its own generator. Rows of the same settings and no penalty go
    through the transforms together, one call per operation for all of them; every row is
    transformed before any is drawn, so a row that raises has consumed no random number."""
    outputs = outputs if outputs is not None else [()] * len(params)
    groups: dict[tuple, list[int]] = {}
    for i, p in enumerate(params):
        key = ("alone", i) if p.penalized else (p.temperature, p.top_k, p.top_p, p.min_p)
        groups.setdefault(key, []).append(i)
    processed = [(rows, process_logits(logits[rows], params[rows[0]], histories[rows[0]], outputs[rows[0]]))
                 for rows in groups.values()]
    out = [0] * len(params)
    for rows, x in processed:
        ids = x.argmax(dim=-1).tolist() if params[rows[0]].greedy else draw(x.softmax(dim=-1), [generators[i] for i in rows])
        for i, t in zip(rows, ids):
            out[i] = t
    return out


def mask_padding(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """The logits with the model's padding ids (>= vocab_size; pipeline/model/gpt.py pads its
    vocabulary to a multiple of 64) at -inf, in place: they are not tokens, so never drawn."""
    logits[..., vocab_size:] = -float("inf")
    return logits
