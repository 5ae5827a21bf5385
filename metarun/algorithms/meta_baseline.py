"""Meta-Baseline: cosine nearest-centroid with a learned temperature."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metarun.algorithms.base import MetaAlgorithm, MetaOutput, class_means, embedding_network
from metarun.algorithms.feature_transform import FeatureTransform, feature_transform_for
from metarun.algorithms.transductive import check_transductive, transductive_predictions
from metarun.checks import positive_number
from metarun.episodes import EpisodeBatch


def cosine_prototype_logits(support: Tensor, support_y: Tensor, query: Tensor, ways: int, scale: Tensor) -> Tensor:
    """``scale · cos(f(q), c_n)`` with ``c_n`` the mean support embedding of class n.

    ``support [B, N*K, D]``, ``support_y [B, N*K]``, ``query [B, M, D]`` -> ``[B, M, N]``.
    """
    protos = F.normalize(class_means(support, support_y, ways), dim=-1)  # [B, N, D]
    return scale * F.normalize(query, dim=-1) @ protos.transpose(1, 2)  # [B, M, N]


def centroid_logits(learner: MetaAlgorithm, batch: EpisodeBatch, scale: Tensor) -> Tensor:
    """`cosine_prototype_logits` of ``batch``'s episodes through ``learner``'s backbone, ``[B, NQ, N]``."""
    nk = batch.support_y.shape[1]
    ways = int(batch.support_y.max()) + 1
    z = learner.embed_episodes(batch)  # [B, NK+NQ, D]
    return cosine_prototype_logits(z[:, :nk], batch.support_y, z[:, nk:], ways, scale)  # [B, NQ, N]


class MetaBaseline(MetaAlgorithm):
    """Meta-Baseline (Chen, Liu, Xu, Darrell & Wang, ICCV 2021, "Meta-Baseline: Exploring
    Simple Meta-Learning for Few-Shot Learning").

    A query is classified by a softmax over ``τ · cos(f(q), c_n)``, the cosine similarity of
    its embedding to each class centroid (mean support embedding) scaled by a learned
    temperature τ, trained on episodes. The paper meta-trains a backbone pre-trained on
    whole classes (``algorithm=pretrain``, then ``model.init_from=<that run>``); without
    ``init_from`` it trains from scratch. No inner loop: any number of ways can be tested.

    Args:
        model: embedding network (no classifier head).
        temperature: τ's starting value (the paper: 10).
        learn_temperature: whether τ is a meta-parameter (the paper: yes).
        feature_transform: SimpleShot's transform of the features of evaluation episodes
            (`metarun.algorithms.feature_transform`; the cosine already normalises, so cl2n's
            centring is what changes).
        transductive: label evaluation queries transductively (none, bd_cspn, tim, pt_map:
            `metarun.algorithms.transductive`); training is unchanged.
    """

    needs_head = False
    tasks = ("classification",)

    def __init__(
        self,
        model: nn.Module,
        temperature: float = 10.0,
        learn_temperature: bool = True,
        feature_transform: str = "none",
        transductive: str = "none",
    ) -> None:
        super().__init__()
        check_transductive(transductive)
        self.transductive = transductive
        self.model = embedding_network(model, "MetaBaseline")
        self.features = feature_transform_for(model, feature_transform, "MetaBaseline")
        positive_number("algorithm.temperature", temperature)
        value = torch.tensor(float(temperature))
        if learn_temperature:
            self.temperature = nn.Parameter(value)
        else:
            self.register_buffer("temperature", value)

    def evaluation_features(self) -> FeatureTransform:
        return self.features

    def meta_loss(self, batch: EpisodeBatch) -> MetaOutput:
        logits = centroid_logits(self, batch, self.temperature)  # [B, NQ, N]
        loss = F.cross_entropy(logits.flatten(0, 1), batch.query_y.flatten())
        return MetaOutput(loss, logits.detach())

    def predict(self, batch: EpisodeBatch) -> MetaOutput:
        if self.transductive != "none":
            return transductive_predictions(self, batch, self.transductive)
        return self.meta_loss(batch)
