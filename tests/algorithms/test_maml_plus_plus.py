"""MAML++: the MAML special case, the multi-step loss and its annealing, derivative-order
annealing, per-step batch norm and learned per-step rates; the meta-gradient against finite
differences (float64); it learns Omniglot."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from metarun.algorithms.inner_loop import adapt, forward, task_loss
from metarun.algorithms.maml import MAML
from metarun.algorithms.maml_plus_plus import MAMLPlusPlus, multi_step_loss_weights
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


def tiny_mlp(seed: int = 0, norm: str | None = None) -> nn.Module:
    """1-4-1 tanh network; ``norm``: None, "batch" (batch statistics) or "running"."""
    with torch.random.fork_rng(devices=[]):  # seeded initialisation, global RNG untouched
        torch.manual_seed(seed)
        layers = [nn.Linear(1, 4)]
        if norm is not None:
            layers.append(nn.BatchNorm1d(4, track_running_stats=norm == "running"))
        return nn.Sequential(*layers, nn.Tanh(), nn.Linear(4, 1)).double()


def as_maml(model: nn.Module, steps: int, **kwargs) -> MAMLPlusPlus:
    """MAML++ with every addition switched off."""
    settings = dict(multi_step_loss_epochs=0, first_order_epochs=0, learn_inner_lr=False, per_step_bn=False) | kwargs
    return MAMLPlusPlus(model, 0.1, steps, steps, **settings)


def backward_grads(alg, batch) -> torch.Tensor:
    return meta_gradient(alg, batch, alg.model.parameters())


# ------------------------------------------------------------------ multi-step loss weights


@pytest.mark.parametrize("steps, epochs", [(1, 10), (2, 1), (5, 10), (5, 15)])
def test_msl_weights_sum_to_one_and_anneal_towards_the_last_step(steps, epochs):
    floor = 0.03 / steps
    history = [multi_step_loss_weights(steps, e, epochs) for e in range(2 * epochs + 2)]
    assert history[0] == pytest.approx([1 / steps] * steps)  # uniform at the start
    for w in history:
        assert sum(w) == pytest.approx(1.0, abs=1e-12)
        assert all(v >= floor - 1e-15 for v in w[:-1])
    for earlier, later in zip(history, history[1:]):
        assert all(b <= a for a, b in zip(earlier[:-1], later[:-1]))  # non-final decay
        assert later[-1] >= earlier[-1]  # the last step gains what they lose
    # at the end of annealing the non-final steps sit on the floor
    assert history[epochs] == pytest.approx([floor] * (steps - 1) + [1 - (steps - 1) * floor])


def test_msl_weights_by_hand():
    # 5 steps, 10 epochs: decay 1/5/10 = 0.02 per epoch, floor 0.006
    assert multi_step_loss_weights(5, 3, 10) == pytest.approx([0.14] * 4 + [0.44])
    assert multi_step_loss_weights(5, 9, 10) == pytest.approx([0.02] * 4 + [0.92])
    assert multi_step_loss_weights(5, 10, 10) == pytest.approx([0.006] * 4 + [0.976])


def test_msl_switches_off_after_its_epochs():
    alg = MAMLPlusPlus(tiny_mlp(), 0.1, 3, 3, multi_step_loss_epochs=2, per_step_bn=False)
    assert alg.step_weights(0) == pytest.approx([1 / 3] * 3)
    assert alg.step_weights(1) is not None and alg.step_weights(2) is None
    off = MAMLPlusPlus(tiny_mlp(), 0.1, 3, 3, multi_step_loss_epochs=0, per_step_bn=False)
    assert off.step_weights(0) is None


def test_multi_step_loss_is_the_weighted_sum_of_every_steps_query_loss():
    batch = tiny_batch()
    alg = as_maml(tiny_mlp(), 3, multi_step_loss_epochs=10, steps_per_epoch=1)
    alg.outer_step.fill_(4)  # epoch 4
    weights = multi_step_loss_weights(3, 4, 10)
    theta = dict(alg.model.named_parameters())
    expected = 0.0
    for i in range(len(batch)):
        task = batch.task(i)
        for s, w in enumerate(weights):
            adapted = adapt(alg.model, theta, task.support_x, task.support_y, s + 1, 0.1, False)
            expected = expected + w * task_loss(forward(alg.model, adapted, task.query_x), task.query_y) / len(batch)
    expected_grads = torch.cat([g.flatten() for g in torch.autograd.grad(expected, list(theta.values()))])
    loss = alg.meta_loss(batch).loss
    torch.testing.assert_close(loss, expected, rtol=1e-13, atol=0)
    loss.backward()
    torch.testing.assert_close(
        torch.cat([p.grad.flatten() for p in alg.model.parameters()]), expected_grads, rtol=1e-11, atol=1e-13
    )


# ------------------------------------------------------------------ the MAML special case


@pytest.mark.parametrize("norm", [None, "batch"])
@pytest.mark.parametrize("steps, msl_epochs", [(1, 0), (1, 10), (3, 0)])
def test_fixed_rates_shared_norm_and_no_annealing_is_maml(norm, steps, msl_epochs):
    """One step (where MSL is a single weight of 1) or MSL off, fixed rates, shared batch
    norm (adapted in the inner loop, as MAML does): loss, gradients and predictions are MAML's."""
    batch = tiny_batch()
    plus = as_maml(tiny_mlp(norm=norm), steps, multi_step_loss_epochs=msl_epochs)
    maml = MAML(tiny_mlp(norm=norm), inner_lr=0.1, inner_steps=steps, test_inner_steps=steps)
    torch.testing.assert_close(plus.meta_loss(batch).loss, maml.meta_loss(batch).loss, rtol=1e-14, atol=0)
    torch.testing.assert_close(backward_grads(plus, batch), backward_grads(maml, batch), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(plus.predict(batch).query_logits, maml.predict(batch).query_logits, rtol=1e-13, atol=0)


# ------------------------------------------------------------------ derivative-order annealing


def test_first_order_during_the_first_epochs_then_second_order():
    batch = tiny_batch()
    alg = as_maml(tiny_mlp(), 2, first_order_epochs=1, steps_per_epoch=2)
    fomaml = MAML(tiny_mlp(), 0.1, 2, 2, first_order=True)
    maml = MAML(tiny_mlp(), 0.1, 2, 2)
    assert not torch.allclose(backward_grads(fomaml, batch), backward_grads(maml, batch))
    alg.train()
    for step in range(3):  # epoch 0, 0, 1
        assert int(alg.outer_step) == step and alg.uses_first_order(alg.epoch) == (step < 2)
        reference = fomaml if step < 2 else maml
        torch.testing.assert_close(backward_grads(alg, batch), backward_grads(reference, batch), rtol=1e-12, atol=1e-14)
        alg.end_outer_step()
    assert int(alg.outer_step) == 3


def test_the_step_counter_advances_once_per_outer_update_and_is_checkpointed():
    batch = tiny_batch()
    alg = as_maml(tiny_mlp(), 1, steps_per_epoch=2)
    alg.train()
    for _ in range(5):
        alg.meta_loss(batch)
        alg.end_outer_step()
    alg.eval()
    alg.meta_loss(batch)
    alg.predict(batch)
    assert int(alg.outer_step) == 5 and alg.epoch == 2
    state = alg.state_dict()
    assert int(state["outer_step"]) == 5
    fresh = as_maml(tiny_mlp(), 1, steps_per_epoch=2)
    fresh.load_state_dict(state)
    assert fresh.epoch == 2


# ------------------------------------------------------------------ full MAML++


def randomise(alg: MAMLPlusPlus, seed: int = 1) -> None:
    """Distinct rates and batch-norm rows per step, so a wrong index would show."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for lr in alg.inner_lrs.values():
            lr.copy_(torch.empty(lr.shape, dtype=lr.dtype).uniform_(0.02, 0.15, generator=g))
        for norm in alg.norms.values():
            shape = norm.weight.shape
            norm.weight.copy_(1 + 0.3 * torch.randn(shape, generator=g, dtype=torch.float64))
            norm.bias.copy_(0.3 * torch.randn(shape, generator=g, dtype=torch.float64))


def test_loss_by_hand_with_per_step_rates_and_norm_rows():
    """Σ_s w_s L_q(θ_{s+1}; bn_s), θ_{s+1} = θ_s − α_{p,s} ∇L_support(θ_s; bn_s), written out."""
    batch = tiny_batch()
    alg = MAMLPlusPlus(tiny_mlp(norm="batch"), 0.1, 2, 2, multi_step_loss_epochs=10, steps_per_epoch=1)
    alg.outer_step.fill_(6)
    randomise(alg)
    alg.eval()
    weights = multi_step_loss_weights(2, 6, 10)
    norm = alg.norms["1"]
    expected = 0.0
    for i in range(len(batch)):
        task = batch.task(i)
        theta = {k: v for k, v in alg.model.named_parameters() if k in alg.adapted_names}
        for s in range(2):
            bn = {"1.weight": norm.weight[s], "1.bias": norm.bias[s]}
            support = task_loss(forward(alg.model, theta, task.support_x, bn), task.support_y)
            g = torch.autograd.grad(support, list(theta.values()), create_graph=True)
            theta = {k: v - alg.inner_lrs[k.replace(".", "__")][s] * gk for (k, v), gk in zip(theta.items(), g)}
            query = task_loss(forward(alg.model, theta, task.query_x, bn), task.query_y)
            expected = expected + weights[s] * query / len(batch)
    torch.testing.assert_close(alg.meta_loss(batch).loss, expected, rtol=1e-13, atol=0)


@pytest.mark.parametrize("steps", [1, 2])
def test_meta_gradient_matches_finite_differences(steps):
    """MSL on, learned per-step rates, per-step batch norm, second order: the gradient w.r.t.
    θ, every rate and every batch-norm row."""
    batch = tiny_batch()
    alg = MAMLPlusPlus(tiny_mlp(norm="batch"), 0.1, steps, steps, multi_step_loss_epochs=10, steps_per_epoch=1)
    alg.outer_step.fill_(3)  # non-uniform weights at epoch 3
    randomise(alg)
    alg.eval()  # freezes the step counter (epoch 3); batch statistics either way
    params = [p for p in alg.parameters() if p.requires_grad]
    torch.testing.assert_close(
        meta_gradient(alg, batch, params), finite_difference(meta_loss_value(alg, batch), params), rtol=1e-6, atol=1e-8
    )


def test_per_step_batch_norm_parameters_and_running_statistics():
    batch = tiny_batch()
    model = tiny_mlp(norm="running")
    alg = MAMLPlusPlus(model, 0.1, 3, 5, multi_step_loss_epochs=10)
    norm = alg.norms["1"]
    assert norm.weight.shape == norm.bias.shape == norm.running_mean.shape == (3, 4)
    assert norm.num_batches_tracked.shape == (3,)
    # the backbone's own affine parameters are replaced, frozen, and never adapted
    assert not model[1].weight.requires_grad and not model[1].bias.requires_grad
    assert alg.adapted_names == ["0.weight", "0.bias", "3.weight", "3.bias"]
    assert set(alg.step_norm(2)) == {"1.weight", "1.bias", "1.running_mean", "1.running_var", "1.num_batches_tracked"}
    assert torch.equal(alg.step_norm(4)["1.weight"], norm.weight[2])  # test steps past S
    alg.train()
    alg.meta_loss(batch).loss.backward()
    # every row gets a gradient (MSL uses every step), as do the per-step rates
    assert all(row.abs().sum() > 0 for row in norm.weight.grad)
    assert all(lr.grad is not None and torch.all(lr.grad != 0) for lr in alg.inner_lrs.values())
    # each step updated its own running statistics: support + query pass, 2 tasks
    assert norm.num_batches_tracked.tolist() == [4, 4, 4]
    assert not torch.allclose(norm.running_mean[0], norm.running_mean[1])
    assert torch.equal(model[1].running_mean, torch.zeros(4))  # the shared buffer is unused
    assert int(model[1].num_batches_tracked) == 0
    alg.eval()
    frozen = norm.running_mean.clone()
    out = alg.predict(batch)  # 5 test steps: steps 3 and 4 reuse step 2's set
    assert torch.equal(norm.running_mean, frozen)  # evaluation reads, never writes, the stats
    assert out.query_logits.shape == batch.query_y.shape


def test_fixed_rates_are_not_learned():
    alg = MAMLPlusPlus(tiny_mlp(norm="batch"), 0.1, 2, 2, learn_inner_lr=False)
    assert all(not lr.requires_grad for lr in alg.inner_lrs.values())
    alg.meta_loss(tiny_batch()).loss.backward()
    assert all(lr.grad is None for lr in alg.inner_lrs.values())
    assert torch.equal(alg.step_learning_rates(1)["0.weight"], torch.tensor(0.1, dtype=torch.float64))


def test_conv4_gets_a_row_per_step_for_each_of_its_four_norms():
    alg = MAMLPlusPlus(Conv4(hidden=8, out_features=5), 0.1, 5, 5)
    assert list(alg.norms) == ["features__1", "features__5", "features__9", "features__13"]
    assert all(n.weight.shape == (5, 8) for n in alg.norms.values())
    assert len(alg.inner_lrs) == 10 and all(lr.shape == (5,) for lr in alg.inner_lrs.values())


@pytest.mark.parametrize(
    "key, kwargs",
    [
        ("algorithm.inner_lr", {"inner_lr": 0.0}),
        ("algorithm.inner_steps", {"inner_steps": 0}),
        ("algorithm.test_inner_steps", {"test_inner_steps": 0}),
        ("algorithm.multi_step_loss_epochs", {"multi_step_loss_epochs": -1}),
        ("algorithm.first_order_epochs", {"first_order_epochs": -1}),
        ("algorithm.steps_per_epoch", {"steps_per_epoch": 0}),
        ("algorithm.per_step_bn", {"per_step_bn": True}),  # the MLP has no batch norm
    ],
)
def test_bad_settings_name_the_key(key, kwargs):
    settings = {"inner_lr": 0.1, "inner_steps": 2, "test_inner_steps": 2, "per_step_bn": False} | kwargs
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        MAMLPlusPlus(tiny_mlp(), **settings)


@pytest.mark.slow
def test_learns_omniglot_5way_1shot(omniglot_available, make_config):
    """80 outer steps of 4 tasks, Conv4 with 16 channels, two inner steps; epochs of 40
    steps, so the run goes through MSL annealing, first-order then second-order (DA), with
    learned per-step rates and per-step batch norm; 100 fixed 5-way 1-shot test episodes.

    Measured: 0.37 before training, 0.73 after (threshold 0.55).
    """
    cfg = make_config(
        "dataset=omniglot",
        "algorithm=maml_plus_plus",
        "model.hidden=16",
        "sampler.meta_batch_size=4",
        "sampler.train_queries=1",
        "sampler.queries=1",
        "algorithm.inner_lr=0.4",
        "algorithm.inner_steps=2",
        "algorithm.test_inner_steps=2",
        "algorithm.multi_step_loss_epochs=2",
        "algorithm.first_order_epochs=1",
        "algorithm.steps_per_epoch=40",
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
    assert int(alg.outer_step) == 80
