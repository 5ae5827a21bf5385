"""Model-Agnostic Meta-Learning and its first-order approximation."""

from __future__ import annotations

from torch import nn

from metarun.algorithms.base import MetaAlgorithm, MetaOutput
from metarun.algorithms.inner_loop import adapt, adapted_meta_loss, adapted_predictions
from metarun.checks import inner_loop_settings, same_ways
from metarun.episodes import EpisodeBatch


class MAML(MetaAlgorithm):
    """MAML (Finn, Abbeel & Levine, ICML 2017): learn an initialisation θ such that a few
    gradient steps on a task's support set give a good model for its query set.

    Meta-loss: mean over tasks of L_query(θ′), θ′ = θ − α∇L_support(θ) (``inner_steps``
    times). Second-order by default; ``first_order=True`` gives FOMAML, which drops the
    Hessian term of dθ′/dθ.

    Args:
        model: backbone whose output is the task prediction (a head of ``ways`` outputs).
        inner_lr: α, the inner-loop step size.
        inner_steps: inner steps during meta-training.
        test_inner_steps: inner steps at validation/test (Finn et al.: more than in training).
        first_order: drop second derivatives (FOMAML).
    """

    lr_keys = ("inner_lr",)

    def __init__(
        self,
        model: nn.Module,
        inner_lr: float,
        inner_steps: int,
        test_inner_steps: int,
        first_order: bool = False,
    ) -> None:
        super().__init__()
        inner_loop_settings(inner_lr, inner_steps, test_inner_steps)
        self.model = model
        self.inner_lr, self.inner_steps, self.test_inner_steps = inner_lr, inner_steps, test_inner_steps
        self.first_order = first_order

    def check_episode_shape(self, train_ways: int, ways: int) -> None:
        same_ways(train_ways, ways)

    def meta_loss(self, batch: EpisodeBatch) -> MetaOutput:
        return adapted_meta_loss(
            self,
            batch,
            lambda theta, sx, sy: adapt(self.model, theta, sx, sy, self.inner_steps, self.inner_lr, self.first_order),
        )

    def predict(self, batch: EpisodeBatch) -> MetaOutput:
        return adapted_predictions(
            self,
            batch,
            lambda theta, sx, sy: adapt(
                self.model, theta, sx, sy, self.test_inner_steps, self.inner_lr, first_order=True
            ),
        )
