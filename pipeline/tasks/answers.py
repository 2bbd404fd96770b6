"""The one answer extraction and numeric reward all verifiable tasks share.

A completion's answer is the number after its last "####" if it has one (GSM8K's format), else the
last number in the completion. Normalising removes commas and spaces and a trailing period
("#### 1, 080." -> 1080); in free text only thousands commas join digits ("1,080 apples" -> 1080,
while "12 000" reads as two numbers). The reward is 1.0 when that number equals the reference
numerically (Decimal, so "81.0" == "81"), 0.0 otherwise, and 0.0 when there is no number.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
NUMBER_WITH_COMMAS = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d+(?:\.\d+)?")


def normalise(text: str) -> str:
    """Commas and spaces removed, surrounding whitespace and a trailing period dropped."""
    return text.replace(",", "").replace(" ", "").strip().rstrip(".")


def extract_answer(completion: str) -> str | None:
    """The completion's answer as a plain number string (see module doc), or None."""
    if "####" in completion:
        tail = completion.rsplit("####", 1)[1].strip().split("\n", 1)[0]
        match = NUMBER.search(normalise(tail))
        return match.group() if match else None
    numbers = NUMBER_WITH_COMMAS.findall(completion)
    return numbers[-1].replace(",", "") if numbers else None


def numeric_reward(completion: str, answer: str) -> float:
    """1.0 on an exact numeric match of the completion's answer with `answer`, else 0.0."""
    try:
        reference = Decimal(normalise(answer))
    except InvalidOperation:
        raise ValueError(f"reference answer {answer!r} is not a number") from None
    predicted = extract_answer(completion)
    return float(predicted is not None and Decimal(predicted) == reference)
