"""decontaminate: a planted document quoting an eval question is found and dropped with its eval
set as the reason; one sharing only a short common phrase is kept; counts add up."""

from __future__ import annotations

import json

import polars as pl
import pytest

from conftest import RESOURCES, make_docs, write_stage_docs
from pipeline.data.decontaminate import EvalIndex, decontaminate, example_ngrams, load_evalsets, words
from pipeline.data.docs import DOC_COLUMNS
from pipeline.eval.mmlu_data import read_split
from pipeline.tasks import get_task

GSM8K_QUESTION = ("A robe takes 2 bolts of blue fiber and half that much white fiber.  "
                  "How many bolts in total does it take?")


@pytest.fixture(scope="module")
def evalsets() -> dict[str, list[str]]:
    """The default run's eval sets: bundled MMLU, and the arithmetic and GSM8K held-out splits."""
    sets = load_evalsets({"mmlu": str(RESOURCES / "mmlu"), "tasks": ["arithmetic", "gsm8k"]}, {})
    assert any(GSM8K_QUESTION in text for text in sets["gsm8k"])
    return sets


def test_task_examples_are_question_and_response(evalsets):
    problem = get_task("arithmetic", {}).examples("test")[0]
    assert evalsets["arithmetic"][0] == f"{problem.messages[0]['content']} {problem.messages[1]['content']}"


def run(tmp_path, docs, evalsets, **config):
    shard = tmp_path / "in.parquet"
    write_stage_docs(shard, docs, DOC_COLUMNS)
    manifest = decontaminate(str(shard), output=str(tmp_path / "clean.parquet"), removed=str(tmp_path / "removed.parquet"),
                             manifest=str(tmp_path / "m.json"), config=config, evalsets=evalsets)
    return manifest, pl.read_parquet(tmp_path / "clean.parquet"), pl.read_parquet(tmp_path / "removed.parquet")


def test_normalised_words_keep_digits():
    assert words("What is 12+30? It's 42!") == ["what", "is", "12", "30", "it", "s", "42"]


def test_short_examples_are_matched_whole_or_skipped():
    assert example_ngrams("one two three four five", n=13, min_words=8) == set()
    assert example_ngrams("What is 47 + 47? 47 + 47 = 94", n=13, min_words=5) == {"what is 47 47 47 47 94"}
    assert len(example_ngrams(" ".join(map(str, range(20))), n=13, min_words=8)) == 8
    index = EvalIndex({"a": ["one two three", "w " * 9 + "end"]}, n=13, min_words=8)
    assert index.stats == {"a": {"examples": 2, "skipped_short": 1}}


def test_planted_quote_is_removed_and_common_phrase_kept(tmp_path, evalsets, stories):
    question = read_split(RESOURCES / "mmlu", "test")["high_school_geography"][3]["question"]
    assert len(words(question)) >= 13
    quoted = f"{stories[0]}\n\nQuiz time! {question.upper()} Let us think.\n\n{stories[1]}"
    phrase = " ".join(question.split()[:6])  # a short phrase of the same question, under 13 words
    common = f"{stories[2]} {phrase} {stories[3]}"
    gsm = f"My homework: {GSM8K_QUESTION} I do not know."
    problem = get_task("arithmetic", {}).examples("test")[0].messages
    sums = f"{stories[5]} Quiz: {problem[0]['content']} {problem[1]['content']}. Easy."
    question_only = f"{stories[6]} {problem[0]['content']}"  # 4 words: no quotation of the example
    docs = make_docs([quoted, common, stories[4], gsm, sums, question_only])
    manifest, clean, removed = run(tmp_path, docs, evalsets)

    assert clean["id"].to_list() == [docs[i]["id"] for i in (1, 2, 5)]
    assert dict(zip(removed["id"], removed["reason"])) == {docs[0]["id"]: "contamination:mmlu",
                                                           docs[3]["id"]: "contamination:gsm8k",
                                                           docs[4]["id"]: "contamination:arithmetic"}
    counts = manifest["counts"]
    assert counts["docs_in"] == 6 and counts["docs_out"] == 3
    assert counts["dropped"] == {"contamination:arithmetic": 1, "contamination:gsm8k": 1, "contamination:mmlu": 1}
    assert manifest["metrics"]["overlapping_docs"] == {"mmlu": 1, "arithmetic": 1, "gsm8k": 1}
    assert set(clean.columns) == set(DOC_COLUMNS)


def test_remove_false_counts_but_keeps(tmp_path, evalsets, stories):
    docs = make_docs([f"{stories[0]} {GSM8K_QUESTION}", stories[1]])
    manifest, clean, removed = run(tmp_path, docs, evalsets, remove=False)
    assert clean.height == 2 and removed.height == 0
    assert manifest["metrics"]["overlapping_docs"] == {"mmlu": 0, "arithmetic": 0, "gsm8k": 1}
    assert json.loads((tmp_path / "m.json").read_text())["counts"]["dropped"] == {}


def test_a_document_overlapping_two_sets_counts_for_each(tmp_path, evalsets):
    question = next(item["question"] for item in read_split(RESOURCES / "mmlu", "test")["world_religions"]
                    if len(words(item["question"])) >= 13)
    docs = make_docs([f"{question} and also {GSM8K_QUESTION}"])
    manifest, _, removed = run(tmp_path, docs, evalsets)
    assert manifest["metrics"]["overlapping_docs"] == {"mmlu": 1, "arithmetic": 0, "gsm8k": 1}
    assert removed["reason"].to_list() == ["contamination:mmlu"]  # one reason: the first set
