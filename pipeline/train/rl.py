"""GRPO's pure pieces, read top to bottom: rollouts (group sampling by the inference engine,
log-probs of completions) -> rewards -> group-relative advantages -> the clipped policy loss and its
accumulation weight.

The objective is DeepSeekMath's GRPO (Shao et al., 2024, https://arxiv.org/abs/2402.03300) with
the later corrections as options: Dr. GRPO (Liu et al., 2025, https://arxiv.org/abs/2503.20783)
drops the std scaling of advantages and the per-completion length normalisation; DAPO (Yu et al.,
2025, https://arxiv.org/abs/2503.14476) normalises by the batch's token count and clips
asymmetrically (eps_low, eps_high). The KL penalty to a frozen reference is the k3 estimator
(Schulman, http://joschu.net/blog/kl-approx.html), as DeepSeekMath.

Shapes: a step has P prompts x G completions = B rows, consecutive rows sharing a prompt. Token
tensors (`logp`, `old_logp`, `ref_logp`, `mask`) are [B, T], T the longest completion in the
(micro) batch; `mask` is 1 on the completion tokens that count.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.inference import Engine, SamplingParams
from pipeline.model.gpt import GPT
from pipeline.tasks.answers import extract_answer

# --- rollouts ---------------------------------------------------------------------------------------

@dataclass
class Rollouts:
    """G sampled completions of each of P prompts, B = P x G rows, a prompt's rows consecutive."""
    prompts: list[list[int]]  # the P prompts' token ids (each ends with <|assistant_start|>)
    ids: torch.Tensor         # [B, L] completion ids; after the stop token, padding (the stop id)
    mask: torch.Tensor        # [B, L] bool: the sampled tokens, the stop token included
    truncated: torch.Tensor   # [B] bool: cut at max_completion_tokens without the stop token
    logprobs: torch.Tensor    # [B, L] float32: each sampled token's log-probability under the sampling model, 0 after

    @property
    def group_size(self) -> int:
        return self.ids.size(0) // len(self.prompts)


def sample_completions(model: GPT, prompts_ids: Sequence[Sequence[int]], group_size: int,
                       max_completion_tokens: int, temperature: float, top_k: int | None, top_p: float,
                       stop_token: int, seed: Sequence[int]) -> Rollouts:
    """G = group_size completions of each prompt from `model`, decoded together by the inference
    engine: all P x G requests in one continuous batch, each prompt's full KV blocks computed once
    and shared by its group (prefix caching). Completion j of prompt i draws with its own
    generator, seeded by (*seed, i, j), so the draws depend on the seed alone, not on the batch. A
    completion stops at `stop_token` (<|assistant_end|>, kept as its last token) or after
    max_completion_tokens tokens (truncated)."""
    L, seq_len = max_completion_tokens, model.config.seq_len
    for p, prompt in enumerate(prompts_ids):
        if not 0 < len(prompt) <= seq_len - L:
            raise ValueError(f"prompt {p}: {len(prompt)} tokens + max_completion_tokens {L} do not fit "
                             f"the model's context of {seq_len} tokens")
    n = len(prompts_ids) * group_size
    engine = Engine.for_prompts(model, prompts_ids, L, max_batch_size=n)
    params = [SamplingParams(temperature=temperature, top_k=top_k or 0, top_p=top_p, max_tokens=L,
                             stop_token_ids=[stop_token], seed=mixed_seed(*seed, i, j))
              for i in range(len(prompts_ids)) for j in range(group_size)]
    completions = engine.generate([p for p in prompts_ids for _ in range(group_size)], params)
    device = next(model.parameters()).device
    ids = torch.full((n, L), stop_token, dtype=torch.long, device=device)
    mask = torch.zeros_like(ids, dtype=torch.bool)
    logprobs = torch.zeros(n, L, device=device)
    for row, c in enumerate(completions):
        ids[row, :len(c.token_ids)] = torch.tensor(c.token_ids, device=device)
        mask[row, :len(c.token_ids)] = True
        logprobs[row, :len(c.token_ids)] = torch.tensor(c.logprobs, device=device)
    truncated = torch.tensor([c.finish_reason != "stop" for c in completions], device=device)
    return Rollouts(prompts=[list(p) for p in prompts_ids], ids=ids, mask=mask, truncated=truncated, logprobs=logprobs)


def mixed_seed(*keys: int) -> int:
    """A seed from a tuple of ints (SeedSequence mixes them: nearby tuples, unrelated streams)."""
    return int(np.random.SeedSequence(list(keys)).generate_state(1)[0])


