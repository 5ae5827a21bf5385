"""MetaOptNet: the SVM dual's projection and solution against an independent solver, its KKT
conditions, the implicit meta-gradient against finite differences, learning on Omniglot."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.optimize import minimize
from torch import nn

from metarun.algorithms.metaoptnet import MetaOptNet, project_rows, svm_dual
from metarun.errors import ConfigError
from tests.algorithms.learning import finite_difference, meta_gradient, meta_loss_value
from tests.algorithms.test_meta_baseline import random_batch

C, RIDGE = 0.1, 1.0


def scipy_dual(q: np.ndarray, onehot: np.ndarray, c: float) -> np.ndarray:
    """The same dual by SciPy's SLSQP: min ½ Σ_k τ_kᵀ Q τ_k − Σ τ·Y, τ ≤ C·Y, rows sum to 0."""
    n, ways = onehot.shape

    def objective(t: np.ndarray) -> float:
        tau = t.reshape(n, ways)
        return 0.5 * np.einsum("ik,ij,jk->", tau, q, tau) - (tau * onehot).sum()

    def gradient(t: np.ndarray) -> np.ndarray:
        return (q @ t.reshape(n, ways) - onehot).ravel()

    rows = {
        "type": "eq",
        "fun": lambda t: t.reshape(n, ways).sum(1),
        "jac": lambda t: np.kron(np.eye(n), np.ones((1, ways))),
    }
    bounds = [(None, b) for b in (c * onehot).ravel()]
    options = {"ftol": 1e-15, "maxiter": 2000}
    res = minimize(
        objective, np.zeros(n * ways), jac=gradient, constraints=[rows], bounds=bounds, method="SLSQP", options=options
    )
    return res.x.reshape(n, ways)


def problem(shots: int, ways: int, dim: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = 3 * torch.randn(2, shots * ways, dim, generator=g, dtype=torch.float64)
    y = torch.arange(ways).repeat(shots)[None].expand(2, -1)
    return x @ x.transpose(1, 2), y


def test_projection_is_the_closest_point_of_the_constraint_set():
    g = torch.Generator().manual_seed(0)
    v = torch.randn(6, 5, generator=g, dtype=torch.float64)
    upper = torch.zeros_like(v)
    upper[torch.arange(6), torch.arange(6) % 5] = 0.3
    p = project_rows(v, upper)
    for row in range(6):
        res = minimize(
            lambda t, r=row: ((t - v[r].numpy()) ** 2).sum(),
            np.zeros(5),
            constraints=[{"type": "eq", "fun": np.sum}],
            bounds=[(None, b) for b in upper[row].numpy()],
            method="SLSQP",
            options={"ftol": 1e-15},
        )
        np.testing.assert_allclose(p[row].numpy(), res.x, atol=1e-7)


@pytest.mark.parametrize("shots, ways, dim", [(1, 5, 16), (2, 3, 4), (3, 5, 64)])
def test_solution_satisfies_kkt_and_equals_an_independent_solver(shots, ways, dim):
    kernel, y = problem(shots, ways, dim)
    tau = svm_dual(kernel, y, ways, C, RIDGE, steps=100)  # [2, n, N]
    q = kernel + RIDGE * torch.eye(kernel.shape[-1], dtype=torch.float64)
    onehot = F.one_hot(y, ways).double()
    upper = C * onehot
    grad = q @ tau - onehot  # the objective's gradient, [2, n, N]
    free = tau < upper - 1e-9
    # stationarity: grad + ν_i + μ_ik = 0 with μ_ik = 0 on free entries, so ν_i = −grad on them
    nu = torch.stack([torch.stack([-grad[b, i][free[b, i]].mean() for i in range(y.shape[1])]) for b in range(2)])
    mu = -(grad + nu[..., None])
    assert mu[free].abs().max() < 1e-6  # stationarity
    assert mu.min() > -1e-6  # dual feasibility
    assert (tau - upper).max() < 1e-6 and tau.sum(-1).abs().max() < 1e-6  # primal feasibility
    assert (mu * (tau - upper)).abs().max() < 1e-6  # complementary slackness
    for b in range(2):
        np.testing.assert_allclose(tau[b].numpy(), scipy_dual(q[b].numpy(), onehot[b].numpy(), C), atol=1e-6)


def test_meta_gradient_matches_finite_differences_and_not_the_solver_steps():
    """Implicit differentiation through the KKT conditions (float64): the gradient equals
    central differences of the whole meta-loss, and is the same after 30 or 300 solver steps."""
    torch.manual_seed(0)
    batch = random_batch(3)
    alg = MetaOptNet(nn.Sequential(nn.Flatten(), nn.Linear(5, 8)), solver_steps=30, scale=2.0).double()
    params = list(alg.parameters())
    grad = meta_gradient(alg, batch, params)
    torch.testing.assert_close(grad, finite_difference(meta_loss_value(alg, batch), params), rtol=1e-5, atol=1e-8)
    alg.solver_steps = 300
    torch.testing.assert_close(meta_gradient(alg, batch, params), grad, rtol=1e-9, atol=1e-12)


def test_bad_settings_are_refused():
    for key, value, match in [
        ("c", 0, "algorithm.c=0 is not allowed"),
        ("kernel_ridge", -1, "algorithm.kernel_ridge=-1 is not allowed"),
        ("solver_steps", 0, "algorithm.solver_steps=0 is not allowed"),
        ("label_smoothing", 1.5, "algorithm.label_smoothing=1.5 is not allowed"),
    ]:
        with pytest.raises(ConfigError, match=match):
            MetaOptNet(nn.Flatten(), **{key: value})


@pytest.mark.slow
def test_learns_omniglot_5way_1shot(omniglot_available, make_config):
    """60 Adam steps of 8 tasks, 5-way 1-shot, from scratch (Conv4, 32 channels), against
    the untrained network on the same 100 fixed test episodes. Measured: 0.500 -> 0.784."""
    from tests.algorithms.learning import check_episodic_head_learns_omniglot

    check_episodic_head_learns_omniglot(make_config, "metaoptnet")
