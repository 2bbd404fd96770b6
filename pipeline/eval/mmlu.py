"""MMLU (Hendrycks et al., 2021) in lm-evaluation-harness's prompt format, scored by log-likelihood.

The data is a folder, or a .tar.gz of one, read by `mmlu_data.read_split`.

The prompt is the harness's `mmlu` task (lm_eval/tasks/mmlu/default): a description line
"The following are multiple choice questions (with answers) about <subject>.\\n\\n", then for
k-shot the first k dev questions of the subject, each "<question>\\nA. ..\\nB. ..\\nC. ..\\nD. ..\\nAnswer: <letter>",
joined by blank lines, then the test question ending in "Answer:". The choices are " A" .. " D",
so acc_norm (per character) equals acc here; both are reported as the harness does. Chance: 0.25.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import torch

from pipeline.eval.mmlu_data import read_split
from pipeline.eval.multiple_choice import Question, evaluate
from pipeline.stats import proportion
from pipeline.tokenizer.bpe import BPETokenizer

LETTERS = ("A", "B", "C", "D")
CHANCE = 0.25


def format_question(item: dict, answer: bool = False) -> str:
    text = item["question"].strip() + "".join(f"\n{letter}. {choice}" for letter, choice in zip(LETTERS, item["choices"]))
    return text + "\nAnswer:" + (f" {LETTERS[item['answer']]}" if answer else "")


def prompt(subject: str, item: dict, shots: list[dict]) -> str:
    description = f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
    return description + "".join(format_question(s, answer=True) + "\n\n" for s in shots) + format_question(item)


def select(test: dict[str, list[dict]], max_questions: int | None) -> list[tuple[str, int]]:
    """(subject, index) of the test questions to score, sorted: the first max_questions taken round
    robin over subjects, so a small default still spans every subject; None takes all."""
    order = [(s, i) for i in range(max(map(len, test.values()))) for s in test if i < len(test[s])]
    return sorted(order[:max_questions] if max_questions is not None else order)


def questions(path: str | Path, shots: int, max_questions: int | None) -> list[Question]:
    """The selected test questions as Questions with their k-shot prompts."""
    test, dev = read_split(path, "test"), read_split(path, "dev") if shots else {}
    if shots and (short := [s for s in test if len(dev.get(s, [])) < shots]):
        raise ValueError(f"{path}: {shots}-shot needs {shots} dev questions for {short[0]} (has {len(dev.get(short[0], []))})")
    return [Question(prompt(s, test[s][i], dev.get(s, [])[:shots]), [f" {letter}" for letter in LETTERS],
                     test[s][i]["answer"], group=s) for s, i in select(test, max_questions)]


def summarize(results: list[dict]) -> dict:
    """Overall (over questions) and per-subject acc and acc_norm, each with its Wilson 95%
    interval, and the chance level."""
    by_subject: dict[str, list[dict]] = defaultdict(list)
    for r in results:
        by_subject[r["group"]].append(r)

    def accuracy(rs: list[dict], key: str) -> dict:
        return proportion(round(sum(r[key] for r in rs)), len(rs))

    return {"acc": accuracy(results, "acc"), "acc_norm": accuracy(results, "acc_norm"), "n": len(results),
            "chance": CHANCE,
            "subjects": {s: {"acc": accuracy(rs, "acc"), "acc_norm": accuracy(rs, "acc_norm"), "n": len(rs)}
                         for s, rs in sorted(by_subject.items())}}


def evaluate_mmlu(model: torch.nn.Module, tokenizer: BPETokenizer, path: str | Path, *, shots: int,
                  max_questions: int | None, batch_size: int = 16) -> tuple[dict, list[dict]]:
    """The summary (`summarize`) and each question's result (acc, acc_norm: 1.0 or 0.0), in order."""
    results = evaluate(model, tokenizer, questions(path, shots, max_questions), batch_size, desc=f"mmlu {shots}-shot")
    return summarize(results), results
