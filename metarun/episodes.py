"""Typed episodes, the seeded episode sampler, and the loaders' datasets.

Every random draw comes from a `torch.Generator` seeded by (seed, stream, step, task),
so a task's content does not depend on how many processes share the meta-batch: rank r
of W draws tasks ``r*B/W .. (r+1)*B/W - 1`` of each step. One process and W processes
therefore see exactly the same meta-batch, each rank a different slice of it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol, cast

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, IterableDataset

from metarun.checks import integer_at_least
from metarun.errors import ConfigError

TRAIN, VAL, TEST = 0, 1, 2
STREAMS = {"train": TRAIN, "val": VAL, "test": TEST}


def task_generator(seed: int, stream: int, step: int, task: int) -> torch.Generator:
    """A generator for one task, independent of every other (seed, stream, step, task)."""
    state = np.random.SeedSequence([seed, stream, step, task]).generate_state(2, np.uint64)
    return torch.Generator().manual_seed(int(state[0] >> np.uint64(1)))


@dataclass
class Episode:
    """One task: a labelled support set and a query set to predict.

    Classification: ``support_x [N*K, C, H, W]``, ``support_y [N*K]`` int64 in 0..N-1,
    ``query_x [N*Q, C, H, W]``, ``query_y [N*Q]``. Regression: ``x [K, D_in]``,
    ``y [K, D_out]`` float. ``task_params [P]`` describes a synthetic task (for plots).
    ``classes [N]``: the split's class id of each episode label 0..N-1, when the source has
    classes (used by supervised pre-training, e.g. the fine-tuning baseline), else None.
    """

    support_x: Tensor
    support_y: Tensor
    query_x: Tensor
    query_y: Tensor
    task_params: Tensor | None = None
    index: int = 0
    classes: Tensor | None = None


@dataclass
class EpisodeBatch:
    """B episodes of one shape stacked on a leading task axis.

    ``support_x [B, N*K, ...]``, ``support_y [B, N*K, ...]``, ``query_x [B, N*Q, ...]``,
    ``query_y [B, N*Q, ...]``, ``task_params [B, P]`` or None, ``index [B]``,
    ``classes [B, N]`` (split class id of each label) or None.
    """

    support_x: Tensor
    support_y: Tensor
    query_x: Tensor
    query_y: Tensor
    task_params: Tensor | None
    index: Tensor
    classes: Tensor | None = None

    def __len__(self) -> int:
        return self.support_x.shape[0]

    def tasks(self, start: int, stop: int) -> EpisodeBatch:
        """Tasks ``start .. stop - 1`` as a batch of their own (views, no copy)."""

        def part(t: Tensor | None) -> Tensor | None:
            return None if t is None else t[start:stop]

        return EpisodeBatch(
            self.support_x[start:stop],
            self.support_y[start:stop],
            self.query_x[start:stop],
            self.query_y[start:stop],
            part(self.task_params),
            self.index[start:stop],
            part(self.classes),
        )

    def task(self, i: int) -> Episode:
        """The i-th episode of the batch (views, no copy)."""
        params = None if self.task_params is None else self.task_params[i]
        classes = None if self.classes is None else self.classes[i]
        return Episode(
            self.support_x[i], self.support_y[i], self.query_x[i], self.query_y[i], params, int(self.index[i]), classes
        )


def collate_episodes(episodes: list[Episode]) -> EpisodeBatch:
    """Stack same-shaped episodes into an `EpisodeBatch`."""
    params = [e.task_params for e in episodes]
    classes = [e.classes for e in episodes]
    return EpisodeBatch(
        support_x=torch.stack([e.support_x for e in episodes]),  # [B, N*K, ...]
        support_y=torch.stack([e.support_y for e in episodes]),  # [B, N*K, ...]
        query_x=torch.stack([e.query_x for e in episodes]),  # [B, N*Q, ...]
        query_y=torch.stack([e.query_y for e in episodes]),  # [B, N*Q, ...]
        task_params=None
        if any(p is None for p in params)
        else torch.stack([p for p in params if p is not None]),  # [B, P]
        index=torch.tensor([e.index for e in episodes], dtype=torch.long),  # [B]
        classes=None
        if any(c is None for c in classes)
        else torch.stack([c for c in classes if c is not None]),  # [B, N]
    )


class Augment(Protocol):
    """A training augmentation (`metarun.transforms`): images ``[M, C, H, W]`` in [0, 1] and
    the task's generator in, augmented images out."""

    def __call__(self, x: Tensor, generator: torch.Generator) -> Tensor: ...


