"""Reptile: the surrogate's gradient is θ − θ′, one outer SGD step is the Reptile update,
the inner loop is plain SGD / Adam; it learns sinusoids and Omniglot."""

from __future__ import annotations

import copy

import pytest
import torch
from hydra.utils import instantiate
from torch import nn

from metarun.algorithms.inner_loop import task_loss
from metarun.algorithms.reptile import TRAIN_ORDER, Reptile, inner_train, minibatch_indices
from metarun.build import build
from metarun.datasets.sinusoid import Sinusoid
from metarun.episodes import TEST, EpisodeSampler, collate_episodes, task_generator
from metarun.errors import ConfigError
from metarun.runner import train as run_training
from tests.algorithms.learning import assert_learns


def tiny_batch(tasks: int = 3, shots: int = 6, queries: int = 4):
    sampler = EpisodeSampler(1, shots, queries, tasks)
    batch = sampler.train_batch(Sinusoid(), step=0)
    for name in ("support_x", "support_y", "query_x", "query_y"):
        setattr(batch, name, getattr(batch, name).double())
    return batch


def tiny_mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 1)).double()


def reptile(optimizer: str = "sgd", batch_size: int | None = None, steps: int = 3) -> Reptile:
    return Reptile(
        tiny_mlp(),
        inner_lr=0.05 if optimizer == "sgd" else 0.01,
        inner_steps=steps,
        test_inner_steps=steps,
        inner_optimizer=optimizer,
        inner_batch_size=batch_size,
        inner_betas=(0.0, 0.999),
    )


def manual_inner_loop(alg: Reptile, task, steps: int, batches=None) -> list[torch.Tensor]:
    """θ′ from torch.optim on a copy of the model: an independent implementation."""
    model = copy.deepcopy(alg.model)
    if alg.inner_optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=alg.inner_lr)
    else:
        opt = torch.optim.Adam(model.parameters(), lr=alg.inner_lr, betas=alg.inner_betas, eps=alg.inner_eps)
    for s in range(steps):
        idx = slice(None) if batches is None or batches[s] is None else batches[s]
        opt.zero_grad()
        task_loss(model(task.support_x[idx]), task.support_y[idx]).backward()
        opt.step()
    return [p.detach() for p in model.parameters()]


def adapt(alg: Reptile, task, steps: int, batch_size, generator) -> dict:
    """θ′ of one task: Reptile's inner optimiser from the current weights, with the
    minibatches ``generator`` draws."""
    theta = {k: v.detach() for k, v in alg.model.named_parameters()}
    batches = minibatch_indices(task.support_x.shape[0], batch_size, steps, generator)
    return inner_train(
        alg.model,
        theta,
        task.support_x,
        task.support_y,
        steps,
        alg.inner_lr,
        alg.inner_optimizer,
        None if batches[0] is None else torch.stack(batches),
        alg.inner_betas,
        alg.inner_eps,
    )


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_adapted_weights_are_k_steps_of_the_inner_optimiser(optimizer):
    alg = reptile(optimizer, steps=4)
    task = tiny_batch().task(0)
    adapted = adapt(alg, task, 4, None, torch.Generator().manual_seed(0))
    expected = manual_inner_loop(alg, task, 4)
    for got, want in zip(adapted.values(), expected):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_minibatches_follow_the_shuffled_support_set():
    alg = reptile("adam", batch_size=4, steps=5)
    task = tiny_batch().task(1)
    adapted = adapt(alg, task, 5, 4, torch.Generator().manual_seed(3))
    batches = minibatch_indices(6, 4, 5, torch.Generator().manual_seed(3))
    order = torch.cat(batches)  # 5 steps × 4 = 20 indices: three shuffles of 6, cut at 4
    for epoch in range(3):
        assert sorted(order[6 * epoch : 6 * epoch + 6].tolist()) == list(range(6))
    expected = manual_inner_loop(alg, task, 5, batches)
    for got, want in zip(adapted.values(), expected):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert minibatch_indices(6, None, 3, None) == [None] * 3
    assert minibatch_indices(6, 6, 3, None) == [None] * 3


def adapted_weights(alg: Reptile, batch) -> list[list[torch.Tensor]]:
    """θ′ of each task, with the generator meta_loss uses at the current update count."""
    out = []
    for i in range(len(batch)):
        task = batch.task(i)
        g = task_generator(alg.seed, TRAIN_ORDER, int(alg.updates), task.index)
        out.append(list(adapt(alg, task, alg.inner_steps, alg.inner_batch_size, g).values()))
    return out


