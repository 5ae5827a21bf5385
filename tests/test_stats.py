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


def test_wilson_interval_against_its_closed_form_and_at_the_edges():
    from metarun.stats import wilson_interval

    # 15 of 15: (1 + z²/2n ± z·sqrt(z²/4n²)) / (1 + z²/n) -> low = n / (n + z²)
    low, high = wilson_interval(15, 15)
    assert high == 1.0 and abs(low - 15 / (15 + 1.96**2)) < 1e-12 and abs(low - 0.796) < 1e-3
    low, high = wilson_interval(0, 15)
    assert low == 0.0 and abs(high - (1 - 15 / (15 + 1.96**2))) < 1e-12
    low, high = wilson_interval(50, 100)  # symmetric about 1/2
    assert abs((low + high) / 2 - 0.5) < 1e-12 and abs(high - 0.5 - 0.0962) < 1e-3
    with pytest.raises(ValueError):
        wilson_interval(3, 2)
