"""Matching Networks: cosine attention by hand, the FCE equations, learning on Omniglot."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metarun.algorithms.matching_net import FullContextEmbedding, MatchingNet, cosine_attention_log_probs
from metarun.build import build
from metarun.episodes import Episode, collate_episodes
from metarun.errors import ConfigError
from metarun.models.conv4 import Conv4
from tests.algorithms.learning import episode_accuracy, meta_train


def point_episode() -> Episode:
    """3-way 1-shot on 2-D points stored as [C=1, H=1, W=2] images."""
    support = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype=torch.float64)
    query = torch.tensor([[3.0, 1.0], [-1.0, 3.0]], dtype=torch.float64)
    return Episode(support.view(3, 1, 1, 2), torch.tensor([0, 1, 2]), query.view(2, 1, 1, 2), torch.tensor([0, 1]))


def test_one_shot_is_a_softmax_over_cosines_and_cosine_nearest_neighbour():
    batch = collate_episodes([point_episode()])
    out = MatchingNet(nn.Flatten()).meta_loss(batch)
    r2, r10 = math.sqrt(2), math.sqrt(10)
    # cosines of (3, 1) with (1, 0), (0, 1), (1, 1); of (-1, 3) with the same
    cos = torch.tensor([[[3 / r10, 1 / r10, 4 / (r10 * r2)], [-1 / r10, 3 / r10, 2 / (r10 * r2)]]], dtype=torch.float64)
    torch.testing.assert_close(out.query_logits.exp(), F.softmax(cos, -1))
    assert out.query_logits.argmax(-1).tolist() == [[0, 1]] == cos.argmax(-1).tolist()
    loss = -(math.log(F.softmax(cos[0, 0], -1)[0]) + math.log(F.softmax(cos[0, 1], -1)[1])) / 2
    assert out.loss.item() == pytest.approx(loss, rel=1e-12)


@pytest.mark.parametrize("ways, scale", [(5, 1.0), (20, 1.0), (5, 10.0)])
def test_cosine_attention_on_non_negative_embeddings_has_a_loss_floor(ways, scale):
    """Conv4 ends in a ReLU, so every cosine lies in [0, 1] and a query's loss is at least
    log(1 + (N - 1)e^{-s}), reached by orthogonal class embeddings: 0.905 at 5 ways and 2.08
    at 20 with the paper's s = 1, 0.00018 at 5 ways with s = 10 (docs/benchmarks.md reads the
    reproductions' training loss against it)."""
    floor = math.log(1 + (ways - 1) * math.exp(-scale))
    support = torch.eye(ways, dtype=torch.float64)  # orthogonal, non-negative
    labels = torch.arange(ways)
    alg = MatchingNet(nn.Flatten(), cosine_scale=scale)
    batch = collate_episodes([Episode(support.view(ways, 1, 1, ways), labels, support.view(ways, 1, 1, ways), labels)])
    assert alg.meta_loss(batch).loss.item() == pytest.approx(floor, rel=1e-12)
    g = torch.Generator().manual_seed(0)
    for _ in range(20):  # any non-negative embeddings do no better
        support, query = (torch.rand(ways, 8, generator=g, dtype=torch.float64) for _ in range(2))
        log_p = cosine_attention_log_probs(support, labels, query, ways, scale)
        assert -log_p.diagonal().mean().item() >= floor


def test_k_shot_class_probability_is_the_attention_mass_of_its_shots():
    g = torch.Generator().manual_seed(0)
    support = torch.randn(6, 5, generator=g, dtype=torch.float64)
    query = torch.randn(4, 5, generator=g, dtype=torch.float64)
    labels = torch.tensor([2, 0, 1, 1, 0, 2])  # 3-way 2-shot, shuffled
    log_p = cosine_attention_log_probs(support, labels, query, 3)  # [4, 3]
    attention = F.softmax(F.cosine_similarity(query[:, None], support[None], dim=-1), -1)  # [4, 6]
    expected = torch.stack([attention[:, labels == c].sum(1) for c in range(3)], 1)  # [4, 3]
    torch.testing.assert_close(log_p.exp(), expected)
    torch.testing.assert_close(log_p.exp().sum(-1), torch.ones(4, dtype=torch.float64))


