"""gsm8k: grade-school math word problems from the bundled GSM8K jsonl (resources/gsm8k/).

Each line is {"question", "answer"}; the answer is a worked solution ending "#### <number>". The
SFT conversation is question -> solution; the reference answer is the number after "####",
normalised (thousands commas removed: "#### 1,080" -> "1080"). GSM8K's calculator annotations
(`48/2 = <<48/2=24>>24`) are removed from the solution: they are calls to a calculator tool we do
not run, so keeping them would only teach the model to write every result twice. The model is
taught to end with "#### <number>", which is what the reward reads first.
"""

from __future__ import annotations

import re
from typing import Any

from pipeline.config import workflow_path
from pipeline.records import read_jsonl
from pipeline.tasks import Example, Task, check_split, qa_example
from pipeline.tasks.answers import NUMBER, normalise

ANNOTATION = re.compile(r"<<[^<>]*>>")


def parse_record(record: dict[str, Any], where: str) -> Example:
    """One GSM8K line as an Example; a malformed one stops with an error naming `where`."""
    question, solution = record.get("question"), record.get("answer")
    if not (isinstance(question, str) and question.strip() and isinstance(solution, str)):
        raise ValueError(f"{where}: needs non-empty string fields 'question' and 'answer'")
    if "####" not in solution:
        raise ValueError(f"{where}: the answer has no '#### <number>' line")
    answer = normalise(solution.rsplit("####", 1)[1])
    if not NUMBER.fullmatch(answer):
        raise ValueError(f"{where}: the final answer {answer!r} is not a number")
    return qa_example(question.strip(), ANNOTATION.sub("", solution).strip(), answer)


class GSM8KTask(Task):
    name = "gsm8k"

    def examples(self, split: str) -> list[Example]:
        check_split(split)
        return [parse_record(record, where) for _, where, record in read_jsonl(workflow_path(self.config[split]))]
