"""RFS: whole-class pre-training, then a logistic regression on frozen, normalised features."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metarun.algorithms.base import MetaOutput
from metarun.algorithms.pretrain import Pretrain
from metarun.algorithms.tasks import map_tasks
from metarun.algorithms.transductive import transductive_predictions
from metarun.checks import positive_int, positive_number
from metarun.episodes import EpisodeBatch


def logistic_regression_objective(weight: Tensor, bias: Tensor, x: Tensor, y: Tensor, inverse_penalty: float) -> Tensor:
    """scikit-learn's multinomial objective: ``½‖W‖² + C · Σ_i CE(W x_i + b, y_i)`` (the bias unpenalised)."""
    return 0.5 * weight.pow(2).sum() + inverse_penalty * F.cross_entropy(x @ weight.T + bias, y, reduction="sum")


def fit_logistic_regression(
    x: Tensor, y: Tensor, ways: int, inverse_penalty: float = 1.0, max_iter: int = 1000
) -> tuple[Tensor, Tensor]:
    """The minimiser of `logistic_regression_objective` on ``x [S, D]``, ``y [S]`` (in ``x``'s
    dtype), by L-BFGS with a strong-Wolfe line search from zero, as scikit-learn's
    ``LogisticRegression(C=inverse_penalty, solver="lbfgs")`` that RFS uses; ``[N, D]``, ``[N]``."""
    weight = x.new_zeros(ways, x.shape[1], requires_grad=True)  # [N, D]
    bias = x.new_zeros(ways, requires_grad=True)  # [N]
    x, y = x.detach(), y.detach()
    optimizer = torch.optim.LBFGS(
        [weight, bias],
        lr=1.0,
        max_iter=max_iter,
        tolerance_grad=1e-9,
        tolerance_change=1e-12,
        history_size=20,
        line_search_fn="strong_wolfe",
    )

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = logistic_regression_objective(weight, bias, x, y, inverse_penalty)
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return weight.detach(), bias.detach()


class RFS(Pretrain):
    """RFS (Tian, Wang, Krishnan, Tenenbaum & Isola, ECCV 2020, "Rethinking Few-Shot Image
    Classification: a Good Embedding Is All You Need").

    Trained exactly as `Pretrain` (whole-class mini-batches). Validation and test freeze the
    embedding, L2-normalise the support and query features, and fit a multinomial logistic
    regression on each support set (the authors' scikit-learn ``LogisticRegression``: L2
    penalty, ``C=1``, L-BFGS, here in float64 to tolerance), which labels the queries.
    (The paper's further self-distillation generations are not part of this learner.)

    Args:
        model, num_train_classes, label_smoothing: as `Pretrain`.
        inverse_penalty: scikit-learn's ``C``, the inverse L2 penalty of the head.
        max_iter: L-BFGS iterations at most.
        feature_transform: as `Pretrain` (before the head's own L2 normalisation).
        transductive: as `Pretrain` (a transductive method replaces the logistic regression).
    """

    def __init__(
        self,
        model: nn.Module,
        num_train_classes: int,
        label_smoothing: float = 0.0,
        inverse_penalty: float = 1.0,
        max_iter: int = 1000,
        feature_transform: str = "none",
        transductive: str = "none",
    ) -> None:
        super().__init__(model, num_train_classes, label_smoothing, feature_transform, transductive)
        positive_number("algorithm.inverse_penalty", inverse_penalty)
        positive_int("algorithm.max_iter", max_iter)
        self.inverse_penalty, self.max_iter = float(inverse_penalty), max_iter

    def predict(self, batch: EpisodeBatch) -> MetaOutput:
        if self.transductive != "none":
            return transductive_predictions(self, batch, self.transductive)
        nk = batch.support_y.shape[1]
        ways = int(batch.support_y.max()) + 1
        with torch.no_grad():
            z = F.normalize(self.embed_episodes(batch).double(), dim=-1)  # [B, NK+NQ, D]

        def one_task(support: Tensor, support_y: Tensor, query: Tensor) -> Tensor:
            weight, bias = fit_logistic_regression(support, support_y, ways, self.inverse_penalty, self.max_iter)
            return query @ weight.T + bias  # [NQ, N]

        # each task's own L-BFGS solve, one after another (an iterative solver with a line search cannot vmap)
        out = map_tasks(one_task, z[:, :nk], batch.support_y, z[:, nk:], vmap=False).float()  # [B, NQ, N]
        loss = F.cross_entropy(out.flatten(0, 1), batch.query_y.flatten())
        return MetaOutput(loss, out)
