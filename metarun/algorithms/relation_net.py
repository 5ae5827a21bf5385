"""Relation Networks."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metarun.algorithms.base import MetaAlgorithm, MetaOutput, embedding_network
from metarun.checks import positive_int
from metarun.episodes import EpisodeBatch
from metarun.errors import ConfigError
from metarun.models.norm import NORMS, batch_norm


class RelationModule(nn.Module):
    """g_φ of Sung et al. 2018 (figure 2): 2 × [3×3 conv, batch norm, ReLU, 2×2 max-pool],
    then FC-ReLU-FC-sigmoid, mapping a pair of concatenated feature maps to a score in [0, 1].

    A block pools only while its input side is at least 2, so a 1×1 map (the standard
    4-pool Conv4 on 28×28 images) still works; on the paper's maps nothing changes.

    Args:
        feature_shape: ``(C, h, w)`` of one embedding map; the module reads ``2C`` channels.
        hidden: units of the first fully connected layer (8 in the paper).
        norm: batch-norm mode of the two conv blocks (see `metarun.models.norm`).
    """

    def __init__(self, feature_shape: tuple[int, int, int], hidden: int, norm: str) -> None:
        super().__init__()
        channels, h, w = feature_shape
        blocks: list[nn.Module] = []
        for i in range(2):
            blocks += [
                nn.Conv2d(2 * channels if i == 0 else channels, channels, 3, padding=1),
                batch_norm(channels, norm),
                nn.ReLU(),
            ]
            if min(h, w) >= 2:
                blocks.append(nn.MaxPool2d(2))
                h, w = h // 2, w // 2  # max-pool floors the side
        self.convs = nn.Sequential(*blocks)
        self.fc = nn.Sequential(nn.Linear(channels * h * w, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, pairs: Tensor) -> Tensor:
        """``[P, 2C, h, w]`` -> relation scores ``[P]`` in [0, 1]."""
        z = self.convs(pairs).flatten(1)  # [P, C * h' * w']
        return torch.sigmoid(self.fc(z)).squeeze(-1)  # [P]


class RelationNet(MetaAlgorithm):
    """Relation Networks (Sung, Yang, Zhang, Xiang, Torr & Hospedales, CVPR 2018).

    The embedding f_φ is the backbone's convolutional feature map (``model.features``, not
    flattened). A class map is the sum of its K support maps; each (class, query) pair of
    maps is concatenated along channels and scored in [0, 1] by a learned `RelationModule`
    g_φ, a meta-parameter owned by this algorithm. The loss is the mean squared error
    between the scores and the one-hot query labels; ``query_logits`` are the scores
    (their argmax is the prediction). No inner loop and no head: any number of ways.

    Args:
        model: a convolutional backbone exposing ``features`` (images -> maps) and
            ``feature_shape`` ``(C, h, w)``, without a classifier head (e.g. Conv4; the
            paper's pools only in its first 2 blocks: ``model.pooled_blocks=2``).
        relation_hidden: units of the relation module's hidden FC layer (8 in the paper).
        norm: batch-norm mode of the relation module (the configs use ``${model.norm}``).
    """

    needs_head = False

    tasks = ("classification",)

    def __init__(self, model: nn.Module, relation_hidden: int = 8, norm: str = "transductive") -> None:
        super().__init__()
        embedding_network(model, "RelationNet")
        shape = getattr(model, "feature_shape", None)
        if not isinstance(getattr(model, "features", None), nn.Module) or shape is None:
            raise ConfigError(
                f"model={type(model).__name__} is not allowed for RelationNet: it "
                f"needs a convolutional backbone with features and feature_shape, "
                f"such as Conv4."
            )
        positive_int("algorithm.relation_hidden", relation_hidden)
        if norm not in NORMS:
            raise ConfigError(f"algorithm.norm={norm!r} is not allowed: choose one of {', '.join(NORMS)}.")
        self.model = model
        self.relation = RelationModule(tuple(shape), relation_hidden, norm)

    def relation_scores(self, support_x: Tensor, support_y: Tensor, query_x: Tensor, ways: int) -> Tensor:
        """One episode (its own batch-norm batch) -> relation scores ``[N*Q, N]`` in [0, 1]."""
        nk = support_y.shape[0]
        maps = self.model.features(torch.cat([support_x, query_x]))  # [NK+NQ, C, h, w]
        support, query = maps[:nk], maps[nk:]  # [NK, C, h, w], [NQ, C, h, w]
        onehot = F.one_hot(support_y, ways).to(maps.dtype)  # [NK, N]
        classes = onehot.T @ support.flatten(1)  # [N, C*h*w]: the sum of each class's K shots
        classes = classes.view(ways, *support.shape[1:])  # [N, C, h, w]
        m = query.shape[0]
        pairs = torch.cat(
            [
                classes[None].expand(m, -1, -1, -1, -1),  # [NQ, N, C, h, w]
                query[:, None].expand(-1, ways, -1, -1, -1),
            ],
            2,
        )  # [NQ, N, 2C, h, w]
        return self.relation(pairs.flatten(0, 1)).view(m, ways)  # [NQ*N] -> [NQ, N]

    def check_variable_episodes(self, min_ways: int, max_ways: int) -> None:
        raise ConfigError(
            "algorithm=RelationNet is not allowed with sampler=variable: it sums each class's shots "
            "(Sung et al. 2018), and sums over different numbers of shots are not comparable across "
            "classes, so use sampler=episodic or a learner that averages them (protonet)."
        )

    def meta_loss(self, batch: EpisodeBatch) -> MetaOutput:
        ways = int(batch.support_y.max()) + 1
        scores = self.map_tasks(  # [B, NQ, N]
            lambda sx, sy, qx: self.relation_scores(sx, sy, qx, ways), batch.support_x, batch.support_y, batch.query_x
        )
        target = F.one_hot(batch.query_y, scores.shape[-1]).to(scores.dtype)  # [B, NQ, N]
        return MetaOutput(F.mse_loss(scores, target), scores.detach())

    def predict(self, batch: EpisodeBatch) -> MetaOutput:
        return self.meta_loss(batch)

    def query_probabilities(self, query_logits: Tensor) -> Tensor:
        """Relation scores in [0, 1] normalised over the classes (they are not logits)."""
        scores = query_logits.float().clamp_min(1e-12)  # [B, M, N]
        return scores / scores.sum(-1, keepdim=True)
