"""Train / validation / test episode loaders for one dataset and one sampler."""

from __future__ import annotations

from typing import Protocol, cast

import lightning as L
from torch import Tensor
from torch.utils.data import DataLoader

from metarun.episodes import (
    TEST,
    VAL,
    Augment,
    Batch,
    BatchSource,
    EpisodeSampler,
    EvalEpisodes,
    SourceMixture,
    TaskSource,
    TrainEpisodes,
    first_episodes,
    task_generator,
)


class SplitDataset(Protocol):
    """A dataset built by Hydra from `conf/dataset/`: it hands out its splits."""

    def split(self, name: str) -> TaskSource: ...


class EpisodicDataModule(L.LightningDataModule):
    """Serves endless seeded training meta-batches and the fixed evaluation lists.

    Args:
        dataset: the dataset; its splits are loaded once (memory-mapped image caches).
        sampler: the episode shapes and seeds.
        augment: the training augmentation (`transform` group), or None.
        test_dataset: cross-domain evaluation: meta-test on this dataset's test split
            instead of ``dataset``'s (e.g. mini-ImageNet -> CUB, Chen et al. 2019).
        plain_batches: train on plain mini-batches of ``sampler.batch_size`` images (a
            learner that trains on whole classes, `MetaAlgorithm.episodic` False); the
            validation and test sets are episodes all the same.
    """

    def __init__(
        self,
        dataset: SplitDataset,
        sampler: EpisodeSampler,
        augment: Augment | None = None,
        test_dataset: SplitDataset | None = None,
        plain_batches: bool = False,
    ) -> None:
        super().__init__()
        self.plain_batches = plain_batches
        self.dataset, self.sampler, self.augment = dataset, sampler, augment
        self.test_dataset = test_dataset or dataset
        self.splits: dict[str, TaskSource] = {}

    def prepare(self) -> None:
        """Load the splits and check the episode shapes (idempotent; run before training)."""
        if not self.splits:
            self.splits = {name: self.dataset.split(name) for name in ("train", "val")}
            self.splits["test"] = self.test_dataset.split("test")
            self.sampler.check(self.splits["train"], self.splits["val"], self.splits["test"], self.plain_batches)

    def setup(self, stage: str) -> None:
        self.prepare()
        if self.trainer is not None:
            self.sampler.shard(self.trainer.world_size)

    def train_batch(self, step: int, rank: int = 0, world_size: int = 1) -> Batch:
        """This rank's slice of training step ``step``'s meta-batch, as the loader serves it
        (episodes, or plain mini-batches for a whole-class learner)."""
        self.prepare()
        return self.sampler.train_batch(self.splits["train"], step, rank, world_size, self.augment, self.plain_batches)

    def source_names(self, stage: str) -> list[str]:
        """The sources of the validation ("val") or test ("test") split when it has several
        (dataset=multi), else none."""
        split = self.splits.get(stage)
        return list(split.names) if isinstance(split, SourceMixture) else []

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        episodes = TrainEpisodes(
            self.sampler,
            self.splits["train"],
            start_step=trainer.global_step,
            rank=trainer.global_rank,
            world_size=trainer.world_size,
            augment=self.augment,
            plain=self.plain_batches,
        )
        return DataLoader(episodes, batch_size=None, num_workers=0)

    def validation_batch(self, size: int) -> Batch:
        """The first ``size`` validation episodes (at most all of them) as one batch."""
        self.prepare()
        return first_episodes(self.sampler, self.splits["val"], VAL, min(size, self.sampler.val_episodes))

    def training_images(self, size: int, stream: int) -> Tensor:
        """``size`` distinct training images (at most all of them), drawn once from generator
        stream ``stream``: ``[M, C, H, W]``, as the episodes have them (not augmented)."""
        self.prepare()
        train = cast(BatchSource, self.splits["train"])
        generator = task_generator(self.sampler.eval_seed, stream, 0, 0)
        return train.batch(generator, min(size, len(train))).query_x

    def _eval_loader(self, split: str, stream: int, size: int) -> DataLoader:
        return DataLoader(
            EvalEpisodes(self.sampler, self.splits[split], stream, size),
            batch_size=self.sampler.eval_batch_size,
            shuffle=False,
            collate_fn=self.sampler.collate,
            num_workers=0,
        )

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val", VAL, self.sampler.val_episodes)

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test", TEST, self.sampler.test_episodes)
