"""ANIL: only the head adapts; meta-gradient against finite differences (float64); with every
parameter as the head it is MAML; it learns Omniglot."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from metarun.algorithms.anil import ANIL
from metarun.algorithms.inner_loop import adapt, forward, task_loss
from metarun.algorithms.maml import MAML
from metarun.build import build
from metarun.errors import ConfigError
from metarun.models.conv4 import Conv4
from metarun.models.mlp import MLP
from tests.algorithms.learning import (
    assert_learns,
    finite_difference,
    meta_gradient,
    meta_loss_value,
    meta_train,
    tiny_batch,
)


def tiny_mlp(seed: int = 0) -> nn.Module:
    """1-4-4-1 tanh network: body ``0.`` and ``2.``, head ``4.``."""
    g = torch.Generator().manual_seed(seed)
    net = nn.Sequential(nn.Linear(1, 4), nn.Tanh(), nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 1))
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return net.double()


@pytest.mark.parametrize("steps", [1, 3])
def test_meta_gradient_matches_finite_differences(steps):
    """Second order: the body's gradient includes the path through the head's inner updates."""
    batch = tiny_batch()
    alg = ANIL(tiny_mlp(), inner_lr=0.1, inner_steps=steps, test_inner_steps=steps, head_prefix="4.")
    expected = finite_difference(meta_loss_value(alg, batch), alg.parameters())
    torch.testing.assert_close(meta_gradient(alg, batch), expected, rtol=1e-6, atol=1e-8)


def test_only_the_head_adapts_and_the_query_sees_the_initial_body():
    batch = tiny_batch(tasks=1)
    task = batch.task(0)
    alg = ANIL(tiny_mlp(), inner_lr=0.1, inner_steps=2, test_inner_steps=2, head_prefix="4.")
    theta = dict(alg.model.named_parameters())
    head, body = alg.split(theta)
    assert set(head) == {"4.weight", "4.bias"}
    assert set(body) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    adapted = alg.adapt_head(head, body, task.support_x, task.support_y, 2, first_order=False)
    assert set(adapted) == set(head)  # the adapted dict holds only head keys
    assert not torch.equal(adapted["4.weight"], head["4.weight"])
    # the query logits of meta_loss are the model at (θ_body exactly, θ′_head)
    expected = forward(alg.model, {**body, **adapted}, task.query_x)
    torch.testing.assert_close(alg.meta_loss(batch).query_logits[0], expected.detach(), rtol=0, atol=0)


def test_first_order_body_gradient_is_the_query_gradient_at_the_initial_body():
    """With first_order, θ′_head is a constant: dL_q/dθ_body = ∂L_q(θ_body, θ′_head)/∂θ_body."""
    batch = tiny_batch()
    alg = ANIL(tiny_mlp(), inner_lr=0.1, inner_steps=2, test_inner_steps=2, first_order=True, head_prefix="4.")
    names = [name for name, _ in alg.model.named_parameters()]
    expected = {name: torch.zeros_like(p) for name, p in alg.model.named_parameters()}
    for i in range(len(batch)):
        task = batch.task(i)
        theta = {k: v.detach().requires_grad_() for k, v in alg.model.named_parameters()}
        head, body = alg.split(theta)
        adapted = adapt(alg.model, head, task.support_x, task.support_y, 2, 0.1, True, fixed=body)
        adapted = {k: v.detach().requires_grad_() for k, v in adapted.items()}
        loss = task_loss(forward(alg.model, adapted, task.query_x, fixed=body), task.query_y)
        inputs = {**body, **adapted}
        for name, g in zip(inputs, torch.autograd.grad(loss, list(inputs.values()))):
            expected[name] += g / len(batch)
    torch.testing.assert_close(
        meta_gradient(alg, batch), torch.cat([expected[n].flatten() for n in names]), rtol=1e-10, atol=1e-12
    )


@pytest.mark.parametrize("first_order", [False, True])
def test_every_parameter_as_the_head_is_maml(first_order):
    batch = tiny_batch()
    anil = ANIL(tiny_mlp(), 0.1, 2, 2, first_order=first_order, head_prefix="")
    maml = MAML(tiny_mlp(), 0.1, 2, 2, first_order=first_order)
    torch.testing.assert_close(anil.meta_loss(batch).loss, maml.meta_loss(batch).loss, rtol=0, atol=0)
    torch.testing.assert_close(meta_gradient(anil, batch), meta_gradient(maml, batch), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(anil.predict(batch).query_logits, maml.predict(batch).query_logits, rtol=0, atol=0)


def test_predict_adapts_the_head_and_writes_no_parameter():
    batch = tiny_batch()
    alg = ANIL(tiny_mlp(), inner_lr=0.05, inner_steps=1, test_inner_steps=10, head_prefix="4.")
    before = [p.detach().clone() for p in alg.parameters()]
    alg.meta_loss(batch)
    out = alg.predict(batch)
    for p, q in zip(alg.parameters(), before):
        assert torch.equal(p, q)
    after_mse = (out.query_logits - batch.query_y).pow(2).mean()
    before_mse = (out.query_logits_before - batch.query_y).pow(2).mean()
    assert after_mse < before_mse


def test_head_prefix_must_match_a_parameter():
    assert ANIL(MLP(hidden=(40, 40)), 0.1, 1, 1, head_prefix="net.4.").head_names == ["net.4.weight", "net.4.bias"]
    with pytest.raises(ConfigError, match=r"algorithm\.head_prefix='head\.'.*net\.4\."):
        ANIL(MLP(hidden=(40, 40)), 0.1, 1, 1)
    with pytest.raises(ConfigError, match=r"model\.out_features"):
        ANIL(Conv4(hidden=8), 0.1, 1, 1)  # an embedding network has no head
    assert ANIL(Conv4(hidden=8, out_features=5), 0.1, 1, 1).head_names == ["head.weight", "head.bias"]


@pytest.mark.parametrize(
    "key, kwargs",
    [
        ("algorithm.inner_lr", {"inner_lr": 0.0}),
        ("algorithm.inner_steps", {"inner_steps": 0}),
        ("algorithm.test_inner_steps", {"test_inner_steps": -1}),
    ],
)
def test_bad_settings_name_the_key(key, kwargs):
    settings = {"inner_lr": 0.1, "inner_steps": 1, "test_inner_steps": 1} | kwargs
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        ANIL(tiny_mlp(), head_prefix="4.", **settings)


@pytest.mark.slow
def test_learns_omniglot_5way_1shot(omniglot_available, make_config):
    """80 outer steps of 4 tasks, Conv4 with 16 channels; 100 fixed 5-way 1-shot test episodes.

    Measured: 0.40 before training (random body, adapted head), 0.75 after (threshold 0.55).
    """
    cfg = make_config(
        "dataset=omniglot",
        "algorithm=anil",
        "model.hidden=16",
        "sampler.meta_batch_size=4",
        "sampler.train_queries=1",
        "sampler.queries=1",
        "algorithm.inner_lr=0.4",
        "algorithm.inner_steps=3",
        "algorithm.test_inner_steps=5",
    )
    objects = build(cfg)
    alg, sampler = objects["algorithm"], objects["sampler"]
    splits = objects["datamodule"].splits
    assert_learns(
        alg,
        sampler,
        splits["test"],
        lambda: meta_train(alg, sampler, splits["train"], steps=80, lr=0.005),
        at_least=0.55,
        gain=0.15,
    )