def episode_batch(
    generator: torch.Generator, tasks: int = 2, ways: int = 3, shots: int = 2, queries: int = 2, dim: int = 4
):
    """Random float64 "images" [C=1, H=1, W=dim] with labels 0..ways-1."""
    episodes = []
    for _ in range(tasks):
        episodes.append(
            Episode(
                torch.randn(ways * shots, 1, 1, dim, generator=generator, dtype=torch.float64),
                torch.arange(ways).repeat_interleave(shots),
                torch.randn(ways * queries, 1, 1, dim, generator=generator, dtype=torch.float64),
                torch.arange(ways).repeat_interleave(queries),
            )
        )
    return collate_episodes(episodes)


class LinearEmbedding(nn.Module):
    """x [M, 1, 1, D_in] -> x W^T [M, D]; exposes embedding_dim like Conv4."""

    def __init__(self, d_in: int, dim: int, generator: torch.Generator) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(dim, d_in, generator=generator, dtype=torch.float64))
        self.embedding_dim = dim

    def forward(self, x: Tensor) -> Tensor:
        return x.flatten(1) @ self.weight.T  # [M, D]


def directional_derivative_check(
    alg: nn.Module, batch, generator: torch.Generator, directions: int = 4, eps: float = 1e-6
) -> None:
    """Autograd's gradient · v against central differences along random directions v."""
    params = list(alg.parameters())
    alg.zero_grad()
    alg.meta_loss(batch).loss.backward()
    for _ in range(directions):
        v = [torch.randn(p.shape, generator=generator, dtype=torch.float64) for p in params]
        analytic = sum((p.grad * d).sum() for p, d in zip(params, v)).item()
        with torch.no_grad():
            for p, d in zip(params, v):
                p.add_(eps * d)
            up = alg.meta_loss(batch).loss.item()
            for p, d in zip(params, v):
                p.sub_(2 * eps * d)
            down = alg.meta_loss(batch).loss.item()
            for p, d in zip(params, v):
                p.add_(eps * d)
        assert analytic == pytest.approx((up - down) / (2 * eps), rel=1e-6, abs=1e-9)


@pytest.mark.parametrize("fce", [False, True])
def test_meta_gradient_matches_finite_differences(fce):
    g = torch.Generator().manual_seed(1)
    batch = episode_batch(g)
    alg = MatchingNet(LinearEmbedding(4, 3, g), fce=fce, attention_steps=2).double()
    with torch.no_grad():  # deterministic FCE weights, without the global RNG
        for p in alg.parameters():
            p.copy_(0.5 * torch.randn(p.shape, generator=g, dtype=torch.float64))
    directional_derivative_check(alg, batch, g)


def lstm_cell(x: Tensor, h: Tensor, c: Tensor, w_x: Tensor, w_h: Tensor, b: Tensor):
    """The LSTM equations written out (gates i, f, g, o, as PyTorch orders them)."""
    i, f, g, o = (x @ w_x.T + h @ w_h.T + b).chunk(4, -1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c), c


