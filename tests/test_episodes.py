"""The episode sampler: shapes, label remapping, disjointness, seeding, rank slicing."""

from __future__ import annotations

import pytest
import torch

from metarun.datasets.base import ClassImages
from metarun.episodes import TEST, VAL, EpisodeSampler, task_generator
from metarun.errors import ConfigError


def numbered_images(classes: int = 12, per_class: int = 8) -> ClassImages:
    """Image i has every pixel equal to i (mod 256) so its identity survives sampling."""
    n = classes * per_class
    ids = torch.arange(n)
    images = (ids % 256).to(torch.uint8).view(n, 1, 1, 1).expand(n, 1, 2, 2).contiguous()
    labels = ids // per_class
    return ClassImages(images, labels, "numbered")


def identities(x: torch.Tensor) -> torch.Tensor:
    return (x[:, 0, 0, 0] * 255).round().long()


def test_shapes_labels_and_disjoint_support_and_query():
    source = numbered_images()
    sampler = EpisodeSampler(ways=5, shots=2, queries=3, meta_batch_size=4)
    batch = sampler.train_batch(source, step=0)
    assert batch.support_x.shape == (4, 10, 1, 2, 2)
    assert batch.query_x.shape == (4, 15, 1, 2, 2)
    for i in range(4):
        task = batch.task(i)
        s_ids, q_ids = identities(task.support_x), identities(task.query_x)
        assert set(s_ids.tolist()).isdisjoint(q_ids.tolist())
        assert torch.equal(torch.bincount(task.support_y, minlength=5), torch.full((5,), 2))
        assert torch.equal(torch.bincount(task.query_y, minlength=5), torch.full((5,), 3))
        # every image of episode label c comes from one original class, one per label
        original = torch.cat([s_ids, q_ids]) // 8
        labels = torch.cat([task.support_y, task.query_y])
        mapping = {int(label): set(original[labels == label].tolist()) for label in range(5)}
        assert all(len(v) == 1 for v in mapping.values())
        assert len(set().union(*mapping.values())) == 5


def test_seeded_by_seed_step_and_task():
    source = numbered_images()
    a = EpisodeSampler(5, 1, 2, 4, seed=3).train_batch(source, step=7)
    b = EpisodeSampler(5, 1, 2, 4, seed=3).train_batch(source, step=7)
    c = EpisodeSampler(5, 1, 2, 4, seed=3).train_batch(source, step=8)
    d = EpisodeSampler(5, 1, 2, 4, seed=4).train_batch(source, step=7)
    assert torch.equal(a.support_x, b.support_x) and torch.equal(a.query_x, b.query_x)
    assert not torch.equal(a.support_x, c.support_x)
    assert not torch.equal(a.support_x, d.support_x)
    assert not torch.equal(a.support_x[0], a.support_x[1])


def test_ranks_draw_disjoint_slices_of_the_same_meta_batch():
    source = numbered_images()
    sampler = EpisodeSampler(5, 1, 2, meta_batch_size=4)
    full = sampler.train_batch(source, step=2)
    r0 = sampler.train_batch(source, step=2, rank=0, world_size=2)
    r1 = sampler.train_batch(source, step=2, rank=1, world_size=2)
    assert r0.index.tolist() == [0, 1] and r1.index.tolist() == [2, 3]
    assert torch.equal(torch.cat([r0.support_x, r1.support_x]), full.support_x)
    assert torch.equal(torch.cat([r0.query_y, r1.query_y]), full.query_y)
    with pytest.raises(ConfigError, match="sampler.meta_batch_size=4"):
        sampler.shard(3)


def test_evaluation_episodes_are_fixed_and_independent_of_the_training_seed():
    source = numbered_images()
    a = EpisodeSampler(5, 1, 2, 4, seed=0).eval_episode(source, TEST, 11)
    b = EpisodeSampler(5, 1, 2, 4, seed=99).eval_episode(source, TEST, 11)
    v = EpisodeSampler(5, 1, 2, 4, seed=0).eval_episode(source, VAL, 11)
    assert torch.equal(a.support_x, b.support_x) and a.index == 11
    assert not torch.equal(a.support_x, v.support_x)


def test_train_shape_differs_from_test_shape():
    source = numbered_images(classes=70)
    sampler = EpisodeSampler(5, 1, 2, 1, train_ways=60, train_shots=1, train_queries=5)
    assert sampler.train_batch(source, 0).query_x.shape[1] == 300
    assert sampler.eval_episode(source, TEST, 0).query_x.shape[0] == 10


def test_generators_are_independent_objects():
    g1, g2 = task_generator(0, 0, 0, 0), task_generator(0, 0, 0, 0)
    assert torch.equal(torch.rand(3, generator=g1), torch.rand(3, generator=g2))
    assert not torch.equal(
        torch.rand(3, generator=task_generator(0, 0, 0, 1)), torch.rand(3, generator=task_generator(0, 0, 1, 0))
    )


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"ways": 0}, r"sampler\.ways=0"),
        ({"shots": -1}, r"sampler\.shots=-1"),
        ({"queries": 0}, r"sampler\.queries=0"),
        ({"meta_batch_size": 0}, r"sampler\.meta_batch_size=0"),
    ],
)
def test_non_positive_shapes_are_refused(kwargs, message):
    settings = {"ways": 5, "shots": 1, "queries": 1, "meta_batch_size": 1} | kwargs
    with pytest.raises(ConfigError, match=message):
        EpisodeSampler(**settings)


def test_impossible_episode_shapes_name_the_key_and_the_limit():
    source = numbered_images(classes=12, per_class=8)
    with pytest.raises(ConfigError, match=r"sampler\.ways=13 .* at most 12"):
        source.check_episode(13, 1, 1, "sampler.")
    with pytest.raises(ConfigError, match=r"sampler\.shots \+ sampler\.queries = 5 \+ 4 = 9 .* at most 8"):
        source.check_episode(5, 5, 4, "sampler.")
