"""Transductive inference: BD-CSPN, TIM-GD and PT-MAP against independent NumPy transcriptions of
the published updates on toy tasks (float64), Sinkhorn's marginals, the query labels never read,
and each method beating the inductive nearest centroid on tasks whose queries are shifted."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from metarun.algorithms.transductive import (
    KINDS,
    bd_cspn,
    check_transductive,
    pt_map,
    sinkhorn,
    tim,
    tim_loss,
    transductive_scores,
)
from metarun.build import build_learner
from metarun.catalog import transductive_learners
from metarun.episodes import EpisodeBatch
from metarun.errors import ConfigError
from tests.conftest import TINY, compose_config


def toy(seed: int = 0, ways: int = 3, shots: int = 2, queries: int = 4, dim: int = 5):
    """One task of non-negative features: support ``[1, N*K, D]``, labels, query ``[1, N*Q, D]``."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.rand(ways, dim, generator=g, dtype=torch.float64) * 3
    support_y = torch.arange(ways).repeat_interleave(shots)
    query_y = torch.arange(ways).repeat_interleave(queries)
    noise = lambda n: 0.4 * torch.rand(n, dim, generator=g, dtype=torch.float64)  # noqa: E731
    support = centres[support_y] + noise(len(support_y))
    query = centres[query_y] + noise(len(query_y)) + 0.3  # a shift between the sets
    return support[None], support_y[None], query[None], query_y[None]


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_bd_cspn_is_the_published_rectification():
    support, support_y, query, _ = toy()
    s, y, q = support[0].numpy(), support_y[0].numpy(), query[0].numpy()
    eps, ways = 10.0, 3
    q = q + (s.mean(0) - q.mean(0))  # cross-class bias
    p = np.stack([s[y == k].mean(0) for k in range(ways)])
    rectified = []
    for k in range(ways):
        pseudo = (unit(q) @ unit(p).T).argmax(1)
        members = np.concatenate([s[y == k], q[pseudo == k]])  # support of k and queries labelled k
        w = np.exp(eps * (unit(members) @ unit(p[k])))
        rectified.append((w[:, None] * members).sum(0) / w.sum())
    expected = eps * unit(q) @ unit(np.stack(rectified)).T
    torch.testing.assert_close(bd_cspn(support, support_y, query, ways)[0], torch.from_numpy(expected))


def numpy_tim_loss(w: np.ndarray, s: np.ndarray, y: np.ndarray, q: np.ndarray, tau: float = 15.0) -> float:
    """TIM's loss written out: 0.1·CE − (H(Ŷ) − 0.1·H(Ŷ|X)), logits −τ/2‖x − w‖²."""

    def probs(x):
        logits = -tau / 2 * ((x[:, None, :] - w[None]) ** 2).sum(-1)
        e = np.exp(logits - logits.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)

    ce = -np.log(probs(s)[np.arange(len(y)), y]).mean()
    pq = probs(q)
    conditional = -(pq * np.log(pq + 1e-12)).sum(1).mean()
    marginal = pq.mean(0)
    return 0.1 * ce - ((-(marginal * np.log(marginal + 1e-12)).sum()) - 0.1 * conditional)


def test_tim_loss_and_first_step_are_the_published_ones():
    """Adam's first step moves each weight by −lr·sign(∂L/∂w): checked against central
    differences of the written-out loss, from W₀ = the support means of the L2-normalised features."""
    support, support_y, query, _ = toy()
    s, y, q = unit(support[0].numpy()), support_y[0].numpy(), unit(query[0].numpy())
    w0 = np.stack([s[y == k].mean(0) for k in range(3)])
    loss = tim_loss(torch.from_numpy(s)[None], support_y, torch.from_numpy(q)[None], torch.from_numpy(w0)[None])
    assert loss.item() == pytest.approx(numpy_tim_loss(w0, s, y, q), rel=1e-10)
    grad = np.zeros_like(w0)
    for index in np.ndindex(*w0.shape):
        step = np.zeros_like(w0)
        step[index] = 1e-6
        grad[index] = (numpy_tim_loss(w0 + step, s, y, q) - numpy_tim_loss(w0 - step, s, y, q)) / 2e-6
    w1 = w0 - 1e-4 * np.sign(grad)
    expected = -15 / 2 * ((q[:, None, :] - w1[None]) ** 2).sum(-1)
    torch.testing.assert_close(tim(support, support_y, query, 3, steps=1)[0], torch.from_numpy(expected))