def loss_mask(rollouts: Rollouts, mask_truncated: bool) -> torch.Tensor:
    """The completion tokens the loss counts [B, L]: all sampled ones, or with `mask_truncated`
    none of a completion cut at the length limit (DAPO's overlong filtering: a cut answer's
    reward says little about its tokens). Its reward still counts in its group's advantages."""
    return rollouts.mask & ~rollouts.truncated[:, None] if mask_truncated else rollouts.mask


def sequences(rollouts: Rollouts, rows: slice = slice(None)) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Model inputs for the completions in `rows`: idx [b, S] (prompt + completion but its last
    token, right-padded), targets [b, S] (the completion's tokens where they are predicted, -1
    elsewhere) and positions [b, L] (where completion token j is predicted: len(prompt) - 1 + j)."""
    G, L = rollouts.group_size, rollouts.ids.size(1)
    ids = rollouts.ids[rows]
    row_prompts = [rollouts.prompts[r // G] for r in range(rollouts.ids.size(0))][rows]
    lengths = torch.tensor([len(p) for p in row_prompts], device=ids.device)
    S = int(lengths.max()) + L - 1
    idx = torch.zeros(ids.size(0), S, dtype=torch.long, device=ids.device)
    positions = lengths[:, None] - 1 + torch.arange(L, device=ids.device)  # [b, L]
    for i, prompt in enumerate(row_prompts):
        idx[i, :len(prompt)] = torch.tensor(prompt, device=ids.device)
    idx.scatter_(1, positions[:, 1:], ids[:, :-1])  # token j of the completion sits at len(prompt) + j
    targets = torch.full_like(idx, -1)
    targets.scatter_(1, positions, torch.where(rollouts.mask[rows], ids, -1))
    return idx, targets, positions


def completion_logprobs(model: torch.nn.Module, idx: torch.Tensor, targets: torch.Tensor, positions: torch.Tensor,
                        with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log p(completion token j | prompt, tokens < j) under `model`, [b, L]: one forward over the
    whole sequences with per-token losses (loss_reduction="none"), read at the completion's
    positions (0 where masked). With `with_entropy`, also the model's entropy (nats) at each of
    those positions, over the real vocabulary; for logging, so without gradient."""
    logits, losses = model(idx, targets, loss_reduction="none")
    logp = -losses.gather(1, positions)
    if not with_entropy:
        return logp, None
    with torch.no_grad():
        at = logits.gather(1, positions[:, :, None].expand(-1, -1, logits.size(-1)))[..., :model.config.vocab_size]
        log_probs = F.log_softmax(at.float(), dim=-1)
        entropy = -(log_probs.exp() * log_probs).sum(dim=-1)
    return logp, entropy


# --- rewards ----------------------------------------------------------------------------------------

def format_reward(text: str, ended: bool) -> float:
    """1.0 when the completion closed its turn itself (sampled <|assistant_end|> before the length
    limit) and has an answer the verifiers can read (`extract_answer`: the number after "####",
    else the last number), else 0.0. It rewards the shape of an answer whatever its value, so
    early on, when few answers are right, groups still differ."""
    return float(ended and extract_answer(text) is not None)


