"""Neural Process: the closed-form KL of two diagonal Gaussians, the ELBO recomputed by hand
with the same seeded noise, the Monte Carlo test likelihood, and sinusoid learning."""

from __future__ import annotations

import math

import pytest
import torch

from metarun.algorithms.cnp import gaussian_log_prob
from metarun.algorithms.np import EVAL_NOISE, TRAIN_NOISE, NeuralProcess, kl_diagonal_gaussians, task_noise
from metarun.build import build
from metarun.datasets.sinusoid import Sinusoid
from metarun.episodes import EpisodeSampler, task_generator
from metarun.errors import ConfigError
from metarun.models.mlp import MLP
from metarun.runner import train
from tests.algorithms.learning import check_learns_sinusoids


def tiny_batch(tasks: int = 3, shots: int = 4, queries: int = 5):
    batch = EpisodeSampler(1, shots, queries, tasks).train_batch(Sinusoid(), step=0)
    for name in ("support_x", "support_y", "query_x", "query_y"):
        setattr(batch, name, getattr(batch, name).double())
    return batch


def tiny_np(deterministic: bool = False, samples: int = 4) -> NeuralProcess:
    torch.manual_seed(0)
    latent = 3
    det = MLP(2, (8,), 5).double() if deterministic else None
    decoder = MLP(latent + 1 + (5 if deterministic else 0), (8,), 2).double()
    return NeuralProcess(decoder, MLP(2, (8,), 2 * latent).double(), latent, det, test_samples=samples, seed=7)


