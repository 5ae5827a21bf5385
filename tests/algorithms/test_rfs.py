"""RFS: the logistic regression head is scikit-learn's minimiser, and never reads query labels."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from metarun.algorithms.rfs import RFS, fit_logistic_regression, logistic_regression_objective
from metarun.episodes import Episode, collate_episodes
from metarun.errors import ConfigError


class Pixels(nn.Module):
    embedding_dim = 5
    head = None

    def forward(self, x):
        return x.flatten(1)  # [M, 5]


def test_fitted_head_is_the_stationary_point_of_the_objective():
    """Gradient of ½‖W‖² + C·ΣCE at the solution is zero (float64), and Newton's method, an
    independent solver, reaches the same weights."""
    g = torch.Generator().manual_seed(0)
    x = F.normalize(torch.randn(9, 5, generator=g, dtype=torch.float64), dim=-1)
    y = torch.tensor([0, 1, 2] * 3)
    weight, bias = fit_logistic_regression(x, y, 3, inverse_penalty=2.0)
    w, b = weight.clone().requires_grad_(), bias.clone().requires_grad_()
    grads = torch.autograd.grad(logistic_regression_objective(w, b, x, y, 2.0), [w, b])
    assert max(gr.abs().max().item() for gr in grads) < 1e-6

    theta = torch.zeros(3 * 5 + 3, dtype=torch.float64)  # Newton from zero on the same objective

    def objective(t):
        return logistic_regression_objective(t[:15].view(3, 5), t[15:], x, y, 2.0)

    for _ in range(30):
        grad = torch.autograd.functional.jacobian(objective, theta)
        hess = torch.autograd.functional.hessian(objective, theta)
        theta = theta - torch.linalg.lstsq(hess, grad[:, None]).solution[:, 0]  # the bias makes H singular along 1
    newton_logits = x @ theta[:15].view(3, 5).T + theta[15:]
    torch.testing.assert_close(x @ weight.T + bias, newton_logits, rtol=1e-6, atol=1e-6)


def test_predictions_use_normalised_support_features_and_ignore_query_labels():
    g = torch.Generator().manual_seed(1)
    episode = Episode(
        torch.randn(6, 1, 1, 5, generator=g),
        torch.tensor([0, 1, 2, 0, 1, 2]),
        torch.randn(4, 1, 1, 5, generator=g),
        torch.tensor([0, 1, 2, 0]),
    )
    alg = RFS(Pixels(), num_train_classes=3)
    out = alg.predict(collate_episodes([episode]))
    support = F.normalize(episode.support_x.flatten(1).double(), dim=-1)
    weight, bias = fit_logistic_regression(support, episode.support_y, 3)
    expected = F.normalize(episode.query_x.flatten(1).double(), dim=-1) @ weight.T + bias
    torch.testing.assert_close(out.query_logits[0], expected.float())
    episode.query_y = torch.tensor([2, 2, 0, 1])  # scrambled query labels: the same predictions
    assert torch.equal(alg.predict(collate_episodes([episode])).query_logits, out.query_logits)


def test_bad_settings_are_refused():
    with pytest.raises(ConfigError, match="algorithm.inverse_penalty=0 is not allowed"):
        RFS(Pixels(), num_train_classes=3, inverse_penalty=0)
    with pytest.raises(ConfigError, match="algorithm.max_iter=0 is not allowed"):
        RFS(Pixels(), num_train_classes=3, max_iter=0)
