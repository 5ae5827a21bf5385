"""Relation Networks: pairs of class and query maps, scores in [0, 1], MSE by hand, Omniglot."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from metarun.algorithms.relation_net import RelationModule, RelationNet
from metarun.build import build
from metarun.episodes import Episode, collate_episodes
from metarun.errors import ConfigError
from metarun.models.conv4 import Conv4
from tests.algorithms.learning import episode_accuracy, meta_train


def random_batch(generator: torch.Generator, tasks: int, ways: int, shots: int, queries: int, side: int = 28):
    """Random images with labels 0..ways-1, support shuffled within the episode."""
    episodes = []
    for _ in range(tasks):
        order = torch.randperm(ways * shots, generator=generator)
        episodes.append(
            Episode(
                torch.rand(ways * shots, 1, side, side, generator=generator),
                torch.arange(ways).repeat_interleave(shots)[order],
                torch.rand(ways * queries, 1, side, side, generator=generator),
                torch.arange(ways).repeat_interleave(queries),
            )
        )
    return collate_episodes(episodes)


def seeded(make, seed: int = 0):
    """Build a module with a seeded initialisation, leaving the global RNG as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return make()


@pytest.mark.parametrize("ways, shots, queries, pooled_blocks", [(5, 1, 3, 2), (3, 4, 2, 2), (4, 2, 1, 4)])
def test_scores_shapes_range_and_mse_against_one_hot(ways, shots, queries, pooled_blocks):
    g = torch.Generator().manual_seed(0)
    batch = random_batch(g, tasks=2, ways=ways, shots=shots, queries=queries)
    alg = seeded(lambda: RelationNet(Conv4(hidden=8, pooled_blocks=pooled_blocks), relation_hidden=8))
    out = alg.meta_loss(batch)
    assert out.query_logits.shape == (2, ways * queries, ways)
    assert ((out.query_logits >= 0) & (out.query_logits <= 1)).all()
    onehot = torch.zeros(2, ways * queries, ways)
    for b in range(2):
        for j, y in enumerate(batch.query_y[b].tolist()):
            onehot[b, j, y] = 1.0
    mse = ((out.query_logits - onehot) ** 2).sum() / out.query_logits.numel()
    torch.testing.assert_close(out.loss.detach(), mse)
    torch.testing.assert_close(alg.predict(batch).query_logits, out.query_logits)


class Recorder(nn.Module):
    """Stands in for the relation module: records its input pairs, scores = mean of a pair."""

    def __init__(self) -> None:
        super().__init__()
        self.pairs: Tensor | None = None

    def forward(self, pairs: Tensor) -> Tensor:
        self.pairs = pairs
        return pairs.flatten(1).mean(1)


class MapModel(nn.Module):
    """Images are already feature maps: ``features`` is the identity on ``[M, C, h, w]``."""

    def __init__(self, shape: tuple[int, int, int]) -> None:
        super().__init__()
        self.features, self.feature_shape = nn.Identity(), shape


def test_pairs_concatenate_the_class_sum_of_shots_then_the_query():
    g = torch.Generator().manual_seed(1)
    ways, shots, queries, shape = 3, 2, 2, (2, 3, 3)
    support = torch.randn(ways * shots, *shape, generator=g, dtype=torch.float64)
    support_y = torch.tensor([1, 0, 2, 2, 0, 1])
    query = torch.randn(ways * queries, *shape, generator=g, dtype=torch.float64)
    alg = RelationNet(MapModel(shape))
    alg.relation = Recorder()
    scores = alg.relation_scores(support, support_y, query, ways)  # [NQ, N]
    pairs = alg.relation.pairs.view(ways * queries, ways, 2 * shape[0], *shape[1:])
    for q in range(ways * queries):
        for c in range(ways):
            class_map = support[support_y == c].sum(0)  # sum of the K shots of class c
            torch.testing.assert_close(pairs[q, c], torch.cat([class_map, query[q]]))
    assert scores.shape == (ways * queries, ways)


