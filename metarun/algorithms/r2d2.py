"""R2-D2: a ridge-regression head solved in closed form per task."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metarun.algorithms.base import MetaAlgorithm, MetaOutput, embedding_network, solved_in_float32
from metarun.checks import positive_number
from metarun.episodes import EpisodeBatch


def ridge_weights(support: Tensor, targets: Tensor, ridge: Tensor) -> Tensor:
    """The ridge-regression solution ``W = argmin ‖XW − Y‖² + λ‖W‖²``, ``[B, D, N]``.

    ``support [B, n, D]`` (X), ``targets [B, n, N]`` (Y), ``ridge``: λ > 0 (a scalar tensor).
    With fewer examples than features (n < D, the few-shot case) it solves the n × n system
    ``W = Xᵀ (X Xᵀ + λ I)⁻¹ Y`` (the Woodbury identity), else the D × D normal equations
    ``W = (Xᵀ X + λ I)⁻¹ Xᵀ Y``; the two are equal, and both differentiable.
    """
    n, d = support.shape[-2:]
    if n < d:
        gram = support @ support.transpose(1, 2)  # [B, n, n]
        eye = torch.eye(n, dtype=support.dtype, device=support.device)
        return support.transpose(1, 2) @ torch.linalg.solve(gram + ridge * eye, targets)  # [B, D, N]
    eye = torch.eye(d, dtype=support.dtype, device=support.device)
    return torch.linalg.solve(support.transpose(1, 2) @ support + ridge * eye, support.transpose(1, 2) @ targets)


def r2d2_logits(support: Tensor, support_y: Tensor, query: Tensor, ways: int, ridge: Tensor) -> Tensor:
    """R2-D2's regression outputs ``[B, M, N]`` before the scale and bias.

    A column of ones is appended to the features (the regressor's bias); features and
    one-hot targets are divided by √n, n the support size, as in the authors' code, so λ
    does not depend on the number of shots. ``support [B, n, D]``, ``query [B, M, D]``.
    """
    n = support.shape[1]
    ones = lambda z: torch.ones(*z.shape[:2], 1, dtype=z.dtype, device=z.device)  # noqa: E731
    x = torch.cat([support, ones(support)], -1) / math.sqrt(n)  # [B, n, D+1]
    y = F.one_hot(support_y, ways).to(support.dtype) / math.sqrt(n)  # [B, n, N]
    w = ridge_weights(x, y, ridge)  # [B, D+1, N]
    return torch.cat([query, ones(query)], -1) @ w  # [B, M, N]


class R2D2(MetaAlgorithm):
    """R2-D2 (Bertinetto, Henriques, Torr & Vedaldi, ICLR 2019, "Meta-learning with
    differentiable closed-form solvers").

    Each task fits a ridge regression from the embedded support set to one-hot labels,
    solved in closed form (`ridge_weights`: the Woodbury identity when there are fewer
    support images than features), and scores queries with ``α · [f(q), 1] W + β``. The
    meta-gradient flows through the solve into the backbone, α, β and (if learned) λ.
    Under mixed precision the backbone runs in bf16/fp16 and the solve in float32.

    Args:
        model: embedding network (no classifier head).
        ridge: λ, the ridge penalty (the authors: 50).
        learn_ridge: whether λ is a meta-parameter (learned as log λ; the authors' default: no).
        scale: α's starting value (the authors: 1e-4 on mini-ImageNet, 10 on CIFAR-FS and Omniglot).
        bias: β's starting value (the authors: 0).
    """

    needs_head = False
    tasks = ("classification",)

    def __init__(
        self, model: nn.Module, ridge: float = 50.0, learn_ridge: bool = False, scale: float = 10.0, bias: float = 0.0
    ) -> None:
        super().__init__()
        self.model = embedding_network(model, "R2D2")
        positive_number("algorithm.ridge", ridge)
        positive_number("algorithm.scale", scale)
        log_ridge = torch.tensor(math.log(ridge))
        if learn_ridge:
            self.log_ridge = nn.Parameter(log_ridge)
        else:
            self.register_buffer("log_ridge", log_ridge)
        self.scale = nn.Parameter(torch.tensor(float(scale)))
        self.bias = nn.Parameter(torch.tensor(float(bias)))

    def logits(self, z: Tensor, support_y: Tensor) -> Tensor:
        """``α · r2d2_logits + β`` of episodes embedded as ``z [B, NK+NQ, D]`` -> ``[B, NQ, N]``."""
        nk = support_y.shape[1]
        ways = int(support_y.max()) + 1
        raw = r2d2_logits(z[:, :nk], support_y, z[:, nk:], ways, self.log_ridge.exp())  # [B, NQ, N]
        return self.scale * raw + self.bias

    def meta_loss(self, batch: EpisodeBatch) -> MetaOutput:
        logits = solved_in_float32(self.logits, self.embed_episodes(batch).flatten(2), batch.support_y)  # [B, NQ, N]
        loss = F.cross_entropy(logits.flatten(0, 1), batch.query_y.flatten())
        return MetaOutput(loss, logits.detach())

    def predict(self, batch: EpisodeBatch) -> MetaOutput:
        return self.meta_loss(batch)
