"""MAML's meta-gradient against finite differences (float64); FOMAML's first-order rule."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from metarun.algorithms.inner_loop import adapt, forward, task_loss
from metarun.algorithms.maml import MAML
from metarun.errors import ConfigError
from tests.algorithms.learning import finite_difference, meta_gradient, meta_loss_value, tiny_batch


def tiny_mlp(seed: int = 0) -> nn.Module:
    with torch.random.fork_rng(devices=[]):  # seeded initialisation, global RNG untouched
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(1, 4), nn.Tanh(), nn.Linear(4, 1)).double()


@pytest.mark.parametrize("steps", [1, 3])
def test_second_order_meta_gradient_matches_finite_differences(steps):
    batch = tiny_batch()
    alg = MAML(tiny_mlp(), inner_lr=0.1, inner_steps=steps, test_inner_steps=steps)
    expected = finite_difference(meta_loss_value(alg, batch), alg.parameters())
    torch.testing.assert_close(meta_gradient(alg, batch), expected, rtol=1e-6, atol=1e-8)


def test_first_order_gradient_is_query_gradient_at_adapted_parameters():
    """FOMAML: dL_q(θ′)/dθ is replaced by ∇L_q evaluated at θ′ (dθ′/dθ = I)."""
    batch = tiny_batch()
    alg = MAML(tiny_mlp(), inner_lr=0.1, inner_steps=2, test_inner_steps=2, first_order=True)
    expected = torch.zeros(sum(p.numel() for p in alg.parameters()), dtype=torch.float64)
    for i in range(len(batch)):
        task = batch.task(i)
        theta = {k: v.detach().requires_grad_() for k, v in alg.model.named_parameters()}
        adapted = adapt(alg.model, theta, task.support_x, task.support_y, 2, 0.1, first_order=True)
        adapted = {k: v.detach().requires_grad_() for k, v in adapted.items()}
        loss = task_loss(forward(alg.model, adapted, task.query_x), task.query_y)
        expected += torch.cat([g.flatten() for g in torch.autograd.grad(loss, list(adapted.values()))])
    expected /= len(batch)
    torch.testing.assert_close(meta_gradient(alg, batch), expected, rtol=1e-10, atol=1e-12)
    second = MAML(tiny_mlp(), inner_lr=0.1, inner_steps=2, test_inner_steps=2)
    assert not torch.allclose(meta_gradient(second, batch), expected, rtol=1e-4, atol=1e-6)


def test_closed_form_on_a_linear_model():
    """f(x) = w·x with MSE: θ′ = θ − α∇L_s, and dL_q(θ′)/dθ = (1 − α ∂²L_s/∂θ²)·∂L_q/∂θ′."""
    model = nn.Linear(1, 1, bias=False).double()
    with torch.no_grad():
        model.weight.fill_(0.7)
    batch = tiny_batch(tasks=1)
    task = batch.task(0)
    alpha, w = 0.05, 0.7
    xs, ys, xq, yq = task.support_x[:, 0], task.support_y[:, 0], task.query_x[:, 0], task.query_y[:, 0]
    grad_s = 2 * ((w * xs - ys) * xs).mean()
    hess_s = 2 * (xs * xs).mean()
    w_adapted = w - alpha * grad_s
    grad_q = 2 * ((w_adapted * xq - yq) * xq).mean()
    alg = MAML(model, inner_lr=alpha, inner_steps=1, test_inner_steps=1)
    torch.testing.assert_close(meta_gradient(alg, batch)[0], (1 - alpha * hess_s) * grad_q)


def test_inner_loop_is_pure_and_predict_adapts():
    batch = tiny_batch()
    alg = MAML(tiny_mlp(), inner_lr=0.1, inner_steps=1, test_inner_steps=5)
    before = [p.detach().clone() for p in alg.parameters()]
    alg.meta_loss(batch)
    out = alg.predict(batch)
    for p, q in zip(alg.parameters(), before):
        assert torch.equal(p, q)
    after_mse = (out.query_logits - batch.query_y).pow(2).mean()
    before_mse = (out.query_logits_before - batch.query_y).pow(2).mean()
    assert after_mse < before_mse
    assert out.query_logits.shape == batch.query_y.shape


@pytest.mark.parametrize(
    "key, kwargs",
    [
        ("algorithm.inner_lr", {"inner_lr": 0.0}),
        ("algorithm.inner_lr", {"inner_lr": -0.1}),
        ("algorithm.inner_steps", {"inner_steps": 0}),
        ("algorithm.test_inner_steps", {"test_inner_steps": -1}),
    ],
)
def test_bad_settings_name_the_key(key, kwargs):
    settings = {"inner_lr": 0.1, "inner_steps": 1, "test_inner_steps": 1} | kwargs
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        MAML(tiny_mlp(), **settings)


def test_head_size_fixes_the_test_ways():
    alg = MAML(tiny_mlp(), inner_lr=0.1, inner_steps=1, test_inner_steps=1)
    alg.check_episode_shape(5, 5)
    with pytest.raises(ConfigError, match="sampler.ways=20"):
        alg.check_episode_shape(5, 20)
