"""Whole-class pre-training: a plain classifier over every training class."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metarun.algorithms.base import MetaAlgorithm, MetaOutput, embedding_dim, embedding_network
from metarun.algorithms.feature_transform import FeatureTransform, feature_transform_for
from metarun.algorithms.meta_baseline import centroid_logits
from metarun.algorithms.transductive import check_transductive, transductive_predictions
from metarun.checks import number_in, positive_int
from metarun.episodes import EpisodeBatch
from metarun.errors import ConfigError


class Pretrain(MetaAlgorithm):
    """Whole-class pre-training, the first step of today's few-shot recipe (Chen et al.,
    ICCV 2021, "Meta-Baseline", their Classifier-Baseline; Tian et al., ECCV 2020, "Rethinking
    Few-Shot Image Classification", RFS).

    Training is ordinary supervised learning: each training task is a plain mini-batch of
    ``sampler.batch_size`` images drawn from the whole training split (``episodic`` False),
    classified by a linear layer over all ``num_train_classes`` classes with cross-entropy
    (optionally label-smoothed). Validation and test are few-shot all the same: the linear
    layer is dropped and each episode's queries go to the nearest class centroid by cosine
    similarity (the Classifier-Baseline evaluation), so the best checkpoint is the one that
    few-shot classifies best. A later run starts from it with ``model.init_from=<run dir>``.

    ``query_logits`` of `meta_loss` are the whole-class logits ``[B, M, num_train_classes]``,
    so the training accuracy is the whole-class accuracy of the mini-batch.

    Args:
        model: embedding network without a classifier head, with ``embedding_dim``.
        num_train_classes: classes of the training split (``auto`` in the config reads it
            from the dataset: Omniglot's Vinyals split 4112, mini-ImageNet 64).
        label_smoothing: cross-entropy's label smoothing (0: none).
        feature_transform: SimpleShot's transform of the features of evaluation episodes
            (`metarun.algorithms.feature_transform`; cl2n here is SimpleShot's whole recipe).
        transductive: label evaluation queries transductively (none, bd_cspn, tim, pt_map:
            `metarun.algorithms.transductive`); training is unchanged.
    """

    needs_head = False  # its whole-class classifier is its own
    episodic = False
    tasks = ("classification",)

    def __init__(
        self,
        model: nn.Module,
        num_train_classes: int,
        label_smoothing: float = 0.0,
        feature_transform: str = "none",
        transductive: str = "none",
    ) -> None:
        super().__init__()
        check_transductive(transductive)
        self.transductive = transductive
        name = type(self).__name__
        self.model = embedding_network(model, name, "the learner owns its whole-class classifier")
        self.features = feature_transform_for(model, feature_transform, name)
        positive_int("algorithm.num_train_classes", num_train_classes)
        dim = embedding_dim(model, name)
        self.num_train_classes = num_train_classes
        self.label_smoothing = number_in("algorithm.label_smoothing", label_smoothing, 0, 1)
        self.classifier = nn.Linear(dim, num_train_classes)
        bound = 1 / math.sqrt(dim)  # nn.Linear's initialisation, from a seeded generator
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            self.classifier.weight.copy_((torch.rand(num_train_classes, dim, generator=g) * 2 - 1) * bound)
            self.classifier.bias.zero_()

    def class_logits(self, batch: EpisodeBatch) -> Tensor:
        """Whole-class logits of the mini-batches' images, ``[B, M, num_train_classes]``."""
        if batch.support_y.shape[1]:
            raise ConfigError(
                f"algorithm={type(self).__name__} is not allowed to train on episodes: it trains on plain "
                f"mini-batches of sampler.batch_size images (the datamodule's plain_batches)."
            )
        top = int(batch.query_y.max())
        if top >= self.num_train_classes:
            raise ConfigError(
                f"algorithm.num_train_classes={self.num_train_classes} is not allowed: the training split has "
                f"class id {top}, so it must be at least {top + 1} (auto reads it from the dataset)."
            )
        z = self.map_tasks(self.model, batch.query_x)  # [B, M, D]: one forward per mini-batch
        return self.classifier(z)  # [B, M, C]

    def evaluation_features(self) -> FeatureTransform:
        return self.features

    def meta_loss(self, batch: EpisodeBatch) -> MetaOutput:
        logits = self.class_logits(batch)  # [B, M, C]
        loss = F.cross_entropy(logits.flatten(0, 1), batch.query_y.flatten(), label_smoothing=self.label_smoothing)
        return MetaOutput(loss, logits.detach())

    def predict(self, batch: EpisodeBatch) -> MetaOutput:
        """Cosine nearest-centroid on the episode (scale 10 for the reported loss), or the
        ``transductive`` method."""
        if self.transductive != "none":
            return transductive_predictions(self, batch, self.transductive)
        logits = centroid_logits(self, batch, torch.tensor(10.0))  # [B, NQ, N]
        loss = F.cross_entropy(logits.flatten(0, 1), batch.query_y.flatten())
        return MetaOutput(loss, logits.detach())
