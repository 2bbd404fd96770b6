"""MMLU (Hendrycks et al., 2021) in lm-evaluation-harness's prompt format, scored by log-likelihood.

The data is a folder, or a .tar.gz of one, holding `[mmlu/]dev/<subject>_dev.csv` and
`[mmlu/]test/<subject>_test.csv`, each with a header `question,choice0,choice1,choice2,choice3,answer`
and the answer as an index 0-3 (the layout of ../shared/data/eval/mmlu.tar.gz; resources/mmlu/
bundles the dev split and a few subjects' test questions, see its PROVENANCE.md).

The prompt is the harness's `mmlu` task (lm_eval/tasks/mmlu/default): a description line
"The following are multiple choice questions (with answers) about <subject>.\\n\\n", then for
k-shot the first k dev questions of the subject, each "<question>\\nA. ..\\nB. ..\\nC. ..\\nD. ..\\nAnswer: <letter>",
joined by blank lines, then the test question ending in "Answer:". The choices are " A" .. " D",
so acc_norm (per character) equals acc here; both are reported as the harness does. Chance: 0.25.
"""

from __future__ import annotations

import csv
import io
import tarfile
from collections import defaultdict
from pathlib import Path

import torch

from pipeline.eval.multiple_choice import Question, evaluate
from pipeline.tokenizer.bpe import BPETokenizer

LETTERS = ("A", "B", "C", "D")
CHANCE = 0.25


def read_split(path: str | Path, split: str) -> dict[str, list[dict]]:
    """{subject: [{question, choices, answer}]} of one split ("dev" or "test"), subjects sorted."""
    path = Path(path)
    files: dict[str, str] = {}
    if path.is_dir():
        for f in sorted(path.glob(f"**/{split}/*_{split}.csv")):
            files[f.name] = f.read_text(encoding="utf-8")
    elif path.is_file() and path.name.endswith((".tar.gz", ".tgz")):
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                name = member.name.rsplit("/", 2)
                if member.isfile() and len(name) >= 2 and name[-2] == split and name[-1].endswith(f"_{split}.csv"):
                    files[name[-1]] = tar.extractfile(member).read().decode("utf-8")
    else:
        raise ValueError(f"{path}: not an MMLU folder or .tar.gz")
    if not files:
        raise ValueError(f"{path}: no {split}/<subject>_{split}.csv files")
    subjects: dict[str, list[dict]] = {}
    for name in sorted(files):
        subject = name.removesuffix(f"_{split}.csv")
        rows = list(csv.reader(io.StringIO(files[name])))
        if rows[0] != ["question", "choice0", "choice1", "choice2", "choice3", "answer"]:
            raise ValueError(f"{path}: {name} has header {rows[0]}, not question,choice0..choice3,answer")
        items = []
        for n, row in enumerate(rows[1:], start=2):
            if len(row) != 6 or row[5] not in ("0", "1", "2", "3"):
                raise ValueError(f"{path}: {name} line {n}: expected 6 fields with an answer 0-3, got {row[:1]}...")
            items.append({"question": row[0], "choices": row[1:5], "answer": int(row[5])})
        subjects[subject] = items
    return subjects


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
    """Overall (over questions) and per-subject acc and acc_norm, with the chance level."""
    by_subject: dict[str, list[dict]] = defaultdict(list)
    for r in results:
        by_subject[r["group"]].append(r)

    def mean(rs: list[dict], key: str) -> float:
        return sum(r[key] for r in rs) / len(rs)

    return {"acc": mean(results, "acc"), "acc_norm": mean(results, "acc_norm"), "n": len(results), "chance": CHANCE,
            "subjects": {s: {"acc": mean(rs, "acc"), "acc_norm": mean(rs, "acc_norm"), "n": len(rs)}
                         for s, rs in sorted(by_subject.items())}}


def evaluate_mmlu(model: torch.nn.Module, tokenizer: BPETokenizer, path: str | Path, *, shots: int,
                  max_questions: int | None, batch_size: int = 16) -> dict:
    results = evaluate(model, tokenizer, questions(path, shots, max_questions), batch_size, desc=f"mmlu {shots}-shot")
    return summarize(results)
