"""The statistics every reported number goes through: intervals and paired comparisons.

- `proportion`: an accuracy (pass@1, MMLU acc) with its Wilson score 95% interval (Wilson, 1927).
  Unlike p +- 1.96 sqrt(p(1-p)/n) it stays inside [0, 1] and is not empty at 0 or n correct,
  which small models often score.
- `bootstrap_ratio`: a mean (pass@k over items) or a ratio of sums (val loss = nats / tokens over
  documents) with a percentile bootstrap interval: resample the units (items, documents) with
  replacement and recompute the statistic.
- `mcnemar_exact`: two models scored right/wrong on the same items. Only the items where they
  disagree carry information; under "no difference" each is equally likely to go either way, so
  the p-value is a two-sided binomial test of b against b + c at 1/2 (McNemar, 1947; exact form).
- `paired_bootstrap`: two models' per-unit values on the same units; the difference of the
  statistic, its percentile interval, and the two-sided p-value of the null-centred bootstrap
  (Efron and Tibshirani, 1993, 16.4): how often a resampled difference lies at least |diff|
  from the observed one.

A bootstrap needs units to resample: over fewer than MIN_BOOTSTRAP_UNITS (10) the percentile
interval and p-value would only echo the few values there are (2 documents give 3 distinct
resamples), so `bootstrap_ratio` and `compare_values` then write "ci95": null (and "p_value": null)
with a "note" saying why, and the tables print the value with its n instead of an interval.

A metric is written as {"value", "ci95": [low, high], "n", "method"} and a comparison as
{"a", "b", "diff" (b - a), "ci95", "p_value", "test", "n"}: the shapes every stage and the
report card read. Bootstraps are seeded, so the same scores give the same intervals.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile
RESAMPLES = 10_000
SEED = 0
MIN_BOOTSTRAP_UNITS = 10


def too_few(n: int) -> str:
    return f"{n} units: too few for a bootstrap interval (at least {MIN_BOOTSTRAP_UNITS})"


def wilson_interval(correct: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval (95% by default) of the proportion correct / n."""
    if n < 1 or not 0 <= correct <= n:
        raise ValueError(f"a Wilson interval needs n >= 1 and 0 <= correct <= n, got correct={correct} n={n}")
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    # at 0 or n correct one end is exactly the observed value; rounding must not move it past
    return (0.0 if correct == 0 else centre - half), (1.0 if correct == n else centre + half)


def proportion(correct: int, n: int) -> dict[str, Any]:
    """An accuracy as a metric: the proportion with its Wilson 95% interval."""
    low, high = wilson_interval(correct, n)
    return {"value": correct / n, "ci95": [low, high], "n": n, "method": "wilson"}


def _resample_sums(values: np.ndarray, resamples: int, seed: int) -> np.ndarray:
    """(resamples, columns): column sums of `values` (units x columns) over units drawn with
    replacement, the same draws for every column (so paired columns stay paired)."""
    rng = np.random.default_rng(seed)
    n = len(values)
    sums = np.empty((resamples, values.shape[1]))
    for first in range(0, resamples, 1000):  # 1000 resamples at a time: a bounded index array
        rows = rng.integers(0, n, size=(min(1000, resamples - first), n))
        sums[first:first + len(rows)] = values[rows].sum(axis=1)
    return sums


def _as_units(numerators: Sequence[float], denominators: Sequence[float] | None) -> np.ndarray:
    num = np.asarray(numerators, dtype=np.float64)
    den = np.ones_like(num) if denominators is None else np.asarray(denominators, dtype=np.float64)
    if num.ndim != 1 or num.shape != den.shape or len(num) == 0:
        raise ValueError(f"a bootstrap needs equal, non-empty 1-d numerators and denominators; got {num.shape}, {den.shape}")
    if den.sum() <= 0:
        raise ValueError("a bootstrap ratio needs a positive total denominator")
    return np.stack([num, den], axis=1)


def _percentile(draws: np.ndarray) -> list[float]:
    low, high = np.percentile(draws, [2.5, 97.5])
    return [float(low), float(high)]


def bootstrap_ratio(numerators: Sequence[float], denominators: Sequence[float] | None = None, *,
                    resamples: int = RESAMPLES, seed: int = SEED) -> dict[str, Any]:
    """sum(numerators) / sum(denominators) over units (a mean when denominators is None) as a
    metric, with the percentile bootstrap 95% interval over units."""
    units = _as_units(numerators, denominators)
    value = float(units[:, 0].sum() / units[:, 1].sum())
    if len(units) < MIN_BOOTSTRAP_UNITS:
        return {"value": value, "ci95": None, "n": len(units), "method": "bootstrap", "note": too_few(len(units))}
    sums = _resample_sums(units, resamples, seed)
    draws = sums[:, 0] / np.where(sums[:, 1] > 0, sums[:, 1], np.nan)
    return {"value": value, "ci95": _percentile(draws[~np.isnan(draws)]), "n": len(units), "method": "bootstrap"}


