"""R2-D2: the closed-form ridge solve (both forms) against least squares, its meta-gradient
against finite differences, learning on Omniglot."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from metarun.algorithms.r2d2 import R2D2, r2d2_logits, ridge_weights
from metarun.errors import ConfigError
from metarun.models.conv4 import Conv4
from tests.algorithms.learning import finite_difference, meta_gradient, meta_loss_value
from tests.algorithms.test_meta_baseline import random_batch


@pytest.mark.parametrize("n, d", [(6, 9), (9, 4)])  # fewer examples than features (Woodbury), and more
def test_ridge_solve_equals_least_squares_and_the_normal_equations(n, d):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(2, n, d, generator=g, dtype=torch.float64)
    y = torch.randn(2, n, 3, generator=g, dtype=torch.float64)
    lam = torch.tensor(0.7, dtype=torch.float64)
    w = ridge_weights(x, y, lam)  # [2, d, 3]
    normal = torch.linalg.solve(x.transpose(1, 2) @ x + lam * torch.eye(d, dtype=torch.float64), x.transpose(1, 2) @ y)
    # ridge regression is least squares on X stacked over sqrt(lambda) I, Y over 0
    stacked_x = torch.cat([x, math.sqrt(0.7) * torch.eye(d, dtype=torch.float64).expand(2, d, d)], 1)
    stacked_y = torch.cat([y, torch.zeros(2, d, 3, dtype=torch.float64)], 1)
    lstsq = torch.linalg.lstsq(stacked_x, stacked_y).solution
    torch.testing.assert_close(w, normal, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(w, lstsq, rtol=1e-10, atol=1e-12)


def test_logits_are_the_scaled_ridge_regression_with_a_bias_column():
    batch = random_batch()
    alg = R2D2(nn.Flatten(), ridge=2.0, scale=3.0, bias=0.5).double()
    out = alg.meta_loss(batch)
    support, query = batch.support_x.flatten(2), batch.query_x.flatten(2)  # [B, 6, 5], [B, 4, 5]
    for b in range(2):
        x = torch.cat([support[b], torch.ones(6, 1, dtype=torch.float64)], 1) / math.sqrt(6)
        y = F.one_hot(batch.support_y[b], 3).double() / math.sqrt(6)
        w = torch.linalg.solve(x.T @ x + 2.0 * torch.eye(6, dtype=torch.float64), x.T @ y)
        expected = 3.0 * torch.cat([query[b], torch.ones(4, 1, dtype=torch.float64)], 1) @ w + 0.5
        torch.testing.assert_close(out.query_logits[b], expected, rtol=1e-7, atol=1e-9)
    raw = r2d2_logits(support, batch.support_y, query, 3, torch.tensor(2.0, dtype=torch.float64))
    torch.testing.assert_close(out.query_logits, 3.0 * raw + 0.5)


def test_meta_gradient_matches_finite_differences():
    """Backbone, scale, bias and a learned ridge, through the closed-form solve (float64)."""
    torch.manual_seed(0)
    batch = random_batch(2)
    alg = R2D2(nn.Sequential(nn.Flatten(), nn.Linear(5, 8)), ridge=0.5, learn_ridge=True, scale=2.0).double()
    params = list(alg.parameters())
    assert {n for n, _ in alg.named_parameters()} >= {"log_ridge", "scale", "bias"}
    torch.testing.assert_close(
        meta_gradient(alg, batch, params), finite_difference(meta_loss_value(alg, batch), params), rtol=1e-5, atol=1e-8
    )


def test_bad_settings_are_refused():
    with pytest.raises(ConfigError, match="algorithm.ridge=0 is not allowed"):
        R2D2(nn.Flatten(), ridge=0)
    with pytest.raises(ConfigError, match="algorithm.scale=-1 is not allowed"):
        R2D2(nn.Flatten(), scale=-1)
    with pytest.raises(ConfigError, match="model.out_features is not allowed to be set for R2D2"):
        R2D2(Conv4(hidden=4, out_features=5))


@pytest.mark.slow
def test_learns_omniglot_5way_1shot(omniglot_available, make_config):
    """60 Adam steps of 8 tasks, 5-way 1-shot, from scratch (Conv4, 32 channels), against
    the untrained network on the same 100 fixed test episodes. Measured: 0.390 -> 0.778."""
    from tests.algorithms.learning import check_episodic_head_learns_omniglot

    check_episodic_head_learns_omniglot(make_config, "r2d2")
