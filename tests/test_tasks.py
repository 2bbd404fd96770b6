"""Tasks: arithmetic splits and seeding, GSM8K and instruct parsing on the bundled files, and the
shared answer extraction and reward."""

from __future__ import annotations

import gzip
import json

import pytest

from conftest import RESOURCES
from pipeline.config import ConfigError
from pipeline.tasks import Example, get_task
from pipeline.tasks.answers import extract_answer, numeric_reward
from pipeline.tasks.arithmetic import is_test
from pipeline.tasks.gsm8k import parse_record

SMALL = {"arithmetic": {"train_problems": 2000, "test_problems": 200}}


def arithmetic(**config) -> list:
    return get_task("arithmetic", {"arithmetic": {**SMALL["arithmetic"], **config}})


def problems(examples: list[Example]) -> list[str]:
    return [e.prompt[0]["content"].removeprefix("What is ").removesuffix("?") for e in examples]


# --- arithmetic ------------------------------------------------------------------------------------

def test_arithmetic_splits_are_disjoint_and_seeded():
    task = arithmetic()
    train, test = task.examples("train"), task.examples("test")
    assert len(train) == 2000 and len(test) == 200
    assert len(set(problems(train))) == 2000 and not set(problems(train)) & set(problems(test))
    assert all(is_test(p, 0.1) for p in problems(test)) and not any(is_test(p, 0.1) for p in problems(train))
    assert task.examples("train") == train  # deterministic
    assert arithmetic(seed=1).examples("train") != train  # the seed matters...
    assert not set(problems(arithmetic(seed=1).examples("train"))) & set(problems(test))  # ...not the split


def test_arithmetic_examples_are_correct_and_well_formed():
    for example in arithmetic(operators=["+", "-", "*"]).examples("train"):
        text = problems([example])[0]
        a, op, b = text.split(" ")
        assert example.messages == example.prompt + [{"role": "assistant", "content": f"{text} = {example.answer}"}]
        assert int(example.answer) == {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]
        assert int(example.answer) >= 0


@pytest.mark.parametrize("digits, operators, low, high", [([2, 3], ["+", "-"], 10, 999), (1, ["*"], 0, 9),
                                                         ([4, 4], ["-"], 1000, 9999)])
def test_arithmetic_honours_digits_and_operators(digits, operators, low, high):
    examples = arithmetic(digits=digits, operators=operators, train_problems=50, test_problems=5).examples("train")
    operands, ops = set(), set()
    for text in problems(examples):
        a, op, b = text.split(" ")
        operands |= {int(a), int(b)}
        ops.add(op)
    assert ops == set(operators) and low <= min(operands) and max(operands) <= high
    if low > 0:
        assert min(len(str(x)) for x in operands) == len(str(low))


def test_arithmetic_too_small_a_problem_space_is_a_config_error():
    with pytest.raises(ConfigError, match="tasks.arithmetic.train_problems"):
        arithmetic(digits=1, operators=["+"], train_problems=200).examples("train")  # only 100 problems exist
    with pytest.raises(ConfigError, match="tasks.arithmetic.digits"):
        arithmetic(digits=[3, 2]).examples("train")
    with pytest.raises(ConfigError, match="tasks.arithmetic.operators"):
        arithmetic(operators=["/"])
    with pytest.raises(ValueError, match="unknown split 'val'"):
        arithmetic().examples("val")
    with pytest.raises(ValueError, match="unknown task 'chess'"):
        get_task("chess", {})


def test_arithmetic_reward_on_its_own_answers():
    task = arithmetic()
    for example in task.examples("test")[:50]:
        assert task.reward(example.messages[-1]["content"], example.answer) == 1.0
        # the question's last number is the second operand: right only when it equals the result (40 - 20)
        second = problems([example])[0].split(" ")[-1]
        assert task.reward(example.prompt[0]["content"], example.answer) == float(second == example.answer)


# --- gsm8k -----------------------------------------------------------------------------------------

