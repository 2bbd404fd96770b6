"""Intervals on accuracies."""

from __future__ import annotations

import math

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile: two-sided 95%


def wilson_interval(correct: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of the proportion correct / n (Wilson, 1927; scipy's
    `binomtest(correct, n).proportion_ci(method="wilson")`, without importing scipy): unlike the
    normal approximation p +- z sqrt(p(1-p)/n) it stays inside [0, 1] and is not empty at 0 or n
    correct, which small evals often give."""
    if n < 1 or not 0 <= correct <= n:
        raise ValueError(f"a Wilson interval needs n >= 1 and 0 <= correct <= n, got correct={correct} n={n}")
    p, z2 = correct / n, z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z / (1 + z2 / n) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)
