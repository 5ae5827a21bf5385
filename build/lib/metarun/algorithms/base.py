"""The contract between the Lightning module and every algorithm."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from metarun.episodes import EpisodeBatch


@dataclass
class MetaOutput:
    """What an algorithm returns for a meta-batch.

    ``loss``: scalar, differentiable w.r.t. the meta-parameters (training) or detached.
    ``query_logits [B, N*Q, N]`` (regression: predictions ``[B, Q, D_out]``).
    ``query_logits_before``: the same before task adaptation, when the learner adapts.
    ``extra``: further per-task metrics, name -> ``[B]`` (e.g. a Neural Process's predictive
    log-likelihood); the module logs each as ``{stage}/{name}``, mean ± 95% CI at evaluation.
    ``query_std [B, Q, D_out]``: the predictive standard deviation, from regression learners
    that model one (CNP, NP), else None.
    """

    loss: Tensor
    query_logits: Tensor
    query_logits_before: Tensor | None = None
    extra: dict[str, Tensor] | None = None
    query_std: Tensor | None = None


class MetaAlgorithm(nn.Module):
    """Owns the meta-parameters; the module never knows which algorithm it runs."""

    #: the kinds of task the learner can solve: "classification", "regression" or both
    tasks: tuple[str, ...] = ("classification", "regression")

    def meta_loss(self, batch: EpisodeBatch) -> MetaOutput:
        """Outer loss of the meta-batch, differentiable w.r.t. the meta-parameters."""
        raise NotImplementedError

    def predict(self, batch: EpisodeBatch) -> MetaOutput:
        """Adapt to each support set and score its query set (evaluation)."""
        raise NotImplementedError

    def check_episode_shape(self, train_ways: int, ways: int) -> None:
        """Raise `ConfigError` if the algorithm cannot test on ``ways`` after ``train_ways``."""

    def query_probabilities(self, query_logits: Tensor) -> Tensor:
        """Class probabilities ``[B, M, N]`` from `predict`'s ``query_logits`` (a softmax;
        log-probabilities, as Matching Networks give, come back unchanged)."""
        return query_logits.float().softmax(-1)


def embed_episodes(model: nn.Module, batch: EpisodeBatch) -> Tensor:
    """``model`` on every episode's support then query images: ``[B, NK+NQ, ...]``.

    One forward call per episode, so with batch norm in training mode each episode is its
    own batch: episodes never share statistics, and the result does not depend on how
    many episodes are batched together or how a meta-batch is split over DDP processes.
    """
    images = torch.cat([batch.support_x, batch.query_x], 1)  # [B, NK+NQ, C, H, W]
    return torch.stack([model(x) for x in images])  # [B, NK+NQ, D]
