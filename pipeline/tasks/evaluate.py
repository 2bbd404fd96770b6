"""Greedy task accuracy: held-out prompts answered greedily, each answer scored by the task's reward.

Shared by SFT (the held-out accuracy in its manifest), GRPO and eval: `held_out_accuracy` scores a
task's fixed held-out items (`pipeline.tasks.held_out_items`) with the task's one token budget, so
the three report the same number for the same model. A prompt is rendered with the chat template
(`render_prompt`, ending with <|assistant_start|>) and completed greedily by the inference engine
until <|assistant_end|> or max_new_tokens; the completion is the text before the stop token, and it
is right when `task.reward(completion, answer)` is positive. The engine decodes prompts of any
lengths together, and each prompt's tokens are those it would get alone (tested). A prompt too
long for the context keeps its last tokens (`fit_context`, logged).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch

from pipeline.inference import Engine, SamplingParams
from pipeline.stats import compare_correct, fmt, proportion
from pipeline.tasks import Example, Task, held_out_items
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


def held_out_accuracy(model: torch.nn.Module, tokenizer: BPETokenizer, task: Task, n: int | None = None, *,
                      batch_size: int = 64) -> dict[str, Any]:
    """Greedy accuracy on the task's fixed held-out items (the first n of them; all by default),
    answers up to `tasks.<name>.held_out.max_new_tokens`: {"accuracy": the proportion with its
    Wilson interval, "correct": 0/1 per item in the list's order (for paired comparisons),
    "answers": as `greedy_accuracy`}."""
    scored = greedy_accuracy(model, tokenizer, task, held_out_items(task, n),
                             max_new_tokens=task.config["held_out"]["max_new_tokens"], batch_size=batch_size)
    return {"accuracy": proportion(scored["correct"], scored["n"]),
            "correct": [int(a["correct"]) for a in scored["answers"]], "answers": scored["answers"]}


def held_out_metrics(task: str, stage: str, before: dict[str, Any], after: dict[str, Any],
                     record: dict[str, Any]) -> dict[str, Any]:
    """A training stage's held-out accuracy for its manifest, from `held_out_accuracy` of the model
    it started from (`before`) and the one it made (`after`): `<task>_accuracy_input`,
    `<task>_accuracy`, their paired comparison `<task>_comparison` (exact McNemar) and the items
    (`<task>_held_out`, `held_out_record`)."""
    return {f"{task}_accuracy_input": before["accuracy"], f"{task}_accuracy": after["accuracy"],
            f"{task}_comparison": compare_correct("input", before["correct"], stage, after["correct"]),
            f"{task}_held_out": record}


def held_out_sentence(task: str, before: str, after: str, metrics: dict[str, Any]) -> str:
    """One sentence of `held_out_metrics` for samples.md."""
    c = metrics[f"{task}_comparison"]
    return (f"Held-out {task} accuracy (greedy, exact answer, {c['n']} fixed items, 95% intervals): {before} "
            f"{fmt(metrics[f'{task}_accuracy_input'], 1, 100)}%, {after} {fmt(metrics[f'{task}_accuracy'], 1, 100)}%; "
            f"difference {100 * c['diff']:+.1f} points [{100 * c['ci95'][0]:+.1f}, {100 * c['ci95'][1]:+.1f}], "
            f"exact McNemar p = {c['p_value']:.2g}.")
