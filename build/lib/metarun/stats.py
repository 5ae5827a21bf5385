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
