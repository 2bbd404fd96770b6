"""Task accuracy: greedy pass@1 and sampled pass@k on a task's fixed held-out items.

Each example's prompt is rendered with the chat template (`render_prompt`, ending in
<|assistant_start|>), the model completes it until <|assistant_end|> (or max_new_tokens), and the
task's `reward(completion, answer)` says whether it is right (reward > 0). pass@1 is greedy: one
completion at temperature 0. pass@k draws n >= k samples per example and uses the unbiased
estimator of Chen et al. (2021, "Evaluating Large Language Models Trained on Code", eq. 1):
pass@k = 1 - C(n - c, k) / C(n, k) for c correct of n, averaged over examples; drawing exactly k
and asking "any right?" would be the same in expectation but noisier.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from pipeline.inference import Engine, SamplingParams
from pipeline.stats import bootstrap_ratio
from pipeline.tasks import Task, held_out_items
from pipeline.tasks.evaluate import fit_context, held_out_accuracy
from pipeline.tokenizer.bpe import ASSISTANT_END, BPETokenizer
from pipeline.tokenizer.chat import render_prompt


def pass_at_k(n: int, c: int, k: int) -> float:
    """1 - C(n - c, k) / C(n, k): the chance that k of the n samples, drawn without replacement,
    hold at least one of the c correct ones."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def complete(model: torch.nn.Module, prompts: list[list[int]], n: int, *, temperature: float, max_new_tokens: int,
             stop_id: int, seed: int) -> list[list[list[int]]]:
    """n sampled completions of each prompt, each cut before the first stop_id, decoded together by
    the inference engine; each request's generator is seeded in turn from `seed`."""
    params = SamplingParams(temperature=temperature, max_tokens=max_new_tokens, stop_token_ids=[stop_id])
    prompts = fit_context(prompts, model.config.seq_len, max_new_tokens)
    engine = Engine.for_prompts(model, prompts, max_new_tokens, max_batch_size=64, seed=seed)
    out = engine.generate([p for p in prompts for _ in range(n)], params, desc=f"{n} samples per prompt")
    return [[c.ids_before_stop for c in out[i * n:(i + 1) * n]] for i in range(len(prompts))]


def task_accuracy(model: torch.nn.Module, tokenizer: BPETokenizer, task: Task, *, max_examples: int | None,
                  sample_items: int | None, samples: int, k: int, temperature: float,
                  seed: int) -> tuple[dict[str, Any], dict[str, list]]:
    """Greedy pass@1 (`held_out_accuracy`, what SFT and GRPO report) on the task's fixed held-out
    items (the first max_examples; all when None) and sampled pass@k (n = samples) on the first
    sample_items of them (all when None). Returns the result (pass@1 with its Wilson interval,
    pass@k with its bootstrap interval over items) and the per-item scores the paired comparisons
    read: {"correct": 0/1, "pass@k": per sampled item}."""
    if not 1 <= k <= samples:
        raise ValueError(f"eval.tasks: k {k} must be between 1 and samples {samples}")
    greedy = held_out_accuracy(model, tokenizer, task, max_examples)
    items = held_out_items(task, max_examples)[:sample_items]
    draws = complete(model, [render_prompt(tokenizer, e.prompt) for e in items], samples, temperature=temperature,
                     max_new_tokens=task.config["held_out"]["max_new_tokens"],
                     stop_id=tokenizer.special_tokens[ASSISTANT_END], seed=seed)
    sampled = [pass_at_k(samples, sum(task.reward(tokenizer.decode(d), e.answer) > 0 for d in ds), k)
               for e, ds in zip(items, draws)]
    shown = [{"answer": a["answer"], "greedy": a["completion"]} for a in greedy["answers"][:3]]
    result = {"pass@1": greedy["accuracy"], "pass@k": bootstrap_ratio(sampled), "n": greedy["accuracy"]["n"],
              "samples": samples, "k": k, "examples": shown}
    return result, {"correct": greedy["correct"], "pass@k": sampled}
