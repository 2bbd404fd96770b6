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
    progress bar. Pairs whose model inputs are the same (one-token choices after one context, as
    MMLU's " A".." D") share one forward, as the harness's request grouping does. Longest first,
    so the padding per batch is small (the harness sorts too)."""
    seq_len, vocab_size = model.config.seq_len, model.config.vocab_size
    rows = [(context_ids + choice_ids)[-(seq_len + 1):] for context_ids, choice_ids in pairs]
    readers: dict[tuple[int, ...], list[int]] = {}  # model input -> the pairs that read its output
    for i, ids in enumerate(rows):
        readers.setdefault(tuple(ids[:-1]), []).append(i)
    inputs = sorted(readers, key=len, reverse=True)
    out = [0.0] * len(rows)
    for first in tqdm(range(0, len(inputs), batch_size), desc=desc, unit="batch", disable=None):
        chunk = inputs[first:first + batch_size]
        x = torch.zeros(len(chunk), len(chunk[0]), dtype=torch.long)
        for r, ids in enumerate(chunk):
            x[r, :len(ids)] = torch.tensor(ids)
        logits = model(x)
        for r, ids in enumerate(chunk):
            for i in readers[ids]:
                n = min(len(pairs[i][1]), len(rows[i]) - 1)
                if n:  # position t predicts rows[i][t + 1]: the choice's n tokens end the row
                    targets = torch.tensor([rows[i][-n:]])
                    out[i] = token_logprobs(logits[r:r + 1, len(ids) - n:len(ids)], targets,
                                            vocab_size).double().sum().item()
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