@pytest.mark.parametrize("optimizer, batch_size", [("sgd", None), ("adam", 4)])
def test_surrogate_gradient_is_theta_minus_adapted_theta(optimizer, batch_size):
    batch = tiny_batch()
    alg = reptile(optimizer, batch_size)
    theta = [p.detach().clone() for p in alg.parameters()]
    adapted = adapted_weights(alg, batch)
    out = alg.meta_loss(batch)
    out.loss.backward()
    for j, (p, t) in enumerate(zip(alg.parameters(), theta)):
        expected = torch.stack([t - a[j] for a in adapted]).mean(0)  # mean_i (θ − θ′_i)
        torch.testing.assert_close(p.grad, expected, rtol=1e-12, atol=1e-14)
    value = sum(0.5 * sum((t - a[j]).pow(2).sum() for j, t in enumerate(theta)) for a in adapted) / len(batch)
    torch.testing.assert_close(out.loss, value)


def test_one_outer_sgd_step_is_the_reptile_update():
    """θ ← θ + ε·mean_i(θ′_i − θ) (Nichol et al. 2018, algorithm 2)."""
    batch = tiny_batch()
    alg = reptile("sgd")
    eps = 0.3
    theta = [p.detach().clone() for p in alg.parameters()]
    adapted = adapted_weights(alg, batch)
    opt = torch.optim.SGD(alg.parameters(), lr=eps)
    opt.zero_grad()
    alg.meta_loss(batch).loss.backward()
    opt.step()
    for j, (p, t) in enumerate(zip(alg.parameters(), theta)):
        expected = t + eps * torch.stack([a[j] - t for a in adapted]).mean(0)
        torch.testing.assert_close(p.detach(), expected, rtol=1e-12, atol=1e-14)
    # with ε = 1 and one task, the initialisation becomes that task's adapted weights
    one = tiny_batch(tasks=1)
    alg = reptile("adam")
    adapted = adapted_weights(alg, one)[0]
    opt = torch.optim.SGD(alg.parameters(), lr=1.0)
    alg.meta_loss(one).loss.backward()
    opt.step()
    for p, a in zip(alg.parameters(), adapted):
        torch.testing.assert_close(p.detach(), a, rtol=1e-12, atol=1e-14)


def test_inner_loop_is_pure_uses_support_only_and_predict_adapts():
    batch = tiny_batch()
    alg = reptile("sgd", steps=5)
    before = [p.detach().clone() for p in alg.parameters()]
    out = alg.meta_loss(batch)
    shuffled = copy.deepcopy(batch)
    shuffled.query_y = torch.randn_like(batch.query_y)
    alg.updates.zero_()
    assert torch.equal(alg.meta_loss(shuffled).loss, out.loss)  # the query set is not used
    pred = alg.predict(batch)
    for p, q in zip(alg.parameters(), before):
        assert torch.equal(p, q)
    assert pred.query_logits.shape == batch.query_y.shape
    after_mse = (pred.query_logits - batch.query_y).pow(2).mean()
    before_mse = (pred.query_logits_before - batch.query_y).pow(2).mean()
    assert after_mse < before_mse
    torch.testing.assert_close(alg.predict(batch).query_logits, pred.query_logits)


@pytest.mark.parametrize(
    "key, kwargs",
    [
        ("algorithm.inner_lr", {"inner_lr": 0.0}),
        ("algorithm.inner_steps", {"inner_steps": 0}),
        ("algorithm.test_inner_steps", {"test_inner_steps": -1}),
        ("algorithm.inner_optimizer", {"inner_optimizer": "rmsprop"}),
        ("algorithm.inner_batch_size", {"inner_batch_size": 0}),
        ("algorithm.test_inner_batch_size", {"test_inner_batch_size": 2.5}),
        ("algorithm.inner_betas", {"inner_betas": (0.9, 1.0)}),
        ("algorithm.inner_eps", {"inner_eps": 0.0}),
    ],
)
def test_bad_settings_name_the_key(key, kwargs):
    settings = {"inner_lr": 0.1, "inner_steps": 1, "test_inner_steps": 1} | kwargs
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        Reptile(tiny_mlp(), **settings)


def test_head_size_fixes_the_test_ways():
    alg = reptile()
    alg.check_episode_shape(5, 5)
    with pytest.raises(ConfigError, match="sampler.ways=20"):
        alg.check_episode_shape(5, 20)


