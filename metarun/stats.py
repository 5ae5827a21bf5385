"""Mean and 95% confidence interval over evaluation episodes."""

from __future__ import annotations

import math
from collections.abc import Sequence


def mean_ci95(values: Sequence[float]) -> tuple[float, float]:
    """Mean and the half-width 1.96·std/√n of its normal 95% confidence interval.

    std is the sample standard deviation (n − 1), as in the few-shot literature
    (Snell et al. 2017; Finn et al. 2017 report mean ± 1.96·std/√600).
    """
    n = len(values)
    if n == 0:
        raise ValueError("mean_ci95 needs at least one value")
    mean = sum(values) / n
    if n == 1:
        return mean, 0.0
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, 1.96 * math.sqrt(var / n)


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score 95% interval (low, high) of a proportion of ``successes`` in ``n``
    (Wilson 1927): valid for few items and at 0% or 100%, where the normal interval of
    `mean_ci95` collapses to zero width (15 of 15 right: 79.6–100%, not 100 ± 0%)."""
    if n <= 0 or not 0 <= successes <= n:
        raise ValueError(f"wilson_interval needs 0 <= successes <= n and n > 0, got {successes} of {n}")
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)
