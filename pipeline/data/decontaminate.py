"""decontaminate: find documents that quote an eval set, count them, and (by default) drop them.

Runs per shard after dedup and before pii, so on the text as crawled. Every example of every
eval set in use (the MMLU test questions with their choices, from `eval.mmlu.path`; the
held-out conversations, question and reference response, of the tasks in `eval.tasks.names`)
becomes a set of word n-grams (`ngram`, 13 as in GPT-3's and PaLM's contamination studies) on
normalised words: lowercased, punctuation removed, whitespace collapsed; digits are kept, since
arithmetic is nothing but digits. An example shorter than `ngram` words is one n-gram of all its
words, so short questions are still found, unless it is shorter than `min_words`, in which case
it is skipped (and counted): a few words are a common phrase, not a quotation.

A document sharing any n-gram with an eval set overlaps it. Counts per eval set go into the job's
metrics and the drop report; a document overlapping several sets counts for each. With `remove`
(default true) it is dropped with the reason `contamination:<evalset>`, naming the first set in
order, and lands in removed/decontaminate/ like every other stage's drops.
"""

from __future__ import annotations

import argparse
import logging
import re
from collections import Counter
from collections.abc import Iterator
from typing import Any

from pipeline.cli import json_arg
from pipeline.config import section_config
from pipeline.data.docs import Doc
from pipeline.data.steps import Decision, add_stage_arguments, run_doc_stage

log = logging.getLogger(__name__)

_NON_WORD = re.compile(r"[^\w\s]|_")


def words(text: str) -> list[str]:
    """Normalised words: lowercase, punctuation gone, digits kept."""
    return _NON_WORD.sub(" ", text.lower()).split()


def example_ngrams(text: str, n: int, min_words: int) -> set[str]:
    """The example's word n-grams; all its words as one when it has fewer than n (none when fewer
    than min_words)."""
    w = words(text)
    if len(w) < min_words:
        return set()
    if len(w) < n:
        return {" ".join(w)}
    return {" ".join(w[i:i + n]) for i in range(len(w) - n + 1)}


class EvalIndex:
    """{n-gram: eval sets holding it}, with the n-gram lengths in use (n, and shorter examples')."""

    def __init__(self, evalsets: dict[str, list[str]], n: int, min_words: int):
        self.sets = list(evalsets)
        self.grams: dict[str, set[str]] = {}
        self.stats: dict[str, dict[str, int]] = {}
        for name, examples in evalsets.items():
            skipped = 0
            for text in examples:
                grams = example_ngrams(text, n, min_words)
                skipped += not grams
                for gram in grams:
                    self.grams.setdefault(gram, set()).add(name)
            self.stats[name] = {"examples": len(examples), "skipped_short": skipped}
        self.lengths = sorted({gram.count(" ") + 1 for gram in self.grams})

    def overlaps(self, text: str) -> set[str]:
        """The eval sets sharing an n-gram with `text`."""
        w = words(text)
        found: set[str] = set()
        for length in self.lengths:
            for i in range(len(w) - length + 1):
                hit = self.grams.get(" ".join(w[i:i + length]))
                if hit:
                    found |= hit
                    if len(found) == len(self.sets):
                        return found
        return found


def load_evalsets(spec: dict[str, Any], tasks_config: dict[str, Any] | None) -> dict[str, list[str]]:
    """{eval set name: example texts} from {"mmlu": path or null, "tasks": [task names]}."""
    evalsets: dict[str, list[str]] = {}
    if spec.get("mmlu"):
        from pipeline.eval.mmlu_data import read_split
        evalsets["mmlu"] = [" ".join([item["question"], *item["choices"]])
                            for items in read_split(spec["mmlu"], "test").values() for item in items]
    for name in spec.get("tasks", []):
        from pipeline.tasks import get_task
        evalsets[name] = [" ".join(m["content"] for m in example.messages)  # question and reference response
                          for example in get_task(name, tasks_config or {}).examples("test")]
    return evalsets


def decontaminate(docs_in: str, *, output: str, removed: str, manifest: str, config: dict[str, Any],
                  evalsets: dict[str, list[str]]) -> dict[str, Any]:
    config = section_config("decontaminate", config)
    index = EvalIndex(evalsets, config["ngram"], config["min_words"])
    overlapping: Counter = Counter(dict.fromkeys(index.sets, 0))

    def decide(docs: Iterator[Doc]) -> Iterator[Decision]:
        for doc in docs:
            found = [name for name in index.sets if name in index.overlaps(doc["text"])]
            overlapping.update(found)
            yield doc, (f"contamination:{found[0]}" if found and config["remove"] else None)

    metrics = {"overlapping_docs": overlapping, "evalsets": index.stats, "ngrams": len(index.grams)}
    result = run_doc_stage("decontaminate", decide, docs_in=docs_in, docs_out=output, removed_out=removed,
                           manifest=manifest, config={**config, "evalsets": index.stats}, metrics=metrics)
    log.info("decontaminate: documents overlapping each eval set %s (removed: %s)", dict(overlapping), config["remove"])
    return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_stage_arguments(parser, config_help="the `decontaminate` config section as JSON")
    parser.add_argument("--evalsets", type=json_arg, default={},
                        help='the eval sets in use: {"mmlu": <MMLU folder or .tar.gz>, "tasks": [names]}')
    parser.add_argument("--tasks-config", type=json_arg, default={}, help="the `tasks` config section as JSON")


def run(args: argparse.Namespace) -> int:
    decontaminate(args.input, output=args.output, removed=args.removed, manifest=args.manifest,
                  config=args.config, evalsets=load_evalsets(args.evalsets, args.tasks_config))
    return 0
