"""Sampling: stateless functions on logits, and the decoding strategies built from them.

Per request, the logits of the next token go through, in this order (the order of HF
`generate`'s logits processors and vLLM's sampler):
    repetition penalty -> temperature -> top-k -> top-p -> min-p -> softmax -> draw.
Each filter sets the logits it removes to -inf, so the draw is one `torch.multinomial` over the
whole vocabulary: with every filter off it is exactly plain multinomial sampling.
Temperature 0 is greedy (argmax after the repetition penalty), as in vLLM.

The arithmetic is float32 and cannot produce NaN, whatever the logits or the (valid) settings:
NaN logits count as -inf (not a token) and +inf as float32's largest value; the penalty clamps
what it scales to float32's range; temperature divides logits shifted so the largest is 0; every
filter keeps the most likely token. A row with no finite logit at all has no distribution and
raises. `SamplingParams` checks its values as float32 holds them (1e-300 is 0 there).

`SamplingParams` carries the settings under vLLM's field names; each request gets its own
`torch.Generator`, seeded from `seed` (or by the engine when `seed` is None), so a request's
tokens do not depend on what else is in the batch.

Beam search and contrastive search are decoding strategies of their own: they need the model's
logits (and, for contrastive search, hidden states) for several candidate continuations, so they
take a `forward` callable and are used one request at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

GREEDY_EPS = 1e-5  # temperatures below this are greedy (vLLM's _SAMPLING_EPS)
FLOAT32_MAX = torch.finfo(torch.float32).max
SEED_RANGE = (-2**63, 2**63 - 1)  # a torch.long, as vLLM checks it


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
    max_tokens: int = 16  # completion tokens at most
    ignore_eos: bool = False  # keep going past EOS (fixed output lengths for benchmarks); stop_token_ids still stop
    seed: int | None = None  # per-request generator seed; None: drawn from the engine's seeded generator
    stop_token_ids: list[int] = field(default_factory=list)  # extra stop tokens beside the engine's

    def __post_init__(self) -> None:
        """Each value checked as float32 holds it, so a value that passes cannot overflow or
        vanish in the arithmetic (top_p=1e-300 is 0 in float32: refused)."""
        t, p, m, r = (as_float32(v) for v in (self.temperature, self.top_p, self.min_p, self.repetition_penalty))
        checks = [
            ("temperature", 0 <= t <= 2, "must be in [0, 2]"),
            ("top_k", self.top_k >= -1, "must be >= 0 (0 or -1: off)"),
            ("top_p", 0 < p <= 1, "must be in (0, 1] (as float32)"),
            ("min_p", 0 <= m <= 1, "must be in [0, 1]"),
            ("repetition_penalty", 0 < r < float("inf"), "must be > 0 and finite (as float32)"),
            ("max_tokens", self.max_tokens >= 1, "must be >= 1"),
            ("seed", self.seed is None or SEED_RANGE[0] <= self.seed <= SEED_RANGE[1],
             f"must be in [{SEED_RANGE[0]}, {SEED_RANGE[1]}]"),
        ]
        for name, ok, why in checks:
            if not ok:
                raise InvalidParam(name, f"{name}={getattr(self, name)!r}: {why}")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_EPS

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


def process_logits(logits: torch.Tensor, params: SamplingParams, history: Sequence[int]) -> torch.Tensor:
    """All of a request's transforms, in the order above (temperature 0: only the penalty), on
    float32 logits made safe first: NaN is no token (-inf), +inf the largest float32. Raises
    ValueError when a row has no finite logit: no distribution to draw from."""
    logits = logits.float().nan_to_num(nan=-float("inf"), posinf=FLOAT32_MAX, neginf=-float("inf"))
    if not logits.amax(dim=-1).isfinite().all():
        raise ValueError("no token has a finite logit (the model's output is -inf or NaN everywhere)")
    logits = apply_repetition_penalty(logits, history, params.repetition_penalty)
    if params.greedy:
        return logits
    # shifted so the largest is 0: dividing by a small temperature can then only push the
    # others towards -inf (probability 0), never overflow to +inf
    logits = apply_temperature(logits - logits.amax(dim=-1, keepdim=True), params.temperature)
    logits = top_k_filter(logits, params.top_k)
    logits = top_p_filter(logits, params.top_p)
    return min_p_filter(logits, params.min_p)


def probabilities(logits: torch.Tensor, params: SamplingParams, history: Sequence[int]) -> torch.Tensor:
    """The distribution the next token is drawn from; greedy is the one-hot of the argmax.
    Speculative decoding compares these for the draft and the target."""
    logits = process_logits(logits, params, history)
    if params.greedy:
        return F.one_hot(logits.argmax(dim=-1), logits.size(-1)).float()
    return logits.softmax(dim=-1)


def sample(logits: torch.Tensor, params: SamplingParams, history: Sequence[int],
           generator: torch.Generator | None = None) -> int:
    """Draw the next token from one request's (V,) logits."""
    logits = process_logits(logits, params, history)
    if params.greedy:
        return int(logits.argmax())
    return int(torch.multinomial(logits.softmax(dim=-1), 1, generator=generator))