def test_sinkhorn_gives_every_query_mass_one_and_every_class_an_equal_share():
    cost = torch.rand(2, 12, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    plan = sinkhorn(cost, lam=10.0)
    torch.testing.assert_close(plan.sum(2), torch.ones(2, 12, dtype=torch.float64), atol=1e-5, rtol=0)
    torch.testing.assert_close(plan.sum(1), torch.full((2, 3), 4.0, dtype=torch.float64), atol=1e-5, rtol=0)
    # the plan is diag(u)·exp(−λC)·diag(v): every 2×2 cross-ratio is that of exp(−λC)
    ratio = lambda p: p[:, 0, 0] * p[:, 1, 1] / (p[:, 0, 1] * p[:, 1, 0])  # noqa: E731
    torch.testing.assert_close(ratio(plan), ratio(torch.exp(-10 * cost)))


def test_pt_map_is_the_published_map_estimate():
    """One transcription of the authors' test_standard.py (power transform, unit norm, each set
    centred, Sinkhorn, centres moved by α towards the weighted means), two epochs."""
    support, support_y, query, _ = toy()
    s, y, q = support[0].numpy(), support_y[0].numpy(), query[0].numpy()
    ways, lam, alpha = 3, 10.0, 0.2
    z = unit(np.power(np.concatenate([s, q]) + 1e-6, 0.5))
    n = len(s)
    zs, zq = unit(z[:n] - z[:n].mean(0)), unit(z[n:] - z[n:].mean(0))
    data = np.concatenate([zs, zq])
    mus = np.stack([zs[y == k].mean(0) for k in range(ways)])

    def probas(mus):
        cost = ((zq[:, None, :] - mus[None]) ** 2).sum(-1)
        p = np.exp(-lam * cost)
        p /= p.sum()
        u = np.zeros(len(zq))
        for _ in range(1000):
            if np.abs(u - p.sum(1)).max() <= 1e-6:
                break
            u = p.sum(1)
            p *= (1 / u)[:, None]
            p *= (len(zq) / ways / p.sum(0))[None]
        return np.concatenate([np.eye(ways)[y], p])

    for _ in range(2):
        p = probas(mus)
        mus = mus + alpha * ((p.T @ data) / p.sum(0)[:, None] - mus)
    plan = probas(mus)[n:]
    expected = np.log(plan / plan.sum(1, keepdims=True))
    torch.testing.assert_close(pt_map(support, support_y, query, ways, epochs=2)[0], torch.from_numpy(expected))


def shifted_tasks(tasks: int = 10, ways: int = 5, queries: int = 15, dim: int = 32):
    """1-shot tasks of Gaussian classes whose query set is shifted away from the support set
    (non-negative features, as after a ReLU): support ``[T, N, D]``, query ``[T, N*Q, D]``."""
    g = torch.Generator().manual_seed(1)
    centres = torch.rand(tasks, ways, dim, generator=g) * 2
    support_y = torch.arange(ways).expand(tasks, ways)
    query_y = torch.arange(ways).repeat_interleave(queries).expand(tasks, -1)
    pick = lambda labels: torch.gather(centres, 1, labels[..., None].expand(-1, -1, dim))  # noqa: E731
    support = pick(support_y) + 0.6 * torch.randn(tasks, ways, dim, generator=g)
    query = pick(query_y) + 0.6 * torch.randn(tasks, ways * queries, dim, generator=g) + 0.5
    return support.clamp_min(0), support_y, query.clamp_min(0), query_y


@pytest.mark.parametrize("kind", [k for k in KINDS if k != "none"])
def test_each_method_beats_the_inductive_centroid_and_never_reads_query_labels(kind):
    support, support_y, query, query_y = shifted_tasks()
    centroids = F.one_hot(support_y, 5).float().transpose(1, 2) @ support  # 1-shot: the support itself
    inductive = (torch.cdist(query, centroids).argmin(-1) == query_y).float().mean().item()
    scores = transductive_scores(kind, support, support_y, query, 5)
    accuracy = (scores.argmax(-1) == query_y).float().mean().item()
    print(f"{kind}: inductive {inductive:.3f}, transductive {accuracy:.3f}")
    assert accuracy > inductive + 0.03, (inductive, accuracy)
    # the queries in another order (float64: no rounding of sums in another order): the same
    # probabilities, in that order; the query labels are not an argument at all
    order = torch.randperm(query.shape[1], generator=torch.Generator().manual_seed(2))
    support, query = support.double(), query.double()
    scores = transductive_scores(kind, support, support_y, query, 5)
    again = transductive_scores(kind, support, support_y, query[:, order], 5)
    torch.testing.assert_close(again.softmax(-1), scores[:, order].softmax(-1), rtol=0, atol=1e-7)


def test_an_unknown_method_is_one_sentence():
    with pytest.raises(ConfigError, match=r"algorithm\.transductive='tta' is not allowed: choose one of none"):
        check_transductive("tta")


@pytest.mark.parametrize("learner", transductive_learners())  # derived from conf/algorithm/
def test_every_learner_with_the_option_labels_queries_without_their_labels(learner, tmp_path, omniglot_available):
    """The methods through the learner's own `predict` (its evaluation features; every method for
    ProtoNet, BD-CSPN for the others, which share the same call): scrambled query labels give
    identical scores; only the reported loss reads them."""
    cfg = compose_config([*TINY, "dataset=omniglot", "model.hidden=8", f"algorithm={learner}"], tmp_path)
    algorithm = build_learner(cfg)["algorithm"].eval()
    g = torch.Generator().manual_seed(0)
    batch = EpisodeBatch(
        torch.rand(2, 6, 1, 28, 28, generator=g),  # 3-way 2-shot
        torch.arange(3).repeat_interleave(2).expand(2, -1),
        torch.rand(2, 9, 1, 28, 28, generator=g),
        torch.arange(3).repeat_interleave(3).expand(2, -1),
        None,
        torch.arange(2),
    )
    scrambled = EpisodeBatch(batch.support_x, batch.support_y, batch.query_x, batch.query_y.flip(1), None, batch.index)
    for kind in KINDS[1:] if learner == "protonet" else ("bd_cspn",):
        algorithm.transductive = kind
        with torch.no_grad():
            out, again = algorithm.predict(batch), algorithm.predict(scrambled)
        assert out.query_logits.shape == (2, 9, 3)
        torch.testing.assert_close(again.query_logits, out.query_logits, rtol=0, atol=0)


def test_a_run_says_its_test_was_transductive(tmp_path, omniglot_available):
    """results.json names the inference of the test; an inductive run says inductive."""
    from metarun.runner import train

    base = [*TINY, "dataset=omniglot", "algorithm=protonet", "model.hidden=8", "sampler.ways=3", "sampler.queries=2"]
    transductive, _ = train(compose_config([*base, "algorithm.transductive=pt_map"], tmp_path / "transductive"))
    inductive, _ = train(compose_config(base, tmp_path / "inductive"))
    assert transductive["experiment"]["inference"] == "transductive (PT-MAP)"
    assert inductive["experiment"]["inference"] == "inductive"
    assert transductive["test"]["accuracy"]["episodes"] == inductive["test"]["accuracy"]["episodes"] == 4
