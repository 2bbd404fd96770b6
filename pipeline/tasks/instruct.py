"""instruct: the bundled Self-Instruct tasks as SFT conversations (resources/instruct/).

Each record has an `instruction` and `instances` of {input, output}; each instance becomes a
conversation: the user gives the instruction, then a blank line and the input when there is one;
the assistant gives the output. A record is held out (test, for samples) when a hash of its `id`
falls under `test_fraction`. There is no reference answer (`answer` is ""), so no verifier:
`reward` raises rather than return a meaningless 0.
"""

from __future__ import annotations

from typing import Any

from pipeline.config import workflow_path
from pipeline.records import read_jsonl, unit_hash
from pipeline.tasks import Example, Task, check_split, qa_example


def parse_record(record: dict[str, Any], where: str) -> list[Example]:
    """The conversations of one Self-Instruct record; a malformed one stops naming `where`."""
    instruction, instances = record.get("instruction"), record.get("instances")
    if not (isinstance(instruction, str) and instruction.strip() and isinstance(instances, list) and instances):
        raise ValueError(f"{where}: needs a non-empty string 'instruction' and a non-empty list 'instances'")
    examples = []
    for k, instance in enumerate(instances):
        text, output = (instance.get("input"), instance.get("output")) if isinstance(instance, dict) else (None, None)
        if not (isinstance(text, str) and isinstance(output, str) and output.strip()):
            raise ValueError(f"{where}: instances[{k}] needs a string 'input' and a non-empty string 'output'")
        question = instruction.strip() + ("\n\n" + text.strip() if text.strip() else "")
        examples.append(qa_example(question, output.strip(), ""))
    return examples


class InstructTask(Task):
    name = "instruct"

    def examples(self, split: str) -> list[Example]:
        check_split(split)
        out = []
        for path in self.config["paths"]:
            for _, where, record in read_jsonl(workflow_path(path)):
                if not isinstance(record.get("id"), str):
                    raise ValueError(f"{where}: needs a string 'id'")
                if (unit_hash(f"instruct#{record['id']}") < self.config["test_fraction"]) == (split == "test"):
                    out += parse_record(record, where)
        return out

    def reward(self, completion: str, answer: str) -> float:
        raise ValueError("the instruct task has no reference answers, so no reward: use it for SFT and samples")
