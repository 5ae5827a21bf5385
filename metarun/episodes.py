"""Typed episodes, the seeded episode sampler, and the loaders' datasets.

Every random draw comes from a `torch.Generator` seeded by (seed, stream, step, task),
so a task's content does not depend on how many processes share the meta-batch: rank r
of W draws tasks ``r*B/W .. (r+1)*B/W - 1`` of each step. One process and W processes
therefore see exactly the same meta-batch, each rank a different slice of it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol, cast

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
    ``source``: which source of a several-source dataset (`SourceMixture`) it came from.
    """

    support_x: Tensor
    support_y: Tensor
    query_x: Tensor
    query_y: Tensor
    task_params: Tensor | None = None
    index: int = 0
    classes: Tensor | None = None
    source: int = 0


@dataclass
class EpisodeBatch:
    """B episodes of one shape stacked on a leading task axis.

    ``support_x [B, N*K, ...]``, ``support_y [B, N*K, ...]``, ``query_x [B, N*Q, ...]``,
    ``query_y [B, N*Q, ...]``, ``task_params [B, P]`` or None, ``index [B]``,
    ``classes [B, N]`` (split class id of each label) or None, ``source [B]`` (each
    episode's source, `Episode.source`) or None (all from source 0).
    """

    support_x: Tensor
    support_y: Tensor
    query_x: Tensor
    query_y: Tensor
    task_params: Tensor | None
    index: Tensor
    classes: Tensor | None = None
    source: Tensor | None = None

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
            part(self.source),
        )

    def task(self, i: int) -> Episode:
        """The i-th episode of the batch (views, no copy)."""
        params = None if self.task_params is None else self.task_params[i]
        classes = None if self.classes is None else self.classes[i]
        source = 0 if self.source is None else int(self.source[i])
        x, y = self.support_x[i], self.support_y[i]
        return Episode(x, y, self.query_x[i], self.query_y[i], params, int(self.index[i]), classes, source)

    def sources(self) -> Tensor:
        """``[B]`` each episode's source (0 when the dataset has one)."""
        return torch.zeros_like(self.index) if self.source is None else self.source

    def uniform(self) -> list[EpisodeBatch]:
        """The batch as same-shaped batches: itself."""
        return [self]


@dataclass
class RaggedBatch:
    """B episodes whose shapes differ (`VariableEpisodeSampler`), each held as a batch of one
    task: the per-task loop of every learner, since no tensor can stack them.

    ``parts``: B one-task `EpisodeBatch` es, in task order.
    """

    parts: list[EpisodeBatch]

    def __len__(self) -> int:
        return len(self.parts)

    @property
    def index(self) -> Tensor:
        """``[B]`` the episodes' indices, as `EpisodeBatch.index`."""
        return torch.cat([part.index for part in self.parts])

    def tasks(self, start: int, stop: int) -> RaggedBatch:
        """Tasks ``start .. stop - 1`` as a batch of their own."""
        return RaggedBatch(self.parts[start:stop])

    def task(self, i: int) -> Episode:
        """The i-th episode of the batch."""
        return self.parts[i].task(0)

    def uniform(self) -> list[EpisodeBatch]:
        """The batch as same-shaped batches: one per task."""
        return list(self.parts)


Batch = EpisodeBatch | RaggedBatch


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
        source=None
        if all(e.source == 0 for e in episodes)
        else torch.tensor([e.source for e in episodes], dtype=torch.long),  # [B]
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


class SourceMixture:
    """One split of several sources (``dataset=multi``, Meta-Dataset's "all sources"): a
    training episode comes from source s with probability ``weights[s]``, drawn from the
    task's own generator; evaluation episode i from source i mod S, so each source has its
    share of the fixed validation and test lists.

    Args:
        members: each source's split (`ClassImages`).
        names: each source's name, for the per-source tables.
        weights: each source's probability of giving a training episode (they sum to 1).
    """

    def __init__(self, members: list[TaskSource], names: list[str], weights: list[float]) -> None:
        self.members, self.names = members, names
        self.weights = torch.tensor(weights, dtype=torch.float64)
        counts = [int(cast(Any, m).num_classes) for m in members]
        self.offsets = [sum(counts[:s]) for s in range(len(counts))]  # class ids of the union
        self.num_classes = sum(counts)
        first = cast(Any, members[0])  # every source has the same normalisation (dataset=multi)
        self.mean, self.std = first.mean, first.std

    def choose(self, generator: torch.Generator, index: int | None) -> tuple[int, TaskSource]:
        """The source of a training episode (``index`` None: drawn by weight) or of evaluation
        episode ``index`` (in turn)."""
        if index is not None:
            which = index % len(self.members)
        else:
            which = int(torch.multinomial(self.weights, 1, generator=generator))
        return which, self.members[which]

    def check_episode(self, ways: int, shots: int, queries: int, prefix: str) -> None:
        for m in self.members:
            m.check_episode(ways, shots, queries, prefix)

    def episode(self, generator: torch.Generator, ways: int, shots: int, queries: int) -> Episode:
        which, source = self.choose(generator, None)
        episode = source.episode(generator, ways, shots, queries)
        episode.source = which
        return episode

    def check_batch(self, size: int, key: str) -> None:
        for m in self.members:
            cast(BatchSource, m).check_batch(size, key)

    def batch(self, generator: torch.Generator, size: int, augment: Augment | None = None) -> Episode:
        """A plain mini-batch of one source, drawn by weight; its labels are class ids of the
        union of the sources' classes (source s's classes follow those of sources 0..s-1)."""
        which, source = self.choose(generator, None)
        batch = cast(BatchSource, source).batch(generator, size, augment)
        batch.query_y = batch.query_y + self.offsets[which]
        batch.source = which
        return batch

    def __len__(self) -> int:
        return sum(len(cast(Any, m)) for m in self.members)


