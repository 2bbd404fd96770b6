"""pipeline/stats.py against known values: scipy's Wilson interval, binomial test and t
interval, hand-counted McNemar tables, and bootstraps whose answer is known."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import binomtest, t

from pipeline.stats import (bootstrap_ratio, compare_correct, compare_values, fmt, mcnemar_exact, paired_bootstrap,
                            proportion, t_interval, wilson_interval)


@pytest.mark.parametrize("correct,n", [(0, 20), (1, 20), (7, 20), (20, 20), (240, 500), (81, 263), (3, 1000)])
def test_wilson_interval_equals_scipys(correct, n):
    want = binomtest(correct, n).proportion_ci(confidence_level=0.95, method="wilson")
    assert wilson_interval(correct, n) == pytest.approx((want.low, want.high), abs=1e-12)


def test_wilson_by_hand_and_its_edges():
    # p = 0.5, n = 100: centre 0.5, half-width z sqrt(0.25/100 + z^2/40000) / (1 + z^2/100)
    z = 1.959963984540054
    half = z * math.sqrt(0.0025 + z * z / 40000) / (1 + z * z / 100)
    assert wilson_interval(50, 100) == pytest.approx((0.5 - half, 0.5 + half))
    assert wilson_interval(0, 5)[0] == 0.0 and wilson_interval(5, 5)[1] == 1.0
    assert wilson_interval(0, 5)[1] > 0.0  # not empty at 0 correct, unlike the normal approximation
    with pytest.raises(ValueError, match="correct=6 n=5"):
        wilson_interval(6, 5)
    assert proportion(240, 500) == {"value": 0.48, "ci95": list(wilson_interval(240, 500)), "n": 500,
                                    "method": "wilson"}


def table(both: int, only_a: int, only_b: int, neither: int) -> tuple[list[bool], list[bool]]:
    """Right/wrong answers of two models on the same items, from the counts of a paired 2x2 table."""
    a = [True] * both + [True] * only_a + [False] * only_b + [False] * neither
    b = [True] * both + [False] * only_a + [True] * only_b + [False] * neither
    return a, b


def test_mcnemar_exact_on_constructed_tables():
    # only the discordant items count: 2 vs 9 -> 2 P(X <= 2), X ~ Binomial(11, 1/2) = 2 (1 + 11 + 55) / 2048
    a, b = table(40, 2, 9, 49)
    assert mcnemar_exact(a, b) == pytest.approx(134 / 2048)
    assert mcnemar_exact(a, b) == pytest.approx(binomtest(2, 11, 0.5).pvalue)
    assert mcnemar_exact(b, a) == mcnemar_exact(a, b)
    # the concordant items change nothing
    assert mcnemar_exact(*table(400, 2, 9, 0)) == mcnemar_exact(a, b)
    # no discordant item: no evidence at all; a tie: p = 1
    assert mcnemar_exact(*table(5, 0, 0, 5)) == 1.0 and mcnemar_exact(*table(5, 4, 4, 5)) == 1.0
    # 48% vs 52% on 500 items: 6 items only the first gets, 26 only the second
    a, b = table(234, 6, 26, 234)
    assert (sum(a), sum(b)) == (240, 260)
    assert mcnemar_exact(a, b) == pytest.approx(binomtest(6, 32, 0.5).pvalue) and mcnemar_exact(a, b) < 0.001
    with pytest.raises(ValueError, match="same items"):
        mcnemar_exact([True, False], [True])


def test_compare_correct_is_b_minus_a_with_mcnemar():
    a, b = table(40, 2, 9, 49)
    c = compare_correct("sft", a, "grpo", b)
    assert c["a"] == "sft" and c["b"] == "grpo" and c["test"] == "mcnemar_exact" and c["n"] == 100
    assert c["diff"] == pytest.approx(0.07) and c["p_value"] == pytest.approx(134 / 2048)
    assert c["ci95"][0] < 0.07 < c["ci95"][1]


def test_bootstrap_of_a_mean_matches_normal_theory():
    x = np.random.default_rng(1).normal(3.0, 2.0, size=2000)
    m = bootstrap_ratio(x)
    half = 1.96 * x.std(ddof=1) / math.sqrt(len(x))
    assert m["value"] == pytest.approx(x.mean()) and m["n"] == 2000 and m["method"] == "bootstrap"
    assert m["ci95"][0] == pytest.approx(x.mean() - half, abs=0.15 * half)
    assert m["ci95"][1] == pytest.approx(x.mean() + half, abs=0.15 * half)
    assert bootstrap_ratio(x) == m  # seeded


def test_bootstrap_ratio_resamples_units_not_tokens():
    # every document has 2 nats per token: whatever the resample, the ratio is 2
    tokens = np.array([10, 200, 35, 4] * 3)
    assert bootstrap_ratio(2.0 * tokens, tokens)["ci95"] == pytest.approx([2.0, 2.0])
    # one long document with a high loss among short ones: the ratio is token-weighted, the interval wide
    m = bootstrap_ratio([5.0 * 1000] + [1.0 * 10] * 11, [1000] + [10] * 11)
    assert m["value"] == pytest.approx(5110 / 1110)
    assert m["ci95"][0] <= 1.0 + 1e-9 and 4.8 < m["ci95"][1] <= 5.0  # from the short ones alone to nearly 5


def test_too_few_units_give_no_bootstrap_interval():
    # 2 documents allow 3 distinct resamples: no interval and no p-value, the value with its n and why
    m = bootstrap_ratio([12.0, 7.0], [2, 1])
    assert m["value"] == pytest.approx(19 / 3) and m["ci95"] is None and m["n"] == 2 and "too few" in m["note"]
    assert fmt(m) == "6.333 (n 2)"
    c = compare_values("pretrain", [1.0, 2.0], "sft", [1.5, 2.5])
    assert c["diff"] == pytest.approx(0.5) and c["ci95"] is None and c["p_value"] is None and "too few" in c["note"]
    assert bootstrap_ratio(np.arange(10.0))["ci95"] is not None  # from 10 units on


def test_paired_bootstrap_pairs_the_units():
    a = np.random.default_rng(2).normal(0, 1, size=300)
    # the same values: no difference, p = 1
    diff, ci, p = paired_bootstrap(a, a)
    assert diff == 0.0 and ci == [0.0, 0.0] and p == 1.0
    # a constant shift: every paired difference is 0.1, so the interval is exact although the
    # values spread far more than 0.1 (an unpaired comparison could not see it)
    diff, ci, p = paired_bootstrap(a, a + 0.1)
    assert diff == pytest.approx(0.1) and ci == pytest.approx([0.1, 0.1]) and p < 0.001
    # noise around a real shift of 0.2
    b = a + 0.2 + np.random.default_rng(3).normal(0, 0.5, size=300)
    diff, ci, p = paired_bootstrap(a, b)
    assert ci[0] < diff < ci[1] and ci[0] > 0 and p < 0.001
    c = compare_values("pretrain", a, "sft", b)
    assert c["test"] == "paired_bootstrap" and c["diff"] == pytest.approx(diff) and c["n"] == 300


def test_t_interval_equals_scipys():
    values = [0.02, 0.05, -0.01]
    low, high = t.interval(0.95, 2, loc=np.mean(values), scale=np.std(values, ddof=1) / math.sqrt(3))
    assert t_interval(values) == pytest.approx([low, high])


def test_fmt():
    assert fmt(proportion(240, 500)) == "0.480 [0.437, 0.524]"
    assert fmt(proportion(240, 500), 1, 100) == "48.0 [43.7, 52.4]"
    assert fmt(0.25) == "0.250" and fmt(None) == "n/a"
