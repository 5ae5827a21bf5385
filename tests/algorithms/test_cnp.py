"""Conditional Neural Process: a hand-computed Gaussian likelihood, context-order
invariance, the size checks, the module's log-likelihood metric, and sinusoid learning."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from metarun.algorithms.cnp import CNP, gaussian_log_prob
from metarun.build import build
from metarun.episodes import Episode, collate_episodes
from metarun.errors import ConfigError
from metarun.models.mlp import MLP
from metarun.runner import train
from tests.algorithms.learning import check_learns_sinusoids


def linear(weight: list[list[float]], bias: list[float]) -> nn.Linear:
    layer = nn.Linear(len(weight[0]), len(weight)).double()
    with torch.no_grad():
        layer.weight.copy_(torch.tensor(weight, dtype=torch.float64))
        layer.bias.copy_(torch.tensor(bias, dtype=torch.float64))
    return layer


def hand_cnp() -> CNP:
    """encoder r_i = 0.5 x + y − 0.1; decoder mean = r + 2x, raw std = 0.3 r − x + 0.2."""
    return CNP(linear([[1.0, 2.0], [0.3, -1.0]], [0.0, 0.2]), encoder=linear([[0.5, 1.0]], [-0.1]))


def one_episode(k: int = 2) -> Episode:
    sx = torch.tensor([[0.4], [-1.2], [2.0]], dtype=torch.float64)[:k]
    sy = torch.tensor([[1.0], [0.5], [-0.7]], dtype=torch.float64)[:k]
    qx = torch.tensor([[0.3], [-2.0]], dtype=torch.float64)
    qy = torch.tensor([[0.8], [-1.5]], dtype=torch.float64)
    return Episode(sx, sy, qx, qy)


def normal_log_density(y: float, mean: float, std: float) -> float:
    return -0.5 * ((y - mean) / std) ** 2 - math.log(std) - 0.5 * math.log(2 * math.pi)


def softplus(v: float) -> float:
    return math.log1p(math.exp(v))


def test_likelihood_matches_a_hand_computed_gaussian_log_density():
    ep = one_episode()
    batch = collate_episodes([ep])
    alg = hand_cnp()
    xs, ys = ep.support_x[:, 0].tolist(), ep.support_y[:, 0].tolist()
    r = sum(0.5 * x + y - 0.1 for x, y in zip(xs, ys)) / len(xs)

    def density(x: float, y: float) -> float:
        return normal_log_density(y, r + 2 * x, 0.1 + 0.9 * softplus(0.3 * r - x + 0.2))

    targets = list(zip(xs + ep.query_x[:, 0].tolist(), ys + ep.query_y[:, 0].tolist()))
    train_ll = sum(density(x, y) for x, y in targets) / len(targets)  # context ⊂ target
    out = alg.meta_loss(batch)
    assert out.loss.item() == pytest.approx(-train_ll, rel=1e-12)
    assert out.extra["log_likelihood"].item() == pytest.approx(train_ll, rel=1e-12)
    qx, qy = ep.query_x[:, 0].tolist(), ep.query_y[:, 0].tolist()
    torch.testing.assert_close(out.query_logits[0, :, 0], torch.tensor([r + 2 * x for x in qx], dtype=torch.float64))
    test_ll = sum(density(x, y) for x, y in zip(qx, qy)) / len(qx)
    pred = alg.predict(batch)
    assert pred.extra["log_likelihood"].item() == pytest.approx(test_ll, rel=1e-12)
    assert pred.loss.item() == pytest.approx(-test_ll, rel=1e-12)
    assert pred.query_logits.shape == batch.query_y.shape  # [B, Q, 1]


def test_gaussian_log_prob_is_the_normal_density_summed_over_outputs():
    g = torch.Generator().manual_seed(0)
    y, mean = torch.randn(3, 5, 2, generator=g), torch.randn(3, 5, 2, generator=g)
    std = torch.rand(3, 5, 2, generator=g) + 0.1
    expected = torch.distributions.Normal(mean, std).log_prob(y).sum(-1)
    torch.testing.assert_close(gaussian_log_prob(y, mean, std), expected)


def test_context_order_does_not_matter_and_the_loss_has_gradients():
    torch.manual_seed(0)
    alg = CNP(MLP(9, (16,), 2).double(), encoder=MLP(2, (16,), 8).double())
    ep = one_episode(k=3)
    batch = collate_episodes([ep])
    perm = torch.tensor([2, 0, 1])
    shuffled = collate_episodes([Episode(ep.support_x[perm], ep.support_y[perm], ep.query_x, ep.query_y)])
    torch.testing.assert_close(alg.predict(shuffled).query_logits, alg.predict(batch).query_logits)
    alg.meta_loss(batch).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in alg.parameters())


@pytest.mark.parametrize(
    "key, kwargs",
    [
        ("model.in_features", {"model": MLP(8, (4,), 2)}),
        ("model.out_features", {"model": MLP(9, (4,), 1)}),
        ("algorithm.encoder.in_features", {"encoder": MLP(3, (4,), 8)}),
        ("algorithm.x_dim", {"x_dim": 0}),
        ("algorithm.min_std", {"min_std": 1.0}),
    ],
)
def test_bad_settings_name_the_key(key, kwargs):
    settings = {"model": MLP(9, (4,), 2), "encoder": MLP(2, (4,), 8)} | kwargs
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        CNP(**settings)


def test_regression_only():
    alg = CNP(MLP(9, (4,), 2), encoder=MLP(2, (4,), 8))
    alg.check_episode_shape(1, 1)
    with pytest.raises(ConfigError, match="sampler.ways=5"):
        alg.check_episode_shape(1, 5)


def test_preset_builds(make_config):
    assert isinstance(build(make_config("experiment=cnp_sinusoid"))["algorithm"], CNP)


def test_a_classification_dataset_is_refused(make_config):
    """The groups do not fit: one sentence before any model is built (its decoder settings
    would not fit Conv4)."""
    with pytest.raises(ConfigError, match="algorithm=CNP is not allowed with dataset=Omniglot: it solves regression"):
        build(make_config("dataset=omniglot", "algorithm=cnp"))


def test_module_reports_the_log_likelihood(make_config):
    """`MetaOutput.extra` reaches the logged metrics as test/log_likelihood ± CI."""
    results, objects = train(make_config("algorithm=cnp"))
    metrics = objects["trainer"].callback_metrics
    assert {"test/log_likelihood", "test/log_likelihood_ci95", "test/mse"} <= set(metrics)
    assert math.isfinite(float(metrics["test/log_likelihood"]))
    assert "mse" in results["test"]


@pytest.mark.slow
def test_learns_sinusoids(make_config):
    """Measured on 100 test tasks (y variance 4.32): MSE 4.48 untrained -> 0.41 after 500
    steps of Adam 3e-3, meta-batch 25; mean log-likelihood -5.08 -> -0.75."""
    check_learns_sinusoids(make_config("algorithm=cnp", "sampler.meta_batch_size=25"), steps=500)
