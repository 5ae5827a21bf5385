"""FEAT: the set-to-set Transformer written out by hand, equivariant to the order of the classes;
the regulariser by hand; the meta-gradient (dropout and regulariser included) against finite
differences (float64); it learns Omniglot."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from metarun.algorithms.feat import FEAT, SetAttention
from metarun.episodes import EpisodeBatch
from metarun.errors import ConfigError
from tests.algorithms.learning import finite_difference, meta_gradient, meta_loss_value


class Embed(nn.Module):
    """A tiny embedding network for float64 checks: x [M, 4] -> tanh(xW + b) [M, 3]."""

    embedding_dim = 3

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.layer(x))


def feat(**kwargs) -> FEAT:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return FEAT(Embed(), **({"temperature": 2.0, "contrastive_temperature": 3.0, "balance": 0.5} | kwargs)).double()


def batch(tasks: int = 2, ways: int = 3, shots: int = 2, queries: int = 2, seed: int = 0) -> EpisodeBatch:
    g = torch.Generator().manual_seed(seed)
    support_y = torch.arange(ways).repeat(shots).expand(tasks, -1)  # classes interleaved, not grouped
    query_y = torch.arange(ways).repeat_interleave(queries).expand(tasks, -1)
    return EpisodeBatch(
        torch.randn(tasks, ways * shots, 4, generator=g, dtype=torch.float64),
        support_y,
        torch.randn(tasks, ways * queries, 4, generator=g, dtype=torch.float64),
        query_y,
        None,
        torch.arange(tasks),
    )


def test_set_attention_is_the_written_out_transformer_layer():
    layer = SetAttention(5, dropout=0.0, attention_dropout=0.0).double()
    x = torch.randn(2, 4, 5, dtype=torch.float64)
    q, k, v = x @ layer.query.weight.T, x @ layer.key.weight.T, x @ layer.value.weight.T
    attention = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(5), -1)
    h = x + (attention @ v) @ layer.out.weight.T + layer.out.bias
    expected = (h - h.mean(-1, keepdim=True)) / torch.sqrt(h.var(-1, unbiased=False, keepdim=True) + 1e-5)
    torch.testing.assert_close(layer(x), expected * layer.norm.weight + layer.norm.bias)


def test_adapted_prototypes_are_permutation_equivariant_in_the_classes():
    alg = feat().eval()
    prototypes = torch.randn(2, 5, 3, dtype=torch.float64)
    order = torch.tensor([3, 0, 4, 1, 2])
    torch.testing.assert_close(alg.attention(prototypes[:, order]), alg.attention(prototypes)[:, order])
    # relabelling the classes of an episode permutes the columns of its logits
    episode = batch()
    relabel = torch.tensor([2, 0, 1])  # class c becomes relabel[c]
    renamed = EpisodeBatch(
        episode.support_x, relabel[episode.support_y], episode.query_x, relabel[episode.query_y], None, episode.index
    )
    logits, again = alg.predict(episode).query_logits, alg.predict(renamed).query_logits
    torch.testing.assert_close(again[..., relabel], logits)


def test_regulariser_by_hand():
    """Each class's support and query embeddings as one set through the Transformer; every
    embedding scored against the sets' centres; cross-entropy over the task's classes."""
    alg = feat(dropout=0.0, attention_dropout=0.0)
    episode = batch(tasks=1)
    z = torch.cat([alg.model(episode.support_x[0]), alg.model(episode.query_x[0])])  # [M, 3]
    labels = torch.cat([episode.support_y[0], episode.query_y[0]])
    centres = torch.stack([alg.attention(z[labels == c][None])[0].mean(0) for c in range(3)])
    expected = F.cross_entropy(-torch.cdist(z, centres).pow(2) / 3.0, labels)
    got = alg.contrastive_loss(z[None], episode, 3, None)
    torch.testing.assert_close(got, expected)


def test_meta_gradient_matches_finite_differences():
    """In training: dropout masks (fixed for a step), the regulariser, every parameter."""
    alg = feat(dropout=0.3, attention_dropout=0.2)
    episode = batch()
    expected = finite_difference(meta_loss_value(alg, episode), alg.parameters())
    torch.testing.assert_close(meta_gradient(alg, episode), expected, rtol=1e-6, atol=1e-8)


def test_dropout_masks_follow_the_episode_and_the_step_not_the_batch():
    alg = feat()
    episode = batch(tasks=2)
    both = alg.meta_loss(episode).query_logits
    second = alg.meta_loss(episode.tasks(1, 2)).query_logits
    torch.testing.assert_close(second[0], both[1])
    alg.end_outer_step()
    assert not torch.equal(alg.meta_loss(episode).query_logits, both)  # a new step, new masks


@pytest.mark.parametrize(
    "key, value",
    [("temperature", 0.0), ("contrastive_temperature", -1.0), ("balance", -0.1), ("dropout", 1.0)],
)
def test_bad_settings_name_the_key(key, value):
    with pytest.raises(ConfigError, match=rf"algorithm\.{key}={value!r} is not allowed"):
        FEAT(Embed(), **{key: value})


@pytest.mark.slow
def test_learns_omniglot_5way_1shot(omniglot_available, make_config):
    """60 Adam steps of 8 tasks, 5-way 1-shot, from scratch (Conv4, 32 channels), against
    the untrained learner on the same 100 fixed test episodes. Measured: 0.489 -> 0.718."""
    from tests.algorithms.learning import check_episodic_head_learns_omniglot

    check_episodic_head_learns_omniglot(make_config, "feat")