def test_scores_do_not_depend_on_the_order_of_the_support_set():
    g = torch.Generator().manual_seed(2)
    batch = random_batch(g, tasks=1, ways=3, shots=3, queries=2)
    alg = seeded(lambda: RelationNet(Conv4(hidden=8, pooled_blocks=2)))
    order = torch.randperm(9, generator=g)
    shuffled = collate_episodes(
        [Episode(batch.support_x[0, order], batch.support_y[0, order], batch.query_x[0], batch.query_y[0])]
    )
    torch.testing.assert_close(alg.predict(shuffled).query_logits, alg.predict(batch).query_logits)


def test_relation_module_follows_the_paper_on_its_map():
    # the paper's Omniglot map 64×5×5: two pools (5 -> 2 -> 1), FC 64 -> 8 -> 1
    module = RelationModule((64, 5, 5), hidden=8, norm="transductive")
    assert module.convs[0].in_channels == 128 and module.fc[0].in_features == 64
    assert sum(isinstance(m, nn.MaxPool2d) for m in module.convs) == 2
    # a 1×1 map (standard Conv4 on 28×28) is not pooled
    assert not any(isinstance(m, nn.MaxPool2d) for m in RelationModule((8, 1, 1), 8, "none").convs)


def test_conv4_pooled_blocks_keeps_the_default_backbone():
    default = Conv4(hidden=8)
    assert default.feature_shape == (8, 1, 1) and default.embedding_dim == 8
    assert [type(m).__name__ for m in default.features][:4] == ["Conv2d", "BatchStatNorm2d", "ReLU", "MaxPool2d"]
    assert isinstance(default.features[1], nn.BatchNorm2d)
    assert [k for k in default.state_dict() if k.endswith("weight")][:3] == [
        "features.0.weight",
        "features.1.weight",
        "features.4.weight",
    ]  # checkpoint keys unchanged
    two = Conv4(hidden=8, pooled_blocks=2)
    assert two.feature_shape == (8, 7, 7) and two(torch.rand(3, 1, 28, 28)).shape == (3, 8 * 49)
    with pytest.raises(ConfigError, match="model.pooled_blocks"):
        Conv4(pooled_blocks=5)


@pytest.mark.parametrize(
    "kwargs, key",
    [
        ({"model": Conv4(hidden=8, out_features=5)}, "model.out_features"),
        ({"model": nn.Flatten()}, "model=Flatten"),
        ({"model": Conv4(hidden=8), "relation_hidden": 0}, "algorithm.relation_hidden"),
        ({"model": Conv4(hidden=8), "norm": "layer"}, "algorithm.norm"),
    ],
)
def test_bad_settings_name_the_key(kwargs, key):
    with pytest.raises(ConfigError, match=key):
        RelationNet(**kwargs)


def test_any_number_of_ways_at_test():
    RelationNet(Conv4(hidden=8, pooled_blocks=2)).check_episode_shape(5, 20)


@pytest.mark.slow
def test_learns_omniglot_5way_1shot(omniglot_available, make_config):
    """150 Adam steps of 4 tasks, 5-way 1-shot (16 channels): from ~20 % (untrained relation
    module) to ~79 % on 100 fixed 5-way 1-shot test episodes; asserted ≥ 65 %."""
    objects = build(
        make_config(
            "dataset=omniglot",
            "algorithm=relation_net",
            "model.hidden=16",
            "sampler.queries=5",
            "sampler.train_queries=2",
            "sampler.meta_batch_size=4",
        )
    )
    alg, sampler = objects["algorithm"], objects["sampler"]
    splits = objects["datamodule"].splits
    before = episode_accuracy(alg, sampler, splits["test"])
    meta_train(alg, sampler, splits["train"], steps=150, lr=3e-3)
    after = episode_accuracy(alg, sampler, splits["test"])
    print(f"relation net 5w1s: before {before:.3f}, after {after:.3f}")
    assert after >= 0.65 and after >= before + 0.30
