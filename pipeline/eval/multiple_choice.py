"""Multiple-choice scoring by log-likelihood, in the manner of lm-evaluation-harness.

Each choice is scored by the summed log-probability of its tokens after the context. The split is
the harness's (`lm_eval.api.model.TemplateLM._encode_pair`): trailing whitespace of the context
moves to the choice, then whole = encode(context + choice), and the choice's tokens are
whole[len(encode(context)):], so a choice that merges with the end of the context is scored on
the tokens the model would really see. An empty context starts from <|endoftext|>, as the
harness does. Inputs longer than the model's context keep their last tokens.

acc picks the choice with the highest sum; acc_norm the highest sum / character length of the
choice, which stops long answers losing only because they have more tokens to pay for.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm import tqdm

from pipeline.eval.loss import token_logprobs
from pipeline.tokenizer.bpe import BPETokenizer


@dataclass(frozen=True)
class Question:
    context: str
    choices: list[str]
    answer: int  # index of the right choice
    group: str = ""  # e.g. the MMLU subject


def encode_pair(tokenizer: BPETokenizer, context: str, choice: str) -> tuple[list[int], list[int]]:
    """(context ids, choice ids) split as the harness splits them (see the module docstring)."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, choice = context[:-n_spaces], context[-n_spaces:] + choice
    whole = tokenizer.encode(context + choice)
    context_ids = tokenizer.encode(context) if context else [tokenizer.eos_id]
    return context_ids, whole[len(context_ids):] if context else whole


@torch.no_grad()
def score(model: torch.nn.Module, pairs: list[tuple[list[int], list[int]]], batch_size: int = 16,
          desc: str = "loglikelihood") -> list[float]:
    """Summed log p(choice ids | context ids) of every pair, batched (right-padded), with a
    progress bar. Longest first, so the padding per batch is small (the harness sorts too)."""
    seq_len, vocab_size = model.config.seq_len, model.config.vocab_size
    rows = [(context_ids + choice_ids)[-(seq_len + 1):] for context_ids, choice_ids in pairs]
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
    out = [0.0] * len(rows)
    for first in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch", disable=None):
        chunk = order[first:first + batch_size]
        width = len(rows[chunk[0]]) - 1
        x = torch.zeros(len(chunk), width, dtype=torch.long)
        y = torch.full((len(chunk), width), -1, dtype=torch.long)
        for r, i in enumerate(chunk):
            ids, n = rows[i], min(len(pairs[i][1]), len(rows[i]) - 1)
            x[r, :len(ids) - 1] = torch.tensor(ids[:-1])
            if n:  # position t predicts ids[t + 1]: the choice's n tokens end the row
                y[r, len(ids) - 1 - n:len(ids) - 1] = torch.tensor(ids[-n:])
        logp = token_logprobs(model(x), y, vocab_size)
        for r, i in enumerate(chunk):
            out[i] = logp[r].double().sum().item()
    return out


def loglikelihoods(model: torch.nn.Module, tokenizer: BPETokenizer, context: str, choices: list[str]) -> list[float]:
    """The summed log-probability of each choice's tokens given the context."""
    return score(model, [encode_pair(tokenizer, context, choice) for choice in choices])


def pick(sums: list[float], choices: list[str]) -> tuple[int, int]:
    """(acc's choice, acc_norm's choice): argmax of the sums, and of sum / character length."""
    acc = max(range(len(sums)), key=lambda i: sums[i])
    norm = max(range(len(sums)), key=lambda i: sums[i] / max(1, len(choices[i])))
    return acc, norm


def evaluate(model: torch.nn.Module, tokenizer: BPETokenizer, questions: list[Question],
             batch_size: int = 16, desc: str = "multiple choice") -> list[dict]:
    """Score every choice of every question in one batched pass; per question: the sums and
    whether acc and acc_norm picked the answer."""
    pairs = [encode_pair(tokenizer, q.context, c) for q in questions for c in q.choices]
    sums = score(model, pairs, batch_size, desc)
    results, at = [], 0
    for q in questions:
        q_sums, at = sums[at:at + len(q.choices)], at + len(q.choices)
        acc, norm = pick(q_sums, q.choices)
        results.append({"group": q.group, "sums": q_sums, "acc": float(acc == q.answer),
                        "acc_norm": float(norm == q.answer)})
    return results