def sample_token(logits: torch.Tensor, vocab_size: int, temperature: float = 0.0, top_k: int | None = None,
                 top_p: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token id per row of logits (B, V), for batched decoding (`GPT.generate`, GRPO's
    rollouts): ids >= vocab_size are padding, never drawn; greedy at temperature 0, else the
    processors above (temperature -> top-k, None for all -> top-p). The draw runs over the
    probabilities sorted most likely first: the same distribution as `sample`'s draw in id order,
    and the same draws that GRPO's rollouts and eval's pass@k samples have always made."""
    logits = logits.float().clone()
    logits[:, vocab_size:] = -float("inf")
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    logits = top_p_filter(top_k_filter(apply_temperature(logits, temperature), top_k or 0), top_p)
    probs, order = logits.softmax(dim=-1).sort(dim=-1, descending=True)
    return order.gather(-1, torch.multinomial(probs, 1, generator=generator))[:, 0]


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Shannon entropy (nats) of softmax(logits), -inf logits counting as zero probability."""
    logp = logits.log_softmax(dim=-1)
    return -(logp.exp() * logp.nan_to_num(neginf=0.0)).sum(dim=-1)


# --- decoding strategies that look at several continuations ------------------------------------

# forward(idx (n, T)) -> (logits (n, T, V), hidden (n, T, C)) with padding ids already masked
Forward = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@torch.no_grad()
def beam_search(forward: Forward, prompt: list[int], beam_width: int, max_tokens: int,
                stop_token_ids: Sequence[int] = (), length_penalty: float = 1.0) -> list[int]:
    """The most likely completion found by keeping the `beam_width` best partial completions by
    summed log-probability. A beam that emits a stop token is finished; the best finished or
    unfinished beam wins by score / length ** length_penalty (HF's convention). Width 1 is greedy."""
    beams: list[tuple[list[int], float]] = [([], 0.0)]
    finished: list[tuple[list[int], float]] = []
    for _ in range(max_tokens):
        logp = forward(torch.tensor([prompt + b for b, _ in beams]))[0][:, -1].float().log_softmax(dim=-1)
        scores = torch.tensor([s for _, s in beams]).unsqueeze(1) + logp  # (beams, V)
        V = logp.size(-1)
        top = scores.flatten().topk(min(beam_width, scores.numel()))
        grown = [(beams[i // V][0] + [i % V], s) for s, i in zip(top.values.tolist(), top.indices.tolist())]
        finished += [(b, s) for b, s in grown if b[-1] in stop_token_ids]
        beams = [(b, s) for b, s in grown if b[-1] not in stop_token_ids]
        if not beams:
            break
    best = max(finished + beams, key=lambda bs: bs[1] / len(bs[0]) ** length_penalty)
    return best[0]


@torch.no_grad()
def contrastive_search(forward: Forward, prompt: list[int], top_k: int, alpha: float, max_tokens: int,
                       stop_token_ids: Sequence[int] = ()) -> list[int]:
    """Contrastive search (Su et al., 2022, https://arxiv.org/abs/2202.06417): among the top_k
    most likely next tokens pick argmax (1 - alpha) p(v) - alpha max_j cos(h_v, h_j), where h_v
    is the candidate's last hidden state and h_j those of the context: likely, yet unlike what
    came before (a degeneration penalty). alpha 0 (or top_k 1) is greedy."""
    out: list[int] = []
    for _ in range(max_tokens):
        ctx = torch.tensor([prompt + out])
        logits, hidden = forward(ctx)
        probs = logits[0, -1].float().softmax(dim=-1)
        cand_p, cand = probs.topk(top_k)
        # each candidate appended: its last hidden state against the context's
        h_cand = forward(torch.cat([ctx.expand(top_k, -1), cand.unsqueeze(1)], dim=1))[1][:, -1]  # (k, C)
        sim = F.cosine_similarity(h_cand.unsqueeze(1), hidden[0].unsqueeze(0), dim=-1).amax(dim=-1)  # (k,)
        out.append(int(cand[((1 - alpha) * cand_p - alpha * sim).argmax()]))
        if out[-1] in stop_token_ids:
            break
    return out
