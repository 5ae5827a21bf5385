"""Prototypical Networks."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metarun.algorithms.base import MetaAlgorithm, MetaOutput, class_means, embedding_network
from metarun.algorithms.feature_transform import FeatureTransform, feature_transform_for
from metarun.algorithms.transductive import check_transductive, transductive_predictions
from metarun.episodes import EpisodeBatch


def prototype_logits(support: Tensor, support_y: Tensor, query: Tensor, ways: int) -> Tensor:
    """Negative squared Euclidean distances from queries to class means.

    ``support [B, N*K, D]``, ``support_y [B, N*K]``, ``query [B, M, D]`` -> ``[B, M, N]``.
    """
    return -torch.cdist(query, class_means(support, support_y, ways)).pow(2)  # [B, M, N]


class ProtoNet(MetaAlgorithm):
    """Prototypical Networks (Snell, Swersky & Zemel, NeurIPS 2017).

    Each class is represented by the mean embedding of its support images; a query is
    classified by a softmax over negative squared Euclidean distances to the prototypes.
    There is no inner loop, so any number of ways can be tested after training.

    Args:
        model: embedding network (no classifier head).
        feature_transform: SimpleShot's transform of the features of evaluation episodes
            (none, l2n, cl2n: `metarun.algorithms.feature_transform`).
        transductive: label evaluation queries transductively (none, bd_cspn, tim, pt_map:
            `metarun.algorithms.transductive`); training is unchanged.
    """

    needs_head = False

    tasks = ("classification",)

    def __init__(self, model: nn.Module, feature_transform: str = "none", transductive: str = "none") -> None:
        super().__init__()
        embedding_network(model, "ProtoNet")
        check_transductive(transductive)
        self.model = model
        self.features = feature_transform_for(model, feature_transform, "ProtoNet")
        self.transductive = transductive

    def evaluation_features(self) -> FeatureTransform:
        return self.features

    def _logits(self, batch: EpisodeBatch) -> Tensor:
        b, nk = batch.support_y.shape
        nq = batch.query_y.shape[1]
        ways = int(batch.support_y.max()) + 1
        z = self.embed_episodes(batch).reshape(b, nk + nq, -1)  # [B, NK+NQ, D]
        return prototype_logits(z[:, :nk], batch.support_y, z[:, nk:], ways)  # [B, NQ, N]

    def meta_loss(self, batch: EpisodeBatch) -> MetaOutput:
        logits = self._logits(batch)  # [B, NQ, N]
        loss = F.cross_entropy(logits.flatten(0, 1), batch.query_y.flatten())
        return MetaOutput(loss, logits.detach())

    def predict(self, batch: EpisodeBatch) -> MetaOutput:
        if self.transductive != "none":
            return transductive_predictions(self, batch, self.transductive)
        return self.meta_loss(batch)
