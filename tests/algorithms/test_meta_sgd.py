"""Meta-SGD: equal rates are MAML; the rates' gradient against finite differences and a closed
form (float64); it learns Omniglot."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from metarun.algorithms.inner_loop import forward, task_loss
from metarun.algorithms.maml import MAML
from metarun.algorithms.meta_sgd import MetaSGD
from metarun.build import build
from metarun.errors import ConfigError
from metarun.models.conv4 import Conv4
from tests.algorithms.learning import (
    assert_learns,
    finite_difference,
    meta_gradient,
    meta_loss_value,
    meta_train,
    tiny_batch,
)


def tiny_mlp(seed: int = 0) -> nn.Module:
    with torch.random.fork_rng(devices=[]):  # seeded initialisation, global RNG untouched
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(1, 4), nn.Tanh(), nn.Linear(4, 1)).double()


def model_grads(alg) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in alg.model.parameters()])


def rate_grads(alg: MetaSGD) -> torch.Tensor:
    return torch.cat([lr.grad.flatten() for lr in alg.learning_rates().values()])


@pytest.mark.parametrize("steps, first_order", [(1, False), (3, False), (2, True)])
def test_equal_rates_are_maml(steps, first_order):
    batch = tiny_batch()
    sgd = MetaSGD(tiny_mlp(), init_inner_lr=0.1, inner_steps=steps, test_inner_steps=steps, first_order=first_order)
    maml = MAML(tiny_mlp(), inner_lr=0.1, inner_steps=steps, test_inner_steps=steps, first_order=first_order)
    out_sgd, out_maml = sgd.meta_loss(batch), maml.meta_loss(batch)
    torch.testing.assert_close(out_sgd.loss, out_maml.loss, rtol=1e-14, atol=0)
    out_sgd.loss.backward()
    out_maml.loss.backward()
    torch.testing.assert_close(model_grads(sgd), model_grads(maml), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(sgd.predict(batch).query_logits, maml.predict(batch).query_logits, rtol=1e-14, atol=0)


@pytest.mark.parametrize("steps", [1, 2])
def test_meta_gradient_matches_finite_differences(steps):
    """w.r.t. θ and every learned rate, second order, rates no longer equal."""
    batch = tiny_batch()
    alg = MetaSGD(tiny_mlp(), init_inner_lr=0.1, inner_steps=steps, test_inner_steps=steps)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for lr in alg.inner_lrs.values():
            lr.copy_(torch.empty(lr.shape, dtype=lr.dtype).uniform_(0.005, 0.1, generator=g))
    torch.testing.assert_close(
        meta_gradient(alg, batch),
        finite_difference(meta_loss_value(alg, batch), alg.parameters()),
        rtol=1e-6,
        atol=1e-8,
    )


def test_one_step_rate_gradient_closed_form():
    """θ′ = θ − α∘g_s, so dL_q(θ′)/dα = −g_q(θ′) ∘ g_s(θ) (mean over tasks)."""
    batch = tiny_batch()
    alg = MetaSGD(tiny_mlp(), init_inner_lr=0.05, inner_steps=1, test_inner_steps=1)
    alg.meta_loss(batch).loss.backward()
    expected = torch.zeros(sum(p.numel() for p in alg.model.parameters()), dtype=torch.float64)
    for i in range(len(batch)):
        task = batch.task(i)
        theta = {k: v.detach().requires_grad_() for k, v in alg.model.named_parameters()}
        g_s = torch.autograd.grad(
            task_loss(forward(alg.model, theta, task.support_x), task.support_y), list(theta.values())
        )
        adapted = {k: (v - 0.05 * g).detach().requires_grad_() for (k, v), g in zip(theta.items(), g_s)}
        g_q = torch.autograd.grad(
            task_loss(forward(alg.model, adapted, task.query_x), task.query_y), list(adapted.values())
        )
        expected -= torch.cat([(a * b).flatten() for a, b in zip(g_q, g_s)]) / len(batch)
    torch.testing.assert_close(rate_grads(alg), expected, rtol=1e-10, atol=1e-12)


def test_one_rate_tensor_per_parameter_learned_jointly():
    model = Conv4(hidden=8, out_features=5)
    alg = MetaSGD(model, init_inner_lr=0.4, inner_steps=1, test_inner_steps=1)
    rates = alg.learning_rates()
    assert list(rates) == [name for name, _ in model.named_parameters()]
    assert "features__0__weight" in alg.inner_lrs  # ParameterDict keys may not hold dots
    for name, p in model.named_parameters():
        assert rates[name].shape == p.shape and torch.all(rates[name] == 0.4)
    learned = {id(p) for p in alg.parameters()}
    assert all(id(r) in learned for r in rates.values())  # the optimiser sees the rates
    assert sum(p.numel() for p in alg.parameters()) == 2 * sum(p.numel() for p in model.parameters())


def test_predict_writes_no_parameter_and_adapts():
    batch = tiny_batch()
    alg = MetaSGD(tiny_mlp(), init_inner_lr=0.02, inner_steps=1, test_inner_steps=5)
    before = [p.detach().clone() for p in alg.parameters()]
    out = alg.predict(batch)
    for p, q in zip(alg.parameters(), before):
        assert torch.equal(p, q)
    assert (out.query_logits - batch.query_y).pow(2).mean() < (out.query_logits_before - batch.query_y).pow(2).mean()


@pytest.mark.parametrize(
    "key, kwargs",
    [
        ("algorithm.init_inner_lr", {"init_inner_lr": 0.0}),
        ("algorithm.init_inner_lr", {"init_inner_lr": -0.1}),
        ("algorithm.inner_steps", {"inner_steps": 0}),
        ("algorithm.test_inner_steps", {"test_inner_steps": 0}),
    ],
)
def test_bad_settings_name_the_key(key, kwargs):
    settings = {"init_inner_lr": 0.1, "inner_steps": 1, "test_inner_steps": 1} | kwargs
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        MetaSGD(tiny_mlp(), **settings)


def test_head_size_fixes_the_test_ways():
    alg = MetaSGD(tiny_mlp(), 0.1, 1, 1)
    alg.check_episode_shape(5, 5)
    with pytest.raises(ConfigError, match="sampler.ways=20"):
        alg.check_episode_shape(5, 20)


@pytest.mark.slow
def test_learns_omniglot_5way_1shot(omniglot_available, make_config):
    """80 outer steps of 4 tasks, Conv4 with 16 channels, one inner step as in Li et al.;
    100 fixed 5-way 1-shot test episodes.

    Measured: 0.25 before training, 0.59 after (threshold 0.45).
    """
    cfg = make_config(
        "dataset=omniglot",
        "algorithm=meta_sgd",
        "model.hidden=16",
        "sampler.meta_batch_size=4",
        "sampler.train_queries=1",
        "sampler.queries=1",
        "algorithm.init_inner_lr=0.4",
    )
    objects = build(cfg)
    alg, sampler = objects["algorithm"], objects["sampler"]
    splits = objects["datamodule"].splits
    assert_learns(
        alg,
        sampler,
        splits["test"],
        lambda: meta_train(alg, sampler, splits["train"], steps=80, lr=0.005),
        at_least=0.45,
        gain=0.15,
    )