def test_full_context_embeddings_follow_the_appendix_equations():
    g = torch.Generator().manual_seed(2)
    dim, s, m, steps = 3, 4, 2, 3
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        fce = FullContextEmbedding(dim, lstm_layers=1, steps=steps).double()
    g_prime = torch.randn(s, dim, generator=g, dtype=torch.float64)
    f_prime = torch.randn(m, dim, generator=g, dtype=torch.float64)

    # support: g(x_i, S) = h→_i + h←_i + g'(x_i)
    lstm = fce.support_lstm
    zero = torch.zeros(dim, dtype=torch.float64)
    fwd, (h, c) = [], (zero, zero)
    for i in range(s):
        h, c = lstm_cell(g_prime[i], h, c, lstm.weight_ih_l0, lstm.weight_hh_l0, lstm.bias_ih_l0 + lstm.bias_hh_l0)
        fwd.append(h)
    bwd, (h, c) = [None] * s, (zero, zero)
    for i in reversed(range(s)):
        h, c = lstm_cell(
            g_prime[i],
            h,
            c,
            lstm.weight_ih_l0_reverse,
            lstm.weight_hh_l0_reverse,
            lstm.bias_ih_l0_reverse + lstm.bias_hh_l0_reverse,
        )
        bwd[i] = h
    g_full = g_prime + torch.stack(fwd) + torch.stack(bwd)
    torch.testing.assert_close(fce.embed_support(g_prime), g_full)

    # query: the LSTM's input is f'(x̂) and its hidden state is [h_{k-1}, r_{k-1}]
    cell = fce.query_cell
    w_x = cell.weight_ih[:, :dim]  # acts on f'(x̂)
    w_hr = torch.cat([cell.weight_hh, cell.weight_ih[:, dim:]], 1)  # acts on [h, r]
    h, c = f_prime, torch.zeros(m, dim, dtype=torch.float64)
    for _ in range(steps):
        r = F.softmax(h @ g_full.T, -1) @ g_full  # r_{k-1} = Σ a(h_{k-1}, g(x_i)) g(x_i)
        h_hat, c = lstm_cell(f_prime, torch.cat([h, r], -1), c, w_x, w_hr, cell.bias_ih + cell.bias_hh)
        h = h_hat + f_prime
    torch.testing.assert_close(fce.embed_query(f_prime, g_full), h)


def test_fce_shapes_and_any_number_of_ways():
    g = torch.Generator().manual_seed(3)
    alg = MatchingNet(Conv4(hidden=8, image_size=16), fce=True, fce_lstm_layers=2)
    alg.check_episode_shape(5, 20)
    episodes = [
        Episode(
            torch.rand(4 * 2, 1, 16, 16, generator=g),
            torch.arange(4).repeat_interleave(2),
            torch.rand(4 * 3, 1, 16, 16, generator=g),
            torch.arange(4).repeat_interleave(3),
        )
    ]
    out = alg.meta_loss(collate_episodes(episodes * 2))
    assert out.query_logits.shape == (2, 12, 4)
    torch.testing.assert_close(out.query_logits.exp().sum(-1), torch.ones(2, 12))


@pytest.mark.parametrize(
    "kwargs, key",
    [
        ({"model": Conv4(hidden=8, out_features=5)}, "model.out_features"),
        ({"model": nn.Flatten(), "fce": True}, "algorithm.fce"),
        ({"model": nn.Flatten(), "attention_steps": 0}, "algorithm.attention_steps"),
        ({"model": nn.Flatten(), "fce_lstm_layers": 0}, "algorithm.fce_lstm_layers"),
        ({"model": nn.Flatten(), "cosine_scale": 0.0}, "algorithm.cosine_scale"),
        ({"model": nn.Flatten(), "cosine_scale": "ten"}, "algorithm.cosine_scale"),
    ],
)
def test_bad_settings_name_the_key(kwargs, key):
    with pytest.raises(ConfigError, match=key):
        MatchingNet(**kwargs)


@pytest.mark.slow
def test_learns_omniglot_5way_1shot(omniglot_available, make_config):
    """100 Adam steps of 8 tasks, 5-way 1-shot: from ~48 % (untrained) to ~72 % on 100 fixed
    5-way 1-shot test episodes; asserted ≥ 60 % and ≥ 10 points above the untrained net."""
    objects = build(
        make_config(
            "dataset=omniglot",
            "algorithm=matching_net",
            "model.hidden=32",
            "sampler.queries=5",
            "sampler.train_queries=2",
            "sampler.meta_batch_size=8",
        )
    )
    alg, sampler = objects["algorithm"], objects["sampler"]
    splits = objects["datamodule"].splits
    before = episode_accuracy(alg, sampler, splits["test"])
    meta_train(alg, sampler, splits["train"], steps=100, lr=2e-3)
    after = episode_accuracy(alg, sampler, splits["test"])
    print(f"matching net 5w1s: before {before:.3f}, after {after:.3f}")
    assert after >= 0.60 and after >= before + 0.10