def score_completions(task: Any, texts: Sequence[str], answers: Sequence[str], ended: Sequence[bool],
                      format_weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Rewards of B completions: the task's verifier `task.reward(text, answer)` plus
    `format_weight` x `format_reward`. Returns (rewards, task_rewards), both float32 [B]; the
    mean of task_rewards is the accuracy for a 0/1 verifier."""
    if not len(texts) == len(answers) == len(ended):
        raise ValueError(f"{len(texts)} completions, {len(answers)} answers, {len(ended)} ended flags")
    task_rewards = torch.tensor([float(task.reward(t, a)) for t, a in zip(texts, answers)], dtype=torch.float32)
    formats = torch.tensor([format_reward(t, e) for t, e in zip(texts, ended)], dtype=torch.float32)
    return task_rewards + format_weight * formats, task_rewards


# --- advantages -------------------------------------------------------------------------------------

SCALES = ("group", "batch", "none")
STD_EPS = 1e-4  # DeepSeekMath / TRL: keeps a group whose rewards are all equal at advantage 0


def _groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """rewards [P * G] -> [P, G], checked."""
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D (P * G values), got shape {tuple(rewards.shape)}")
    if group_size < 2 or rewards.numel() % group_size:
        raise ValueError(f"group_size {group_size} must be >= 2 and divide the {rewards.numel()} rewards")
    return rewards.float().view(-1, group_size)


def group_advantages(rewards: torch.Tensor, group_size: int, scale: str = "group") -> torch.Tensor:
    """Each completion's reward relative to its group (the G completions of one prompt).

    scale "group": (r - group mean) / (group std + 1e-4), GRPO; "none": r - group mean, Dr. GRPO
    (the std division up-weights prompts that are nearly always right or nearly always wrong);
    "batch": (r - group mean) / (std of the whole batch's rewards + 1e-4), as TRL's
    `scale_rewards="batch"`. The std is the sample std (Bessel-corrected), as TRL."""
    if scale not in SCALES:
        raise ValueError(f"scale {scale!r} is not one of {SCALES}")
    groups = _groups(rewards, group_size)
    # exactly 0 for a group of equal rewards: in float32 eight 0.3s have a mean 3e-8 off, which
    # the group scale's 1 / (0 + 1e-4) would blow up to a spurious advantage of 3e-4
    equal = groups.amax(dim=1, keepdim=True) == groups.amin(dim=1, keepdim=True)
    centred = torch.where(equal, 0.0, groups - groups.mean(dim=1, keepdim=True))
    if scale == "none":
        return centred.view(-1)
    std = groups.std(dim=1, keepdim=True) if scale == "group" else groups.std()
    return (centred / (std + STD_EPS)).view(-1)


def equal_reward_groups(rewards: torch.Tensor, group_size: int) -> int:
    """How many groups got the same reward on every completion: their advantages are all 0, so
    they teach nothing this step (DAPO's dynamic sampling would resample them; we count them)."""
    groups = _groups(rewards, group_size)
    return int((groups.amax(dim=1) == groups.amin(dim=1)).sum())


# --- the loss ---------------------------------------------------------------------------------------

LOSS_TYPES = ("grpo", "dr_grpo", "dapo")


def loss_weight(mask: torch.Tensor, loss_type: str, max_completion_tokens: int | None = None) -> float:
    """The denominator of `policy_loss` for this (micro) batch. Under gradient accumulation each
    micro batch contributes loss x weight and the gradient is divided by the weights' global
    sum, so the result equals one big batch's: dapo, masked tokens (DAPO's token-level mean over
    the global batch); grpo, completions with at least one masked token (each is one term of the
    mean over completions); dr_grpo, completions x max_completion_tokens (a constant per row)."""
    if loss_type == "dapo":
        return float(mask.sum())
    if loss_type == "grpo":
        return float((mask.sum(dim=1) > 0).sum())
    if loss_type == "dr_grpo":
        if max_completion_tokens is None:
            raise ValueError("loss_type 'dr_grpo' needs max_completion_tokens (its constant denominator)")
        return float(mask.size(0) * max_completion_tokens)
    raise ValueError(f"loss_type {loss_type!r} is not one of {LOSS_TYPES}")


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
                ref_logp: torch.Tensor | None = None, beta: float = 0.0, eps_low: float = 0.2,
                eps_high: float = 0.2, loss_type: str = "dapo",
                max_completion_tokens: int | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """The clipped surrogate loss (negative objective) of a (micro) batch, and its stats.

    Per token: ratio = exp(logp - old_logp); objective = min(ratio A, clip(ratio, 1 - eps_low,
    1 + eps_high) A), minus beta x k3 when beta > 0, k3 = exp(ref - logp) - (ref - logp) - 1 >= 0.
    Reduced by `loss_type` (see `loss_weight` for each denominator): grpo, mean over each
    completion's tokens then over completions; dr_grpo, sum / (B x max_completion_tokens); dapo,
    sum / masked tokens. Stats: `clip_frac` (masked tokens whose clipped term is the one taken,
    so they pass no gradient), `kl` (mean k3 over masked tokens; 0 without a reference),
    `tokens` (masked tokens) and `weight` (`loss_weight`)."""
    if logp.dim() != 2 or not logp.shape == old_logp.shape == mask.shape:
        raise ValueError(f"logp {tuple(logp.shape)}, old_logp {tuple(old_logp.shape)} and mask {tuple(mask.shape)} "
                         "must be the same [B, T]")
    if advantages.shape != logp.shape[:1]:
        raise ValueError(f"advantages {tuple(advantages.shape)} must be [B] = [{logp.size(0)}]")
    if beta > 0 and ref_logp is None:
        raise ValueError(f"beta = {beta} > 0 needs ref_logp (the frozen reference's log-probs)")
    if ref_logp is not None and ref_logp.shape != logp.shape:
        raise ValueError(f"ref_logp {tuple(ref_logp.shape)} must be [B, T] = {tuple(logp.shape)}")
    weight = loss_weight(mask, loss_type, max_completion_tokens)
    keep = mask.bool()
    tokens = keep.sum()

    def masked(x: torch.Tensor) -> torch.Tensor:
        # where, before exp(): a padding position may hold anything (an inf ratio), and both
        # inf * 0 and the gradient of exp() at inf are nan
        return torch.where(keep, x, torch.zeros_like(x))

    def token_mean(x: torch.Tensor) -> float:
        return float(masked(x).sum() / tokens.clamp(min=1))

    A = advantages.to(logp.dtype).unsqueeze(1)  # [B, 1]: one advantage for all of a completion's tokens
    ratio = torch.exp(masked(logp - old_logp))
    objective = torch.minimum(ratio * A, ratio.clamp(1 - eps_low, 1 + eps_high) * A)
    clipped = ((ratio < 1 - eps_low) & (A < 0)) | ((ratio > 1 + eps_high) & (A > 0))
    kl = 0.0
    if ref_logp is not None:
        log_ratio = masked(ref_logp - logp)
        k3 = torch.exp(log_ratio) - log_ratio - 1
        kl = token_mean(k3.detach())
        if beta > 0:
            objective = objective - beta * k3
    objective = masked(objective)
    if loss_type == "grpo":
        total = (objective.sum(dim=1) / keep.sum(dim=1).clamp(min=1)).sum()
    else:
        total = objective.sum()
    loss = -total / max(weight, 1.0)  # an all-masked batch: loss 0, weight 0
    stats = {"clip_frac": token_mean(clipped.to(logp.dtype)), "kl": kl, "tokens": float(tokens), "weight": weight}
    return loss, stats


# --- a step's micro batches and the engine's loss_fn ------------------------------------------------

def micro_batches(rollouts: Rollouts, mask: torch.Tensor, advantages: torch.Tensor, micro_batch: int,
                  ref_logp: torch.Tensor | None = None) -> list[dict[str, Any]]:
    """A step's rollouts as micro batches of `micro_batch` completions, each with its model
    inputs (see `sequences`), loss mask, advantages and, when there is a reference, ref_logp.
    `old_logp` is None until `set_old_logprobs` fills it (only needed for mu > 1)."""
    out = []
    for start in range(0, rollouts.ids.size(0), micro_batch):
        rows = slice(start, start + micro_batch)
        idx, targets, positions = sequences(rollouts, rows)
        out.append({"idx": idx, "targets": targets, "positions": positions, "mask": mask[rows],
                    "advantages": advantages[rows], "old_logp": None,
                    "ref_logp": None if ref_logp is None else ref_logp[rows]})
    return out


@torch.no_grad()
def batch_logprobs(model: torch.nn.Module, batches: Sequence[dict[str, Any]]) -> torch.Tensor:
    """log-probs [B, L] of every completion of `batches` under `model` (the frozen reference, or
    the policy before its mu updates)."""
    return torch.cat([completion_logprobs(model, b["idx"], b["targets"], b["positions"])[0] for b in batches])


def set_old_logprobs(model: torch.nn.Module, batches: list[dict[str, Any]]) -> None:
    """Fill each micro batch's old_logp from `model`, once, before mu > 1 updates on the same
    rollouts. With mu = 1 leave them None: the policy then is the one that sampled, and
    `PolicyLoss` uses the forward's own log-probs, detached (ratio exactly 1), saving a forward."""
    for b in batches:
        b["old_logp"] = batch_logprobs(model, [b])


class PolicyLoss:
    """The engine's `loss_fn(model, batch) -> (loss_sum, weight)` for GRPO: `policy_loss` of a
    micro batch times its `loss_weight`, so the engine's division by the global weight gives the
    whole batch's loss. Keeps token-weighted sums of clip fraction, KL and entropy for `stats()`."""

    def __init__(self, *, loss_type: str, eps_low: float, eps_high: float, beta: float,
                 max_completion_tokens: int) -> None:
        self.kw = dict(loss_type=loss_type, eps_low=eps_low, eps_high=eps_high, beta=beta,
                       max_completion_tokens=max_completion_tokens)
        self.sums = {"clip_frac": 0.0, "kl": 0.0, "entropy": 0.0, "tokens": 0.0}

    def __call__(self, model: torch.nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, float]:
        logp, entropy = completion_logprobs(model, batch["idx"], batch["targets"], batch["positions"],
                                            with_entropy=True)
        old = logp.detach() if batch["old_logp"] is None else batch["old_logp"]
        loss, stats = policy_loss(logp, old, batch["advantages"], batch["mask"], ref_logp=batch["ref_logp"],
                                  **self.kw)
        self.sums["clip_frac"] += stats["clip_frac"] * stats["tokens"]
        self.sums["kl"] += stats["kl"] * stats["tokens"]
        self.sums["entropy"] += float(entropy[batch["mask"]].sum())
        self.sums["tokens"] += stats["tokens"]
        return loss * stats["weight"], stats["weight"]

    def stats(self) -> dict[str, float]:
        """Token-weighted means since the last call (over every micro batch and update), then reset."""
        n = max(self.sums["tokens"], 1.0)
        out = {k: v / n for k, v in self.sums.items() if k != "tokens"}
        self.sums = dict.fromkeys(self.sums, 0.0)
        return out
