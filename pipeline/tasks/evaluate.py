"""Greedy task accuracy: held-out prompts answered greedily, each answer scored by the task's reward.

Shared by SFT (the held-out accuracy in its manifest), GRPO and eval. A prompt is rendered with the
chat template (`render_prompt`, ending with <|assistant_start|>) and completed greedily on the KV
cache until <|assistant_end|> or max_new_tokens; the completion is the text before the stop token,
and it is right when `task.reward(completion, answer)` is positive.

The model reads no padding mask, so a batch holds prompts of one length only: each row then sees
exactly what it would alone, and batching changes nothing but the speed (tested against one
prompt at a time).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import torch
from tqdm import tqdm

from pipeline.tasks import Example, Task
from pipeline.tokenizer.bpe import ASSISTANT_END, BPETokenizer
from pipeline.tokenizer.chat import render_prompt


@torch.no_grad()
def greedy_complete(model: torch.nn.Module, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, stop_id: int,
                    batch_size: int = 64, desc: str | None = None) -> list[list[int]]:
    """The greedy completion of each prompt (token ids, cut before stop_id), in the prompts' order.
    Prompts of one length are completed together, batch_size at a time."""
    device = next(model.parameters()).device
    by_length: dict[int, list[int]] = defaultdict(list)
    for i, prompt in enumerate(prompts):
        by_length[len(prompt)].append(i)
    chunks = [rows[s:s + batch_size] for _, rows in sorted(by_length.items()) for s in range(0, len(rows), batch_size)]
    out: list[list[int]] = [[] for _ in prompts]
    for chunk in tqdm(chunks, desc=desc or "greedy completions", unit="batch", disable=None):
        idx = torch.tensor([list(prompts[i]) for i in chunk], dtype=torch.long, device=device)
        new = model.generate(idx, max_new_tokens, stop_tokens=[stop_id])[:, idx.size(1):].tolist()
        for i, row in zip(chunk, new):
            out[i] = row[:row.index(stop_id)] if stop_id in row else row
    return out


def greedy_accuracy(model: torch.nn.Module, tokenizer: BPETokenizer, task: Task, examples: Sequence[Example], *,
                    max_new_tokens: int, batch_size: int = 64) -> dict[str, Any]:
    """Greedy exact-answer accuracy of `model` on `examples` of `task`: {"accuracy", "correct",
    "n", "answers": [{"question", "answer", "completion", "correct"}, ...]}."""
    if not examples:
        raise ValueError(f"task {task.name}: no examples to score")
    was_training = model.training
    model.eval()
    prompts = [render_prompt(tokenizer, e.prompt) for e in examples]
    completions = greedy_complete(model, prompts, max_new_tokens=max_new_tokens,
                                  stop_id=tokenizer.special_tokens[ASSISTANT_END], batch_size=batch_size,
                                  desc=f"{task.name} accuracy")
    model.train(was_training)
    answers = []
    for example, ids in zip(examples, completions):
        text = tokenizer.decode(ids)
        answers.append({"question": example.prompt[-1]["content"], "answer": example.answer, "completion": text,
                        "correct": task.reward(text, example.answer) > 0})
    correct = sum(a["correct"] for a in answers)
    return {"accuracy": correct / len(answers), "correct": correct, "n": len(answers), "answers": answers}