class TaskSource(Protocol):
    """What the sampler needs from a dataset split (class images or a task family). Image
    splits also take ``augment=`` (keyword) for training episodes."""

    def check_episode(self, ways: int, shots: int, queries: int, prefix: str) -> None: ...

    def episode(self, generator: torch.Generator, ways: int, shots: int, queries: int) -> Episode: ...


class BatchSource(TaskSource, Protocol):
    """A source of plain mini-batches for whole-class training (`ClassImages`)."""

    def check_batch(self, size: int, key: str) -> None: ...

    def batch(self, generator: torch.Generator, size: int, augment: Augment | None = None) -> Episode: ...


class AugmentableSource(TaskSource, Protocol):
    """A source of image episodes that also augments training episodes (`ClassImages`)."""

    def episode(
        self, generator: torch.Generator, ways: int, shots: int, queries: int, augment: Augment | None = None
    ) -> Episode: ...


def _positive(key: str, value: int) -> int:
    return integer_at_least(key, value, 1)


class EpisodeSampler:
    """Draws N-way K-shot Q-query episodes with explicit, per-task generators.

    Args:
        ways, shots, queries: the evaluation (validation and test) episode shape.
        meta_batch_size: tasks per outer update, summed over all processes.
        train_ways, train_shots, train_queries: the training shape when a paper trains
            differently (Snell et al. 2017 train ProtoNet 60-way); None means "as test".
        val_episodes, test_episodes: sizes of the fixed validation and test lists.
        eval_batch_size: episodes per validation/test loader batch.
        batch_size: images per plain mini-batch, for the learners that train on whole
            classes rather than episodes (``algorithm=pretrain``, ``rfs``): each of the
            ``meta_batch_size`` tasks of a training step is then one such mini-batch.
        seed: seeds training tasks; eval_seed seeds the fixed validation/test lists, so
            every algorithm and training seed is scored on the same episodes.
    """

    def __init__(
        self,
        ways: int,
        shots: int,
        queries: int,
        meta_batch_size: int,
        train_ways: int | None = None,
        train_shots: int | None = None,
        train_queries: int | None = None,
        val_episodes: int = 100,
        test_episodes: int = 600,
        eval_batch_size: int = 1,
        batch_size: int = 64,
        seed: int = 0,
        eval_seed: int = 0,
    ) -> None:
        self.ways = _positive("sampler.ways", ways)
        self.shots = _positive("sampler.shots", shots)
        self.queries = _positive("sampler.queries", queries)
        self.meta_batch_size = _positive("sampler.meta_batch_size", meta_batch_size)
        self.train_ways = _positive("sampler.train_ways", ways if train_ways is None else train_ways)
        self.train_shots = _positive("sampler.train_shots", shots if train_shots is None else train_shots)
        self.train_queries = _positive("sampler.train_queries", queries if train_queries is None else train_queries)
        self.val_episodes = _positive("sampler.val_episodes", val_episodes)
        self.test_episodes = _positive("sampler.test_episodes", test_episodes)
        self.eval_batch_size = _positive("sampler.eval_batch_size", eval_batch_size)
        self.batch_size = _positive("sampler.batch_size", batch_size)
        self.seed = seed
        self.eval_seed = eval_seed

    def check(self, train: TaskSource, val: TaskSource, test: TaskSource, plain: bool = False) -> None:
        """Stop early when a split cannot provide the requested episode shapes (``plain``:
        training draws mini-batches of ``batch_size`` images instead of episodes).

        Evaluation shapes are checked first: train_* default to ways/shots/queries, so a
        bad ``sampler.ways`` is reported under the key the user set.
        """
        for split in (val, test):
            split.check_episode(self.ways, self.shots, self.queries, "sampler.")
        if plain:
            cast(BatchSource, train).check_batch(self.batch_size, "sampler.batch_size")
        else:
            train.check_episode(self.train_ways, self.train_shots, self.train_queries, "sampler.train_")

    def shard(self, world_size: int) -> int:
        """Tasks per process; the meta-batch must split evenly across processes."""
        if self.meta_batch_size % world_size:
            raise ConfigError(
                f"sampler.meta_batch_size={self.meta_batch_size} is not allowed with "
                f"{world_size} processes: it must be divisible by the number of processes."
            )
        return self.meta_batch_size // world_size

    def train_batch(
        self,
        source: TaskSource,
        step: int,
        rank: int = 0,
        world_size: int = 1,
        augment: Augment | None = None,
        plain: bool = False,
    ) -> EpisodeBatch:
        """This rank's slice of the meta-batch of training step `step`; ``augment`` (the
        `transform` group) draws from each task's own generator, so it is the same on any
        number of processes. ``plain``: each task is a mini-batch of ``batch_size`` images
        (`BatchSource.batch`) instead of an episode."""
        per_rank = self.shard(world_size)
        tasks = range(rank * per_rank, (rank + 1) * per_rank)
        if plain:
            batches = cast(BatchSource, source)
            drawn = [batches.batch(task_generator(self.seed, TRAIN, step, t), self.batch_size, augment) for t in tasks]
            for t, episode in zip(tasks, drawn):
                episode.index = t
            return collate_episodes(drawn)
        return collate_episodes(
            [self._draw(source, task_generator(self.seed, TRAIN, step, t), t, augment) for t in tasks]
        )

    def eval_episode(self, source: TaskSource, stream: int, index: int) -> Episode:
        """Episode `index` of the fixed validation (stream 1) or test (stream 2) list."""
        return self._draw(source, task_generator(self.eval_seed, stream, 0, index), index, None, train=False)

    def _draw(
        self, source: TaskSource, g: torch.Generator, index: int, augment: Augment | None, train: bool = True
    ) -> Episode:
        if not train:  # evaluation episodes are never augmented
            episode = source.episode(g, self.ways, self.shots, self.queries)
        elif augment is None:
            episode = source.episode(g, self.train_ways, self.train_shots, self.train_queries)
        else:
            image_source = cast(AugmentableSource, source)  # train.py refuses a transform without images
            episode = image_source.episode(g, self.train_ways, self.train_shots, self.train_queries, augment=augment)
        episode.index = index
        return episode


