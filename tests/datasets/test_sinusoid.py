"""Sinusoid regression tasks (Finn et al. 2017, section 5.1): the contract, the task family
within its ranges, y = A sin(x − φ) exactly, and the one-way refusal."""

from __future__ import annotations

import pytest
import torch

from metarun.datasets.base import Dataset
from metarun.datasets.sinusoid import Sinusoid
from metarun.errors import ConfigError


def test_states_its_kind_and_draws_tasks_of_the_family() -> None:
    data = Sinusoid()
    assert isinstance(data, Dataset) and data.kind == "regression" and data.has_curve and not data.takes_images
    assert data.class_count("train") == 0 and data.split("test") is data
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        ep = data.episode(g, 1, 10, 5)
        amplitude, phase = ep.task_params.tolist()
        assert 0.1 <= amplitude <= 5.0 and 0.0 <= phase <= torch.pi
        assert ep.support_x.shape == (10, 1) and ep.query_y.shape == (5, 1)
        assert ep.support_x.min() >= -5.0 and ep.support_x.max() <= 5.0
        torch.testing.assert_close(ep.support_y, amplitude * torch.sin(ep.support_x - phase))


def test_same_generator_same_task() -> None:
    a = Sinusoid().episode(torch.Generator().manual_seed(3), 1, 4, 4)
    b = Sinusoid().episode(torch.Generator().manual_seed(3), 1, 4, 4)
    assert torch.equal(a.support_x, b.support_x) and torch.equal(a.task_params, b.task_params)


def test_bad_ranges_and_shapes_are_one_sentence() -> None:
    with pytest.raises(ConfigError, match=r"dataset.amplitude_min=5 is not allowed: it must be smaller"):
        Sinusoid(amplitude_min=5, amplitude_max=1)
    with pytest.raises(ConfigError, match=r"sampler.ways=2 is not allowed for sinusoid regression"):
        Sinusoid().check_episode(2, 5, 5, "sampler.")