def test_gsm8k_parses_the_bundled_files():
    task = get_task("gsm8k", {})
    train, test = task.examples("train"), task.examples("test")
    assert (len(train), len(test)) == (7473, 1319)  # as in resources/gsm8k/PROVENANCE.md
    first = json.loads(gzip.open(RESOURCES / "gsm8k" / "train.jsonl.gz", "rt").readline())
    assert first["answer"].endswith("#### 72") and "<<48/2=24>>" in first["answer"]
    assert train[0].prompt == [{"role": "user", "content": first["question"]}] and train[0].answer == "72"
    assert train[0].messages[-1]["content"] == ("Natalia sold 48/2 = 24 clips in May.\n"
                                                "Natalia sold 48+24 = 72 clips altogether in April and May.\n#### 72")
    assert not any("<<" in e.messages[-1]["content"] for e in train + test)
    # thousands commas normalised away; every worked solution earns its own reward
    assert any(e.messages[-1]["content"].endswith("#### 1,080") and e.answer == "1080" for e in train)
    assert all(task.reward(e.messages[-1]["content"], e.answer) == 1.0 for e in train + test)


def test_gsm8k_bad_line_names_the_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"question": "q", "answer": "2 + 2 = 4\\n#### 4"}\n{"question": "q", "answer": "no final"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl line 2: the answer has no '#### <number>' line"):
        get_task("gsm8k", {"gsm8k": {"train": str(path)}}).examples("train")
    with pytest.raises(ValueError, match="x line 1: the final answer 'four' is not a number"):
        parse_record({"question": "q", "answer": "#### four"}, "x line 1")


# --- instruct --------------------------------------------------------------------------------------

def test_instruct_conversations_and_held_out_slice():
    task = get_task("instruct", {})
    train, test = task.examples("train"), task.examples("test")
    assert len(train) + len(test) == 175 + 252 and 0 < len(test) < len(train)  # one instance per record
    assert all(e.answer == "" and e.messages[:-1] == e.prompt for e in train + test)
    with_input = next(e for e in train if e.prompt[0]["content"].startswith("What is the relation between the given pairs?"))
    assert with_input.prompt[0]["content"] == "What is the relation between the given pairs?\n\nNight : Day :: Right : Left"
    assert with_input.messages[-1]["content"] == "The relation between the given pairs is that they are opposites."
    assert {e.prompt[0]["content"] for e in train}.isdisjoint(e.prompt[0]["content"] for e in test)
    with pytest.raises(ValueError, match="no reference answers"):
        task.reward("anything", "")


def test_instruct_bad_record_names_the_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"id": "a", "instruction": "Say hi.", "instances": [{"input": "", "output": ""}]}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl line 1: instances\[0\] needs"):
        get_task("instruct", {"instruct": {"paths": [str(path)], "test_fraction": 0.001}}).examples("train")


# --- answers and reward ----------------------------------------------------------------------------

@pytest.mark.parametrize("completion, expected", [
    ("23 + 58 = 81", "81"),
    ("The answer is 1,080.", "1080"),
    ("She pays $12.50 in total.", "12.50"),
    ("3 - 5 = -2", "-2"),
    ("First 3, then 4.\n#### 1, 234.", "1234"),
    ("#### 7 apples and 9 pears", "7"),
    ("6 * 7 = 42 #### 40\nand later 99", "40"),  # the last #### wins over the last number
    ("no number here", None),
    ("#### none", None),
])
def test_extract_answer(completion, expected):
    assert extract_answer(completion) == expected


@pytest.mark.parametrize("completion, answer, reward", [
    ("23 + 58 = 81", "81", 1.0),
    ("The total is 1,080.", "1,080", 1.0),
    ("#### 1 080", "1080", 1.0),
    ("so 81.0", "81", 1.0),
    ("#### 72.", "72", 1.0),
    ("23 + 58 = 82", "81", 0.0),
    ("I don't know", "81", 0.0),
    ("", "81", 0.0),
    ("#### 810", "81", 0.0),
])
def test_numeric_reward(completion, answer, reward):
    assert numeric_reward(completion, answer) == reward


def test_reward_refuses_a_reference_that_is_not_a_number():
    with pytest.raises(ValueError, match="reference answer 'eighty' is not a number"):
        numeric_reward("81", "eighty")


def test_a_prompt_too_long_for_the_context_keeps_its_last_tokens(caplog):
    """The greedy scorers read the last tokens of a prompt that would leave no room for the answer
    (a sliding window would), and say so in the log."""
    from pipeline.tasks.evaluate import fit_context

    with caplog.at_level("WARNING"):
        fitted = fit_context([list(range(10)), [1, 2]], seq_len=8, max_new_tokens=3)
    assert fitted == [[5, 6, 7, 8, 9], [1, 2]]
    assert "1 of 2 prompts longer than the 5 tokens" in caplog.text
    assert fit_context([list(range(10))], seq_len=8, max_new_tokens=20) == [[9]]  # always one token