class TrainEpisodes(IterableDataset):
    """Endless training meta-batches starting at `start_step` (set on resume); ``plain``:
    of mini-batches (`EpisodeSampler.train_batch`)."""

    def __init__(
        self,
        sampler: EpisodeSampler,
        source: TaskSource,
        start_step: int,
        rank: int,
        world_size: int,
        augment: Augment | None = None,
        plain: bool = False,
    ) -> None:
        self.sampler, self.source, self.augment, self.plain = sampler, source, augment, plain
        self.start_step, self.rank, self.world_size = start_step, rank, world_size

    def __iter__(self) -> Iterator[EpisodeBatch]:
        step = self.start_step
        while True:
            yield self.sampler.train_batch(self.source, step, self.rank, self.world_size, self.augment, self.plain)
            step += 1


class EvalEpisodes(Dataset):
    """The fixed, seeded list of validation or test episodes."""

    def __init__(self, sampler: EpisodeSampler, source: TaskSource, stream: int, size: int) -> None:
        self.sampler, self.source, self.stream, self.size = sampler, source, stream, size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> Episode:
        return self.sampler.eval_episode(self.source, self.stream, index)


def first_episodes(sampler: EpisodeSampler, source: TaskSource, stream: int, size: int) -> EpisodeBatch:
    """The first ``size`` episodes of a fixed evaluation list as one batch."""
    episodes = EvalEpisodes(sampler, source, stream, size)
    return collate_episodes([episodes[i] for i in range(size)])


__all__ = [
    "Episode",
    "EpisodeBatch",
    "EpisodeSampler",
    "TrainEpisodes",
    "EvalEpisodes",
    "collate_episodes",
    "first_episodes",
    "task_generator",
    "TaskSource",
    "Augment",
    "STREAMS",
]