def mcnemar_exact(a_correct: Sequence[bool], b_correct: Sequence[bool]) -> float:
    """The exact (binomial) McNemar p-value, two-sided, of two models scored on the same items."""
    a, b = np.asarray(a_correct, dtype=bool), np.asarray(b_correct, dtype=bool)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"McNemar needs both models scored on the same items; got {a.shape} and {b.shape}")
    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    m = only_a + only_b
    if m == 0:
        return 1.0
    tail = sum(math.comb(m, i) for i in range(min(only_a, only_b) + 1)) / 2**m
    return min(1.0, 2 * tail)


def paired_bootstrap(a: Sequence[float], b: Sequence[float], denominators: Sequence[float] | None = None, *,
                     resamples: int = RESAMPLES, seed: int = SEED) -> tuple[float, list[float], float]:
    """(diff, ci95, p_value) of sum(b - a) / sum(denominators) over paired units (a mean
    difference when denominators is None), resampling units with replacement."""
    a_arr, b_arr = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a_arr.shape != b_arr.shape:
        raise ValueError(f"a paired bootstrap needs both on the same units; got {a_arr.shape} and {b_arr.shape}")
    units = _as_units(b_arr - a_arr, denominators)
    diff = float(units[:, 0].sum() / units[:, 1].sum())
    sums = _resample_sums(units, resamples, seed)
    draws = sums[:, 0] / sums[:, 1]
    # the share of null-centred resamples at least as far from 0 as the observed difference
    extreme = np.abs(draws - diff) >= abs(diff) - 1e-12
    return diff, _percentile(draws), float((extreme.sum() + 1) / (resamples + 1))


def compare_correct(a_name: str, a_correct: Sequence[bool], b_name: str, b_correct: Sequence[bool]) -> dict[str, Any]:
    """Two models' right/wrong answers on the same items: the accuracy difference (b - a) with its
    paired bootstrap interval and the exact McNemar p-value."""
    diff, ci, _ = paired_bootstrap(np.asarray(a_correct, float), np.asarray(b_correct, float))
    return {"a": a_name, "b": b_name, "diff": diff, "ci95": ci, "p_value": mcnemar_exact(a_correct, b_correct),
            "test": "mcnemar_exact", "n": len(a_correct)}


def compare_values(a_name: str, a: Sequence[float], b_name: str, b: Sequence[float],
                   denominators: Sequence[float] | None = None) -> dict[str, Any]:
    """Two models' per-unit values on the same units (pass@k per item, nats per document with the
    documents' tokens as denominators): the difference (b - a), its paired bootstrap interval and
    p-value; over fewer than MIN_BOOTSTRAP_UNITS units the difference alone, with a note."""
    if len(a) < MIN_BOOTSTRAP_UNITS:
        units = _as_units(np.asarray(b, dtype=np.float64) - np.asarray(a, dtype=np.float64), denominators)
        return {"a": a_name, "b": b_name, "diff": float(units[:, 0].sum() / units[:, 1].sum()), "ci95": None,
                "p_value": None, "test": "paired_bootstrap", "n": len(a), "note": too_few(len(a))}
    diff, ci, p = paired_bootstrap(a, b, denominators)
    return {"a": a_name, "b": b_name, "diff": diff, "ci95": ci, "p_value": p, "test": "paired_bootstrap",
            "n": len(a)}


def t_interval(values: Sequence[float]) -> list[float]:
    """The Student t 95% interval of the mean of a few values (e.g. one result per seed)."""
    from scipy.stats import t

    x = np.asarray(values, dtype=np.float64)
    if len(x) < 2:
        raise ValueError(f"a t interval needs at least 2 values, got {len(x)}")
    half = float(t.ppf(0.975, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x)))
    return [float(x.mean()) - half, float(x.mean()) + half]


def fmt(metric: dict[str, Any] | float | None, digits: int = 3, scale: float = 1.0) -> str:
    """'0.480 [0.436, 0.524]' for a metric ('6.135 (n 2)' without an interval), the plain number for
    a number, 'n/a' for None."""
    if metric is None:
        return "n/a"
    if not isinstance(metric, dict):
        return f"{metric * scale:.{digits}f}"
    if metric["ci95"] is None:
        return f"{metric['value'] * scale:.{digits}f} (n {metric['n']})"
    low, high = metric["ci95"]
    return f"{metric['value'] * scale:.{digits}f} [{low * scale:.{digits}f}, {high * scale:.{digits}f}]"