def test_runs_in_the_module_with_an_annealed_outer_step(make_config):
    """algorithm=reptile selects SGD(ε = 1) annealed linearly to 0 over trainer.max_steps."""
    results, objects = run_training(make_config("algorithm=reptile", "algorithm.test_inner_steps=2"))
    assert {"mse", "mse_before_adaptation"} <= set(results["test"])
    opt = objects["trainer"].optimizers[0]
    assert isinstance(opt, torch.optim.SGD) and opt.param_groups[0]["lr"] == 0.0


@pytest.mark.parametrize(
    "preset, ways, shots, batch, steps, lr",
    [
        ("reptile_omniglot_5w1s", 5, 1, 25, 3, 0.001),
        ("reptile_omniglot_5w5s", 5, 5, 10, 5, 0.0015),
        ("reptile_omniglot_20w1s", 20, 1, 15, 12, 0.00046),
        ("reptile_omniglot_20w5s", 20, 5, 20, 12, 0.00046),
    ],
)
def test_omniglot_presets_build(make_config, omniglot_available, preset, ways, shots, batch, steps, lr):
    """The authors' README commands (--inner-batch, --inner-iters, --learning-rate)."""
    cfg = make_config(f"experiment={preset}", tiny=False)
    alg = build(cfg)["algorithm"]
    assert (alg.inner_optimizer, alg.inner_betas, alg.inner_batch_size) == ("adam", (0.0, 0.999), batch)
    assert (alg.inner_steps, alg.inner_lr, cfg.sampler.shots) == (steps, lr, shots)
    assert alg.model.head.out_features == ways and cfg.scheduler.total_iters == cfg.trainer.max_steps


def train(cfg, objects, steps: int) -> None:
    """The outer loop of `MetaLearningModule`, without Lightning: SGD(ε) annealed to 0."""
    alg, sampler, splits = objects["algorithm"], objects["sampler"], objects["datamodule"].splits
    opt = instantiate(cfg.optimizer)(params=alg.parameters())
    schedule = instantiate(cfg.scheduler)(optimizer=opt)
    for step in range(steps):
        opt.zero_grad()
        alg.meta_loss(sampler.train_batch(splits["train"], step)).loss.backward()
        opt.step()
        alg.end_outer_step()
        schedule.step()


@pytest.mark.slow
def test_learns_sinusoids(make_config):
    """Measured: post-adaptation test MSE 4.40 untrained -> 2.46 after 100 steps (10 tasks)."""
    cfg = make_config("algorithm=reptile", "trainer.max_steps=100", "sampler.meta_batch_size=10")
    objects = build(cfg)
    alg, sampler = objects["algorithm"], objects["sampler"]
    test = collate_episodes([sampler.eval_episode(objects["datamodule"].splits["test"], TEST, i) for i in range(50)])

    def mse() -> float:
        return (alg.predict(test).query_logits - test.query_y).pow(2).mean().item()

    untrained = mse()
    train(cfg, objects, 100)
    assert mse() < 0.7 * untrained


@pytest.mark.slow
def test_learns_omniglot(make_config, omniglot_available):
    """5-way 1-shot, the paper's inner loop (Adam, β₁ = 0, 5 steps of 10 images from a
    10-shot training task, meta-batch 5, ε = 1 annealed) but inner lr 0.003, 40 outer steps
    and 10 test steps on a 32-channel Conv4. Measured on 40 test episodes: the untrained
    initialisation, adapted the same way, scores 62.7 % (chance 20 %), the trained one 71.5 %;
    asserted ≥ 67 % and ≥ 4 points above the untrained one."""
    cfg = make_config(
        "dataset=omniglot",
        "algorithm=reptile",
        "model.hidden=32",
        "sampler.train_shots=10",
        "sampler.train_queries=1",
        "sampler.meta_batch_size=5",
        "algorithm.inner_optimizer=adam",
        "algorithm.inner_lr=0.003",
        "algorithm.inner_steps=5",
        "algorithm.inner_batch_size=10",
        "algorithm.test_inner_steps=10",
        "trainer.max_steps=40",
    )
    objects = build(cfg)
    assert_learns(
        objects["algorithm"],
        objects["sampler"],
        objects["datamodule"].splits["test"],
        lambda: train(cfg, objects, 40),
        at_least=0.67,
        gain=0.04,
        episodes=40,
    )