def member(source: TaskSource, generator: torch.Generator, index: int, train: bool) -> tuple[int, TaskSource]:
    """``(source index, split)`` an episode is drawn from: the split itself (source 0), or
    one member of a `SourceMixture`."""
    if isinstance(source, SourceMixture):
        return source.choose(generator, None if train else index)
    return 0, source


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

    kinds: tuple[str, ...] = ("classification", "regression")  # the task kinds it draws

    def check_learner(self, algorithm: Any) -> None:
        """Raise `ConfigError` if ``algorithm`` (a `MetaAlgorithm`) cannot learn from these episodes."""
        algorithm.check_episode_shape(self.train_ways, self.ways)

    def collate(self, episodes: list[Episode]) -> Batch:
        """The episodes as one meta-batch: stacked, since they share one shape."""
        return collate_episodes(episodes)

    def shape(self) -> dict[str, Any]:
        """The episode shape, as results.json records it."""
        return {
            "ways": self.ways,
            "shots": self.shots,
            "queries": self.queries,
            "train_ways": self.train_ways,
            "train_shots": self.train_shots,
        }

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
    ) -> Batch:
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
            return collate_episodes(drawn)  # plain mini-batches share one shape
        return self.collate([self._draw(source, task_generator(self.seed, TRAIN, step, t), t, augment) for t in tasks])

    def eval_episode(self, source: TaskSource, stream: int, index: int) -> Episode:
        """Episode `index` of the fixed validation (stream 1) or test (stream 2) list."""
        return self._draw(source, task_generator(self.eval_seed, stream, 0, index), index, None, train=False)

    def _draw(
        self, source: TaskSource, g: torch.Generator, index: int, augment: Augment | None, train: bool = True
    ) -> Episode:
        which, source = member(source, g, index, train)
        episode = self._draw_from(source, g, augment, train)
        episode.index, episode.source = index, which
        return episode

    def _draw_from(self, source: TaskSource, g: torch.Generator, augment: Augment | None, train: bool) -> Episode:
        if not train:  # evaluation episodes are never augmented
            episode = source.episode(g, self.ways, self.shots, self.queries)
        elif augment is None:
            episode = source.episode(g, self.train_ways, self.train_shots, self.train_queries)
        else:
            image_source = cast(AugmentableSource, source)  # train.py refuses a transform without images
            episode = image_source.episode(g, self.train_ways, self.train_shots, self.train_queries, augment=augment)
        return episode


class VariableSource(Protocol):
    """What `VariableEpisodeSampler` needs from a split of class images (`ClassImages`)."""

    name: str
    num_classes: int
    counts: Tensor  # [num_classes] images of each class
    groups: Tensor | None  # [num_classes] superclass of each class, where the dataset declares them

    def described_episode(
        self, generator: torch.Generator, classes: Tensor, shots: Tensor, queries: int, augment: Augment | None = None
    ) -> Episode: ...


@dataclass
class EpisodeDescription:
    """What one variable episode holds: ``classes [N]`` (split class ids), ``shots [N]``
    support images of each class, ``queries`` query images of every class."""

    classes: Tensor
    shots: Tensor
    queries: int


def variable_shots(
    images: Tensor, queries: int, beta: float, alpha: Tensor, max_support: int, max_support_per_class: int
) -> Tensor:
    """Meta-Dataset's support shots ``[N]`` for classes of ``images [N]`` images each, given
    the episode's ``queries`` per class and its draws ``beta`` in [0, 1) and ``alpha [N]``:
    |S| = min(max_support, Σ_c ⌊β · min(max_support_per_class, |c| − q)⌋ + 1), then
    k_c = min(⌊p_c · (|S| − N)⌋ + 1, |c| − q) with p_c ∝ |c| · exp(α_c)."""
    remaining = images - queries  # [N] at least 1 each
    contribution = remaining.clamp(max=max_support_per_class).double()  # [N]
    support = min(max_support, int(torch.floor(beta * contribution + 1).sum()))
    weights = images.double() * alpha.exp()  # [N]
    share = weights / weights.sum()  # [N]
    return torch.minimum(torch.floor(share * (support - len(images))).long() + 1, remaining)  # [N]


