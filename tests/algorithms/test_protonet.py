"""Prototypical Networks on a hand-computed episode."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from metarun.algorithms.protonet import ProtoNet, prototype_logits
from metarun.episodes import Episode, collate_episodes
from metarun.errors import ConfigError
from metarun.models.conv4 import Conv4


def point_episode() -> Episode:
    """2-way 2-shot on 2-D points stored as [C=1, H=1, W=2] images."""
    support = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 2.0], [0.0, 4.0]])
    query = torch.tensor([[1.0, 1.0], [0.0, 3.0]])
    return Episode(support.view(4, 1, 1, 2), torch.tensor([0, 0, 1, 1]), query.view(2, 1, 1, 2), torch.tensor([0, 1]))


def test_hand_computed_episode():
    batch = collate_episodes([point_episode()])
    out = ProtoNet(nn.Flatten()).meta_loss(batch)
    # prototypes (1, 0) and (0, 3); query (1, 1): d² = 1 and 5; query (0, 3): d² = 10 and 0
    expected = torch.tensor([[[-1.0, -5.0], [-10.0, 0.0]]])
    torch.testing.assert_close(out.query_logits, expected)
    loss = (math.log(1 + math.exp(-4.0)) + math.log(1 + math.exp(-10.0))) / 2
    assert out.loss.item() == pytest.approx(loss, rel=1e-5)


def test_logits_are_negative_squared_distances_to_class_means():
    g = torch.Generator().manual_seed(0)
    support, query = torch.randn(3, 6, 5, generator=g), torch.randn(3, 4, 5, generator=g)
    labels = torch.tensor([0, 1, 2, 0, 1, 2]).expand(3, 6)
    logits = prototype_logits(support, labels, query, 3)
    protos = torch.stack([support[:, labels[0] == c].mean(1) for c in range(3)], 1)  # [B, N, D]
    torch.testing.assert_close(logits, -((query[:, :, None] - protos[:, None]) ** 2).sum(-1), rtol=1e-5, atol=1e-5)
    assert F.softmax(logits, -1).sum(-1).allclose(torch.ones(3, 4))


def test_any_number_of_ways_at_test_and_no_head():
    ProtoNet(Conv4(hidden=8)).check_episode_shape(60, 5)
    with pytest.raises(ConfigError, match="model.out_features"):
        ProtoNet(Conv4(hidden=8, out_features=5))


def test_a_regression_dataset_is_refused_before_training(make_config):
    from metarun.build import build

    with pytest.raises(ConfigError, match=r"algorithm=ProtoNet is not allowed with dataset=Sinusoid"):
        build(make_config("algorithm=protonet"))