def test_kl_matches_the_closed_form():
    # KL(N(1, 2²) ‖ N(0, 1)) = log(1/2) + (4 + 1)/2 − 1/2, per dimension, summed
    one = torch.tensor([[1.0, 1.0]], dtype=torch.float64)
    value = kl_diagonal_gaussians(one, 2 * one, 0 * one, one)
    assert value.item() == pytest.approx(2 * (math.log(0.5) + 2.5 - 0.5), rel=1e-14)
    g = torch.Generator().manual_seed(0)
    mq, mp = (torch.randn(4, 6, generator=g, dtype=torch.float64) for _ in range(2))
    sq, sp = (torch.rand(4, 6, generator=g, dtype=torch.float64) + 0.1 for _ in range(2))
    expected = torch.distributions.kl_divergence(
        torch.distributions.Normal(mq, sq), torch.distributions.Normal(mp, sp)
    ).sum(-1)
    torch.testing.assert_close(kl_diagonal_gaussians(mq, sq, mp, sp), expected, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(kl_diagonal_gaussians(mq, sq, mq, sq), torch.zeros(4, dtype=torch.float64))


@pytest.mark.parametrize("deterministic", [False, True])
def test_elbo_recomputed_by_hand_with_the_same_noise(deterministic):
    """loss = −mean_b (Σ_T log N(y | decoder([r, z, x])) − KL(q(z|T) ‖ q(z|C))) / |T|,
    z = μ_T + σ_T·ε, ε from the task's generator at update 0."""
    alg = tiny_np(deterministic)
    batch = tiny_batch()
    rng = torch.random.get_rng_state()
    out = alg.meta_loss(batch)
    assert torch.equal(torch.random.get_rng_state(), rng)  # the global RNG is never drawn
    expected, preds = [], []
    for i in range(len(batch)):
        t = batch.task(i)
        xt, yt = torch.cat([t.support_x, t.query_x]), torch.cat([t.support_y, t.query_y])  # [T, 1]

        def q(x, y):
            h = alg.latent_encoder(torch.cat([x, y], -1)).mean(0)  # [2L]
            return h[:3], 0.1 + 0.9 * torch.sigmoid(h[3:])

        (mc, sc), (mt, st) = q(t.support_x, t.support_y), q(xt, yt)
        eps = torch.randn(3, generator=alg_generator(alg, t.index), dtype=torch.float64)
        z = mt + st * eps

        def decode(z, x, t=t):  # this task's context
            parts = [z]
            if deterministic:
                pairs = torch.cat([t.support_x, t.support_y], -1)  # [K, 2]
                parts.insert(0, alg.deterministic_encoder(pairs).mean(0))
            rep = torch.cat(parts).expand(x.shape[0], -1)
            mean, raw = alg.model(torch.cat([rep, x], -1)).chunk(2, -1)
            return mean, 0.1 + 0.9 * torch.nn.functional.softplus(raw)

        mean, std = decode(z, xt)
        log_lik = torch.distributions.Normal(mean, std).log_prob(yt).sum()
        kl = torch.distributions.kl_divergence(
            torch.distributions.Normal(mt, st), torch.distributions.Normal(mc, sc)
        ).sum()
        expected.append((log_lik - kl) / xt.shape[0])
        preds.append(decode(mc, t.query_x)[0])
    torch.testing.assert_close(out.loss, -torch.stack(expected).mean(), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(out.extra["elbo"], torch.stack(expected).detach())
    torch.testing.assert_close(out.query_logits, torch.stack(preds).detach())  # z = E[q(z|C)]


def alg_generator(alg: NeuralProcess, index: int) -> torch.Generator:
    return task_generator(alg.seed, TRAIN_NOISE, 0, index)


def test_noise_is_seeded_per_task_and_update():
    alg = tiny_np()
    batch = tiny_batch()
    like = torch.zeros((), dtype=torch.float64)
    whole = task_noise(alg.seed, TRAIN_NOISE, 5, batch.index, (3,), like)
    half = task_noise(alg.seed, TRAIN_NOISE, 5, batch.index[1:], (3,), like)
    torch.testing.assert_close(whole[1:], half)  # a task's noise does not depend on its rank
    assert not torch.allclose(whole, task_noise(alg.seed, TRAIN_NOISE, 6, batch.index, (3,), like))
    first = alg.meta_loss(batch).loss
    alg.end_outer_step()  # the module's call after each optimiser step
    assert int(alg.updates) == 1
    assert first.item() != alg.meta_loss(batch).loss.item()  # a new draw each update
    alg.end_outer_step()
    alg.updates.zero_()
    assert alg.meta_loss(batch).loss.item() == first.item()  # ... and reproducible


def test_gradients_reach_both_paths():
    alg = tiny_np(deterministic=True)
    alg.meta_loss(tiny_batch()).loss.backward()
    for module in (alg.model, alg.latent_encoder, alg.deterministic_encoder):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())


def test_test_likelihood_is_the_monte_carlo_mixture_estimate():
    """(1/Q) log (1/S) Σ_s Π_q N(y_q | z_s, x_q); with one sample, the joint density / Q."""
    alg = tiny_np(samples=4)
    batch = tiny_batch()
    out = alg.predict(batch)
    assert out.query_logits.shape == batch.query_y.shape
    mc, sc = alg.latent(batch.support_x, batch.support_y)  # [B, L]
    eps = task_noise(alg.seed, EVAL_NOISE, 0, batch.index, (4, 3), mc)  # [B, S, L]
    for i in range(len(batch)):
        joint, means = [], []
        for s in range(4):
            z = (mc[i] + sc[i] * eps[i, s]).expand(batch.query_x.shape[1], -1)
            mean, raw = alg.model(torch.cat([z, batch.query_x[i]], -1)).chunk(2, -1)
            std = 0.1 + 0.9 * torch.nn.functional.softplus(raw)
            joint.append(gaussian_log_prob(batch.query_y[i], mean, std).sum())
            means.append(mean)
        expected = (torch.logsumexp(torch.stack(joint), 0) - math.log(4)) / batch.query_x.shape[1]
        torch.testing.assert_close(out.extra["log_likelihood"][i], expected.detach())
        torch.testing.assert_close(out.query_logits[i], torch.stack(means).mean(0).detach())
    torch.testing.assert_close(out.loss, -out.extra["log_likelihood"].mean())
    torch.testing.assert_close(alg.predict(batch).query_logits, out.query_logits)  # fixed noise


@pytest.mark.parametrize(
    "key, change",
    [
        ("model.in_features", lambda kw: kw | {"deterministic_encoder": MLP(2, (4,), 5)}),
        ("model.in_features", lambda kw: kw | {"model": MLP(5, (4,), 2)}),
        ("model.out_features", lambda kw: kw | {"model": MLP(4, (4,), 3)}),
        ("algorithm.latent_encoder.out_features", lambda kw: kw | {"latent_dim": 4}),
        ("algorithm.deterministic_encoder.in_features", lambda kw: kw | {"deterministic_encoder": MLP(3, (4,), 5)}),
        ("algorithm.test_samples", lambda kw: kw | {"test_samples": 0}),
    ],
)
def test_bad_settings_name_the_key(key, change):
    settings = change({"model": MLP(4, (4,), 2), "latent_encoder": MLP(2, (4,), 6), "latent_dim": 3})
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        NeuralProcess(**settings)


def test_regression_only():
    with pytest.raises(ConfigError, match="sampler.train_ways=5"):
        tiny_np().check_episode_shape(5, 1)


def test_preset_builds(make_config):
    alg = build(make_config("experiment=np_sinusoid"))["algorithm"]
    assert isinstance(alg, NeuralProcess) and alg.deterministic_encoder is None


def test_module_reports_the_log_likelihood(make_config, tmp_path):
    """`MetaOutput.extra`: train/elbo and train/kl per step, test/log_likelihood ± CI."""
    results, objects = train(make_config("algorithm=np", "algorithm.test_samples=2", "logger=csv"))
    metrics = objects["trainer"].callback_metrics
    assert {"test/log_likelihood", "test/log_likelihood_ci95", "test/mse"} <= set(metrics)
    assert list(results["test"]) == ["mse", "log_likelihood"]
    assert results["test"]["log_likelihood"]["mean"] == pytest.approx(float(metrics["test/log_likelihood"]))
    header = (tmp_path / "csv" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"train/elbo", "train/kl", "val/log_likelihood"} <= set(header)


@pytest.mark.slow
def test_learns_sinusoids(make_config):
    """Measured on 100 test tasks (y variance 4.32): MSE 4.50 untrained -> 0.36 after 600
    steps of Adam 3e-3, meta-batch 25; mean log-likelihood -4.55 -> -0.53."""
    check_learns_sinusoids(make_config("algorithm=np", "sampler.meta_batch_size=25"), steps=600)