class VariableEpisodeSampler(EpisodeSampler):
    """Meta-Dataset's episodes (Triantafillou et al. 2020, section 3.2 and appendix): any
    number of ways, class-imbalanced supports, and a query size that follows the classes.

    For each episode, from the task's own generator:

    1. ways ~ U{min_ways, ..., min(max_ways, classes available)}; the classes uniformly
       without replacement (``hierarchy``: first a superclass, uniformly among those with at
       least ``min_ways`` classes, then the classes within it, as Meta-Dataset's Omniglot).
    2. queries per class q = min(max_queries, min_c ⌊|c| / 2⌋), where |c| is the images of class c.
    3. support size |S| = min(max_support, Σ_c ⌊β · min(max_support_per_class, |c| − q)⌋ + 1),
       β ~ U[0, 1).
    4. shots k_c = min(⌊p_c · (|S| − N)⌋ + 1, |c| − q), with p_c ∝ |c| · exp(α_c),
       α_c ~ U[min_log_weight, max_log_weight).

    Training, validation and test episodes all follow it; the meta-batch's tasks differ in
    shape, so they reach the learner as a `RaggedBatch` (one task per backward pass).

    Args:
        meta_batch_size, val_episodes, test_episodes, eval_batch_size, batch_size, seed,
            eval_seed: as `EpisodeSampler`.
        min_ways, max_ways: the range of ways (Meta-Dataset: 5 and 50).
        max_queries: most query images per class (10).
        max_support: most support images in an episode (500).
        max_support_per_class: most any class adds to the support size's draw (100).
        min_log_weight, max_log_weight: the range of a class's log weight (log ½, log 2).
        hierarchy: choose the classes within one superclass of a dataset that declares them
            (Omniglot's alphabets, tiered-ImageNet's categories).
    """

    def __init__(
        self,
        meta_batch_size: int,
        min_ways: int = 5,
        max_ways: int = 50,
        max_queries: int = 10,
        max_support: int = 500,
        max_support_per_class: int = 100,
        min_log_weight: float = -0.6931471805599453,
        max_log_weight: float = 0.6931471805599453,
        hierarchy: bool = False,
        val_episodes: int = 100,
        test_episodes: int = 600,
        eval_batch_size: int = 1,
        batch_size: int = 64,
        seed: int = 0,
        eval_seed: int = 0,
    ) -> None:
        self.min_ways = integer_at_least("sampler.min_ways", min_ways, 2)
        self.max_ways = _positive("sampler.max_ways", max_ways)
        if self.min_ways > self.max_ways:
            raise ConfigError(
                f"sampler.min_ways={self.min_ways} is not allowed with sampler.max_ways={self.max_ways}: "
                f"it must be at most max_ways."
            )
        self.max_queries = _positive("sampler.max_queries", max_queries)
        self.max_support = _positive("sampler.max_support", max_support)
        if self.max_support < self.max_ways:
            raise ConfigError(
                f"sampler.max_support={self.max_support} is not allowed with sampler.max_ways={self.max_ways}: "
                f"every class needs a support image, so it must be at least max_ways."
            )
        self.max_support_per_class = _positive("sampler.max_support_per_class", max_support_per_class)
        if not isinstance(min_log_weight, int | float) or not isinstance(max_log_weight, int | float):
            raise ConfigError(
                f"sampler.min_log_weight={min_log_weight!r} and sampler.max_log_weight={max_log_weight!r} are "
                f"not allowed: they must be numbers."
            )
        if min_log_weight > max_log_weight:
            raise ConfigError(
                f"sampler.min_log_weight={min_log_weight} is not allowed with sampler.max_log_weight="
                f"{max_log_weight}: it must be at most max_log_weight."
            )
        self.min_log_weight, self.max_log_weight = float(min_log_weight), float(max_log_weight)
        if not isinstance(hierarchy, bool):
            raise ConfigError(f"sampler.hierarchy={hierarchy!r} is not allowed: it must be true or false.")
        self.hierarchy = hierarchy
        super().__init__(
            ways=self.max_ways,
            shots=1,
            queries=self.max_queries,
            meta_batch_size=meta_batch_size,
            val_episodes=val_episodes,
            test_episodes=test_episodes,
            eval_batch_size=eval_batch_size,
            batch_size=batch_size,
            seed=seed,
            eval_seed=eval_seed,
        )

    kinds = ("classification",)

    def check_learner(self, algorithm: Any) -> None:
        algorithm.check_variable_episodes(self.min_ways, self.max_ways)

    def collate(self, episodes: list[Episode]) -> Batch:
        """Always a `RaggedBatch`: two episodes of one shape may still differ in their ways
        and in each class's shots, so they are never stacked."""
        return RaggedBatch([collate_episodes([e]) for e in episodes])

    def shape(self) -> dict[str, Any]:
        ways = self.min_ways if self.min_ways == self.max_ways else f"{self.min_ways}-{self.max_ways}"
        return {
            "episodes": "variable",
            "ways": ways,
            "shots": "variable",
            "queries": f"at most {self.max_queries}",
            "train_ways": ways,
            "train_shots": "variable",
        }

    def check(self, train: TaskSource, val: TaskSource, test: TaskSource, plain: bool = False) -> None:
        """Stop early when a split cannot give a variable episode: fewer classes than
        ``min_ways`` (within one superclass, with ``hierarchy``), or a class of one image."""
        splits = [val, test] if plain else [train, val, test]
        for split in splits:
            for one in split.members if isinstance(split, SourceMixture) else [split]:
                self._check_split(cast(VariableSource, one))
        if plain:
            cast(BatchSource, train).check_batch(self.batch_size, "sampler.batch_size")

    def _check_split(self, split: VariableSource) -> None:
        if self.hierarchy:
            if split.groups is None:
                raise ConfigError(
                    f"sampler.hierarchy=true is not allowed with split {split.name}: its dataset declares no "
                    f"superclasses (Omniglot's alphabets and tiered-ImageNet's categories do), so set "
                    f"sampler.hierarchy=false."
                )
            largest = int(torch.bincount(split.groups).max())
            if largest < self.min_ways:
                raise ConfigError(
                    f"sampler.min_ways={self.min_ways} is not allowed with sampler.hierarchy=true: the largest "
                    f"superclass of split {split.name} has {largest} classes, so min_ways must be at most {largest}."
                )
        elif split.num_classes < self.min_ways:
            raise ConfigError(
                f"sampler.min_ways={self.min_ways} is not allowed: split {split.name} has only "
                f"{split.num_classes} classes, so min_ways must be at most {split.num_classes}."
            )
        smallest = int(split.counts.min())
        if smallest < 2:
            raise ConfigError(
                f"sampler=variable is not allowed with split {split.name}: a class of it has {smallest} image, "
                f"and each class needs one support and one query image, so give every class at least 2 images."
            )

    def describe(self, split: VariableSource, g: torch.Generator) -> EpisodeDescription:
        """Draw one episode's classes, shots and queries (the class's docstring, steps 1-4)."""
        pool = torch.arange(split.num_classes)
        if self.hierarchy and split.groups is not None:
            sizes = torch.bincount(split.groups)  # [G]
            eligible = torch.nonzero(sizes >= self.min_ways).flatten()  # [G']
            group = eligible[torch.randint(len(eligible), (1,), generator=g)]
            pool = torch.nonzero(split.groups == group).flatten()  # classes of the superclass
        top = min(self.max_ways, len(pool))
        ways = int(torch.randint(self.min_ways, top + 1, (1,), generator=g))
        classes = pool[torch.randperm(len(pool), generator=g)[:ways]]  # [N]
        images = split.counts[classes]  # [N]
        queries = min(self.max_queries, int((images // 2).min()))
        beta = float(torch.rand((), generator=g, dtype=torch.float64))
        alpha = torch.empty(ways, dtype=torch.float64).uniform_(self.min_log_weight, self.max_log_weight, generator=g)
        shots = variable_shots(images, queries, beta, alpha, self.max_support, self.max_support_per_class)
        return EpisodeDescription(classes, shots, queries)

    def _draw_from(self, source: TaskSource, g: torch.Generator, augment: Augment | None, train: bool) -> Episode:
        split = cast(VariableSource, source)
        description = self.describe(split, g)
        return split.described_episode(
            g, description.classes, description.shots, description.queries, augment if train else None
        )


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

    def __iter__(self) -> Iterator[Batch]:
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


def first_episodes(sampler: EpisodeSampler, source: TaskSource, stream: int, size: int) -> Batch:
    """The first ``size`` episodes of a fixed evaluation list as one meta-batch."""
    episodes = EvalEpisodes(sampler, source, stream, size)
    return sampler.collate([episodes[i] for i in range(size)])


__all__ = [
    "Episode",
    "EpisodeBatch",
    "EpisodeSampler",
    "VariableEpisodeSampler",
    "EpisodeDescription",
    "variable_shots",
    "RaggedBatch",
    "SourceMixture",
    "Batch",
    "TrainEpisodes",
    "EvalEpisodes",
    "collate_episodes",
    "first_episodes",
    "task_generator",
    "TaskSource",
    "Augment",
    "STREAMS",
]
