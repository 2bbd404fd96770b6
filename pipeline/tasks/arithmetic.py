"""arithmetic: generated problems, "What is 23 + 58?" -> "23 + 58 = 81".

- Operands: each draws its digit count uniformly from `digits` ([min, max], or a max meaning
  [1, max]), then a value uniformly among the numbers with that many digits. Operators: a subset of
  + - *. Subtraction puts the larger operand first, so answers are never negative.
- Answer format: the assistant restates the problem and gives the result ("23 + 58 = 81"). Short and
  fixed, so a 1-4M-parameter model learns the format in a few SFT steps; restating puts both
  operands right before the result, where a tiny model attends best; and the reward reads the last
  number, the result. The default, one- and two-digit addition, is learnable on a CPU (SFT on
  `tiny` gets about half right) yet not solved (carries), which leaves headroom for GRPO.
- Splits: a problem is test (held out) when a hash of its text ("23 + 58") falls under
  `test_fraction`, train otherwise. The hash ignores the seed, so no seed ever trains on a test
  problem. Each split draws `<split>_problems` distinct problems from a generator seeded with
  `seed` and the split name: same config, same problems in the same order.
"""

from __future__ import annotations

import operator
import random
from typing import Any

from pipeline.config import ConfigError
from pipeline.records import unit_hash
from pipeline.tasks import Example, Task, check_split, qa_example

OPERATORS = {"+": operator.add, "-": operator.sub, "*": operator.mul}
MAX_DRAWS_PER_PROBLEM = 50  # a small problem space runs out of distinct problems; stop and say so


def digit_range(digits: int | list[int]) -> tuple[int, int]:
    low, high = (1, digits) if isinstance(digits, int) else digits
    if low > high:
        raise ConfigError(f"config key 'tasks.arithmetic.digits': [{low}, {high}] is not a [min, max] range")
    return low, high


def is_test(text: str, test_fraction: float) -> bool:
    return unit_hash(f"arithmetic#{text}") < test_fraction


class ArithmeticTask(Task):
    name = "arithmetic"

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__(config)
        self.digits = digit_range(config["digits"])
        self.operators = list(config["operators"])

    def operand(self, rng: random.Random) -> int:
        n = rng.randint(*self.digits)
        return rng.randint(10 ** (n - 1) if n > 1 else 0, 10**n - 1)

    def problem(self, rng: random.Random) -> tuple[str, int]:
        """One random problem: (canonical text, result)."""
        a, b, op = self.operand(rng), self.operand(rng), rng.choice(self.operators)
        if op == "-" and a < b:
            a, b = b, a
        return f"{a} {op} {b}", OPERATORS[op](a, b)

    def examples(self, split: str) -> list[Example]:
        check_split(split)
        want = self.config[f"{split}_problems"]
        rng = random.Random(f"{self.config['seed']}#{split}")  # str seeds are hashed with sha512: stable
        seen: set[str] = set()
        out = []
        for _ in range(MAX_DRAWS_PER_PROBLEM * want):
            if len(out) == want:
                break
            text, result = self.problem(rng)
            if text in seen or is_test(text, self.config["test_fraction"]) != (split == "test"):
                continue
            seen.add(text)
            out.append(qa_example(f"What is {text}?", f"{text} = {result}", str(result)))
        if len(out) < want:
            raise ConfigError(f"config key 'tasks.arithmetic.{split}_problems': only {len(out)} distinct {split} "
                              f"problems of {want} found with digits {list(self.digits)} and operators "
                              f"{self.operators}; widen them or ask for fewer")
        return out
