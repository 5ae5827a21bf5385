"""The dataset contract (`Dataset`, `Split`) and `ClassImages`, a split of an image dataset
held in memory as one uint8 tensor, indexed by class.

Every dataset the runner, the plots and ``metarun-predict`` meet keeps the `Dataset`
contract; nothing outside a dataset probes it with ``getattr`` or ``hasattr``.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from typing import TYPE_CHECKING, ClassVar, Literal, Protocol

import torch
from torch import Tensor

from metarun.episodes import Augment, Episode
from metarun.errors import ConfigError

if TYPE_CHECKING:
    import numpy as np
    from omegaconf import DictConfig
    from PIL import Image

TaskKind = Literal["classification", "regression"]
SPLITS = ("train", "val", "test")


class Split(Protocol):
    """One split of a dataset, as the episode sampler draws from it."""

    #: classes in the split (0 for regression tasks)
    num_classes: int

    def check_episode(self, ways: int, shots: int, queries: int, prefix: str) -> None:
        """Raise `ConfigError` if an episode of this shape cannot be drawn (``prefix``: the
        sampler's key prefix, e.g. ``"sampler.train_"``)."""

    def episode(self, generator: torch.Generator, ways: int, shots: int, queries: int) -> Episode:
        """One episode drawn with ``generator``."""


class Dataset(abc.ABC):
    """What every dataset states about itself and provides.

    Class attributes (read before the dataset is built, so a bad combination of groups is
    refused before any data is read):

    - ``kind``: the task kind, "classification" (labels) or "regression" (float targets).
    - ``takes_images``: whether its examples are images; then `prepare_image` turns a
      user's image into one of its examples (``metarun-predict``) and the ``transform`` and
      ``test_dataset`` groups apply.
    - ``has_curve``: whether `curve` gives a regression task's true function (for plots).
    - ``meta_test_only``: whether it is a meta-test set only (``test_dataset=``), with no
      training or validation classes (BSCD-FSL's domains).

    Instances give `split` ("train", "val", "test") and `class_count`.
    """

    kind: ClassVar[TaskKind] = "classification"
    takes_images: ClassVar[bool] = True
    has_curve: ClassVar[bool] = False
    meta_test_only: ClassVar[bool] = False  # a test set only (test_dataset=...), never trained on

    @classmethod
    def complete(cls, node: DictConfig) -> None:
        """Fill, in the dataset group's config ``node``, settings that follow from the others
        (before it is built; nothing by default)."""
        return None

    @abc.abstractmethod
    def split(self, name: str) -> Split:
        """The "train", "val" or "test" split."""

    def class_count(self, name: str) -> int:
        """How many classes split ``name`` has (a regression dataset: 0)."""
        return self.split(name).num_classes

    def superclasses(self, name: str) -> list[str] | None:
        """The superclass of each class of split ``name``, in label order, where the dataset
        declares a hierarchy (`VariableEpisodeSampler`'s ``hierarchy``), else None."""
        return None

    @staticmethod
    def prepare_image(image: Image.Image, size: int, channels: int) -> np.ndarray:
        """A user's image prepared as this dataset's examples are: uint8 ``[C, size, size]``."""
        raise NotImplementedError

    def curve(self, params: Tensor, x: Tensor) -> Tensor:
        """The true function of a regression task with ``task_params`` ``params`` at ``x``."""
        raise NotImplementedError


class ClassImages:
    """The images of one split, grouped by class, ready for episode sampling.

    Args:
        images: uint8 ``[N, C, H, W]``; no image file is decoded per episode.
        labels: int64 ``[N]`` class ids in ``0..num_classes-1``.
        name: the split's name for error messages (e.g. "omniglot/vinyals/train").
        mean, std: per-channel normalisation applied to the [0, 1] pixels of every episode
            (after any augmentation), or None for none.
        names: the class name of each label, for messages (None: class ids are named).
        superclasses: the superclass of each label (Omniglot's alphabet, tiered-ImageNet's
            category), for `VariableEpisodeSampler`'s ``hierarchy``, or None.
    """

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        name: str,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        names: Sequence[str] | None = None,
        superclasses: Sequence[str] | None = None,
    ) -> None:
        self.names = None if names is None else list(names)
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"images must be uint8 [N, C, H, W], got {images.dtype} {tuple(images.shape)}")
        self.images, self.labels, self.name = images, labels.long(), name
        self.mean = None if mean is None else torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)  # [C, 1, 1]
        self.std = None if std is None else torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)  # [C, 1, 1]
        self.num_classes = int(self.labels.max()) + 1 if len(self.labels) else 0
        counts = torch.bincount(self.labels, minlength=self.num_classes)  # [num_classes]
        self.counts = counts
        self.min_count = int(counts.min()) if self.num_classes else 0
        order = torch.argsort(self.labels, stable=True)  # image ids grouped by class
        starts = torch.cumsum(counts, 0) - counts  # [num_classes]
        width = int(counts.max()) if self.num_classes else 0
        slot = torch.arange(width)  # [W]
        # by_class[c, j] = j-th image of class c (padded with its first image)
        pos = starts[:, None] + torch.minimum(slot[None, :], counts[:, None] - 1)  # [num_classes, W]
        self.by_class = order[pos]
        self.groups: Tensor | None = None  # [num_classes] superclass id of each class
        if superclasses is not None:
            ids = {name: i for i, name in enumerate(dict.fromkeys(superclasses))}
            self.groups = torch.tensor([ids[name] for name in superclasses], dtype=torch.long)

    def __len__(self) -> int:
        return len(self.labels)

    def check_episode(self, ways: int, shots: int, queries: int, prefix: str) -> None:
        if ways > self.num_classes:
            raise ConfigError(
                f"{prefix}ways={ways} is not allowed: split {self.name} has only "
                f"{self.num_classes} classes, so ways must be at most {self.num_classes}."
            )
        if shots + queries > self.min_count:
            smallest = int(torch.argmin(self.counts))
            which = self.names[smallest] if self.names is not None else f"class id {smallest}"
            images = "image" if self.min_count == 1 else "images"
            raise ConfigError(
                f"{prefix}shots + {prefix}queries = {shots} + {queries} = {shots + queries} is not "
                f"allowed: split {self.name} has only {self.min_count} {images} in its smallest "
                f"class ({which}), so lower {prefix}shots or {prefix}queries to a sum of at most "
                f"{self.min_count}, or give that class more images."
            )

    def pixels(self, ids: Tensor, generator: torch.Generator, augment: Augment | None) -> Tensor:
        """Images ``ids [M]`` as floats ``[M, C, H, W]``: in [0, 1], augmented (from ``generator``,
        after the images are chosen) when ``augment`` is given, then normalised."""
        x = self.images.index_select(0, ids).float().div_(255.0)  # [M, C, H, W]
        if augment is not None:
            x = augment(x, generator)
        if self.mean is not None and self.std is not None:
            x = (x - self.mean) / self.std
        return x

    def check_batch(self, size: int, key: str) -> None:
        """Stop early when the split has fewer than ``size`` images for a plain mini-batch."""
        if size > len(self.labels):
            raise ConfigError(
                f"{key}={size} is not allowed: split {self.name} has only {len(self.labels)} images, so "
                f"it must be at most {len(self.labels)}."
            )

    def batch(self, generator: torch.Generator, size: int, augment: Augment | None = None) -> Episode:
        """A plain mini-batch for whole-class training: ``size`` distinct images drawn
        uniformly from the split, as the query set (``query_y``: their split class ids in
        ``0..num_classes-1``), with an empty support set and no ``classes``."""
        ids = torch.randperm(len(self.labels), generator=generator)[:size]  # [M]
        x = self.pixels(ids, generator, augment)  # [M, C, H, W]
        return Episode(
            support_x=x[:0],  # [0, C, H, W]
            support_y=self.labels[:0],  # [0]
            query_x=x,  # [M, C, H, W]
            query_y=self.labels[ids],  # [M] split class ids
        )

    def episode(
        self, generator: torch.Generator, ways: int, shots: int, queries: int, augment: Augment | None = None
    ) -> Episode:
        """N classes, then K support and Q query images of each, disjoint; labels 0..N-1.

        ``classes [N]`` keeps the split's class id of each label. ``augment`` (training
        episodes only) draws from the same generator, after the images are chosen.
        """
        classes = torch.randperm(self.num_classes, generator=generator)[:ways]  # [N]
        return self.described_episode(generator, classes, torch.full((ways,), shots), queries, augment)

    def described_episode(
        self, generator: torch.Generator, classes: Tensor, shots: Tensor, queries: int, augment: Augment | None = None
    ) -> Episode:
        """``shots[c]`` support and ``queries`` query images of each class ``classes[c]``,
        disjoint, labels 0..N-1 (the support class by class); `VariableEpisodeSampler`'s
        imbalanced episodes and, with equal shots, `episode`'s."""
        ways = len(classes)
        width = self.by_class.shape[1]
        keys = torch.rand(ways, width, generator=generator)  # [N, W]
        keys[torch.arange(width)[None, :] >= self.counts[classes][:, None]] = 2.0  # padding last
        take = int(shots.max()) + queries
        pick = keys.argsort(dim=1)[:, :take]  # [N, T] distinct slots
        ids = self.by_class[classes[:, None], pick]  # [N, T] image ids
        slot = torch.arange(take)[None, :]  # [1, T]
        support, query = slot < shots[:, None], (slot >= shots[:, None]) & (slot < shots[:, None] + queries)  # [N, T]
        used = support | query  # [N, T]: all of it when every class has the same shots
        x = self.pixels(ids[used], generator, augment)  # [ΣK + N*Q, C, H, W], class by class
        y = torch.arange(ways)[:, None].expand(ways, take)  # [N, T]
        return Episode(
            support_x=x[support[used]],  # [ΣK, C, H, W]
            support_y=y[support],  # [ΣK]
            query_x=x[query[used]],  # [N*Q, C, H, W]
            query_y=y[query],  # [N*Q]
            classes=classes,  # [N]
        )
