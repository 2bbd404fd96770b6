"""Tasks: the conversations SFT trains on, the prompts and reference answers GRPO and eval score,
and each task's `reward(completion, answer)`. Shared by SFT, GRPO, eval and decontamination.

- arithmetic: generated problems ("What is 23 + 58?" -> "23 + 58 = 81"), seeded; a problem is
  held out (test) by a hash of its text, so train and test never share one.
- gsm8k: the bundled GSM8K jsonl (train / test); the answer is the number after "####".
- instruct: the bundled Self-Instruct tasks (instruction + input -> output); no reference answer.

`get_task(name, config)` builds one from the `tasks` config section (workflow/schemas/tasks.schema.yaml).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import random
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


def held_out_items(task: Task, n: int | None = None) -> list[Example]:
    """The fixed held-out items of `task`: a seeded shuffle of its test split, the first
    `tasks.<name>.held_out.items` of it (all of it when null). Every stage that scores the task (SFT's and GRPO's held-out
    accuracy, eval, the serving canary) takes them from here, so all report the same number for
    the same model; n takes the first n of the list (a quicker check, still a random sample)."""
    spec = task.config.get("held_out")
    if spec is None:
        raise ValueError(f"task {task.name} has no verifier, so no held-out items to score")
    test = task.examples("test")
    items = len(test) if spec["items"] is None else spec["items"]
    if len(test) < items:
        raise ValueError(f"config key 'tasks.{task.name}.held_out.items': {items} items asked, but the "
                         f"test split has {len(test)}")
    if n is not None and not 1 <= n <= items:
        raise ValueError(f"task {task.name}: {n} held-out items asked, the list has {items} "
                         f"(tasks.{task.name}.held_out.items)")
    order = list(range(len(test)))
    random.Random(f"{spec['seed']}#{task.name}#held_out").shuffle(order)  # str seeds hash with sha512: stable
    return [test[i] for i in order[:items if n is None else n]]


def held_out_record(task: Task, n: int | None = None) -> dict[str, Any]:
    """What identifies the held-out items in a manifest: count, seed, token budget and the sha256
    of the items (question and reference answer, in order)."""
    items = held_out_items(task, n)
    digest = hashlib.sha256(json.dumps([[e.prompt, e.answer] for e in items], sort_keys=True).encode()).hexdigest()
    spec = task.config["held_out"]
    return {"task": task.name, "items": len(items), "seed": spec["seed"], "max_new_tokens": spec["max_new_tokens"],
            "sha256": digest}


def get_task(name: str, config: dict[str, Any]) -> Task:
    """The task `name` configured by the `tasks` config section (validated here; defaults fill in)."""
    from pipeline.config import section_config

    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}: expected one of {', '.join(TASKS)}")
    module, cls = TASKS[name]
    return getattr(importlib.import_module(module), cls)(section_config("tasks", config)[name])
