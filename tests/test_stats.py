import math

import pytest

from metarun.stats import mean_ci95


def test_ci_is_1_96_sample_std_over_sqrt_n():
    mean, ci = mean_ci95([0.0, 1.0, 0.0, 1.0])
    assert mean == 0.5
    assert ci == pytest.approx(1.96 * math.sqrt(1 / 3) / 2)


def test_single_value_and_empty():
    assert mean_ci95([0.7]) == (0.7, 0.0)
    with pytest.raises(ValueError):
        mean_ci95([])
