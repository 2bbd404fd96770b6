"""Greedy task accuracy: held-out prompts answered greedily, each answer scored by the task's reward.

Shared by SFT (the held-out accuracy in its manifest), GRPO and eval. A prompt is rendered with the
chat template (`render_prompt`, ending with <|assistant_start|>) and completed greedily by the
inference engine until <|assistant_end|> or max_new_tokens; the completion is the text before the
stop token, and it is right when `task.reward(completion, answer)` is positive. The engine decodes
prompts of any lengths together, and each prompt's tokens are those it would get alone (tested).
A prompt too long for the context keeps its last tokens (`fit_context`, logged).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch

from pipeline.inference import Engine, SamplingParams
from pipeline.tasks import Example, Task
from pipeline.tokenizer.bpe import ASSISTANT_END, BPETokenizer
from pipeline.tokenizer.chat import render_prompt

log = logging.getLogger(__name__)


def fit_context(prompts: Sequence[Sequence[int]], seq_len: int, max_new_tokens: int) -> list[list[int]]:
    """The prompts, each longer than the context leaves room for (max_new_tokens answer tokens,
    at least one) cut to its last tokens, as a sliding window would read it; logged, not silent."""
    keep = max(1, seq_len - max_new_tokens)
    cut = sum(len(p) > keep for p in prompts)
    if cut:
        log.warning("%d of %d prompts longer than the %d tokens the context of %d leaves them: each keeps its last %d",
                    cut, len(prompts), keep, seq_len, keep)
    return [list(p[-keep:]) for p in prompts]


def greedy_complete(model: torch.nn.Module, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, stop_id: int,
                    batch_size: int = 64, desc: str | None = None) -> list[list[int]]:
    """The greedy completion of each prompt (token ids, cut before stop_id), in the prompts' order,
    batch_size decoded at a time."""
    params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens, stop_token_ids=[stop_id])
    prompts = fit_context(prompts, model.config.seq_len, max_new_tokens)
    engine = Engine.for_prompts(model, prompts, max_new_tokens, max_batch_size=batch_size)
    completions = engine.generate(prompts, params, desc=desc or "greedy completions")
    return [c.ids_before_stop for c in completions]


def greedy_accuracy(model: torch.nn.Module, tokenizer: BPETokenizer, task: Task, examples: Sequence[Example], *,
                    max_new_tokens: int, batch_size: int = 64) -> dict[str, Any]:
    """Greedy exact-answer accuracy of `model` on `examples` of `task`: {"accuracy", "correct",
    "n", "answers": [{"question", "answer", "completion", "correct"}, ...]}."""
    if not examples:
        raise ValueError(f"task {task.name}: no examples to score")
    prompts = [render_prompt(tokenizer, e.prompt) for e in examples]
    completions = greedy_complete(model, prompts, max_new_tokens=max_new_tokens,
                                  stop_id=tokenizer.special_tokens[ASSISTANT_END], batch_size=batch_size,
                                  desc=f"{task.name} accuracy")
    answers = []
    for example, ids in zip(examples, completions):
        text = tokenizer.decode(ids)
        answers.append({"question": example.prompt[-1]["content"], "answer": example.answer, "completion": text,
                        "correct": task.reward(text, example.answer) > 0})
    correct = sum(a["correct"] for a in answers)
    return {"accuracy": correct / len(answers), "correct": correct, "n": len(answers), "answers": answers}
