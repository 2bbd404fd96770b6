"""Tasks: the conversations SFT trains on, the prompts and reference answers GRPO and eval score,
and each task's `reward(completion, answer)`. Shared by SFT, GRPO, eval and decontamination.

- arithmetic: generated problems ("What is 23 + 58?" -> "23 + 58 = 81"), seeded; a problem is
  held out (test) by a hash of its text, so train and test never share one.
- gsm8k: the bundled GSM8K jsonl (train / test); the answer is the number after "####".
- instruct: the bundled Self-Instruct tasks (instruction + input -> output); no reference answer.

`get_task(name, config)` builds one from the `tasks` config section (workflow/schemas/tasks.schema.yaml).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

from pipeline.tasks.answers import numeric_reward

SPLITS = ("train", "test")
# task name -> (module, class)
TASKS: dict[str, tuple[str, str]] = {
    "arithmetic": ("pipeline.tasks.arithmetic", "ArithmeticTask"),
    "gsm8k": ("pipeline.tasks.gsm8k", "GSM8KTask"),
    "instruct": ("pipeline.tasks.instruct", "InstructTask"),
}


@dataclass(frozen=True)
class Example:
    messages: list[dict]  # the whole conversation for SFT: [{"role": "user", ...}, {"role": "assistant", ...}]
    prompt: list[dict]    # the same without the final assistant turn (what GRPO/eval render with render_prompt)
    answer: str           # the reference answer for reward(); "" for tasks without one (instructions)


def qa_example(question: str, response: str, answer: str) -> Example:
    """A one-turn example: the user asks, the assistant responds."""
    prompt = [{"role": "user", "content": question}]
    return Example(messages=prompt + [{"role": "assistant", "content": response}], prompt=prompt, answer=answer)


class Task:
    """A task: `examples(split)` for split "train" or "test" (held out), and `reward`."""

    name: str

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config  # this task's part of the validated `tasks` section

    def examples(self, split: str) -> list[Example]:
        raise NotImplementedError

    def reward(self, completion: str, answer: str) -> float:
        """1.0 when the completion's number equals the reference answer, else 0.0 (see answers.py)."""
        return numeric_reward(completion, answer)


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}: expected one of {', '.join(SPLITS)}")


def held_out_items(task: Task, n: int) -> list[Example]:
    """The held-out items the eval stage scores a task on: the first n of its test split (fewer
    when the split is smaller). The serving canary scores the same ones."""
    return task.examples("test")[:n]


def get_task(name: str, config: dict[str, Any]) -> Task:
    """The task `name` configured by the `tasks` config section (validated here; defaults fill in)."""
    from pipeline.config import section_config

    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}: expected one of {', '.join(TASKS)}")
    module, cls = TASKS[name]
    return getattr(importlib.import_module(module), cls)(section_config("tasks", config)[name])
