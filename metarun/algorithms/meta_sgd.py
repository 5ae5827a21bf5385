"""Meta-SGD: MAML with a learned learning rate for every coordinate of every parameter."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from metarun.algorithms.base import MetaAlgorithm, MetaOutput
from metarun.algorithms.inner_loop import adapt, adapted_meta_loss, adapted_predictions
from metarun.checks import inner_loop_settings, same_ways
from metarun.episodes import EpisodeBatch


def lr_key(name: str) -> str:
    """A parameter name as an `nn.ParameterDict` key (which may not contain dots)."""
    return name.replace(".", "__")


class MetaSGD(MetaAlgorithm):
    """Meta-SGD (Li, Zhou, Chen & Li 2017, "Meta-SGD: Learning to Learn Quickly for Few-Shot
    Learning").

    Learns the initialisation θ and, jointly, a learning-rate tensor α of the same shape as
    every parameter: θ′ = θ − α ∘ ∇θ L_support(θ) (``inner_steps`` times), meta-loss = mean
    over tasks of L_query(θ′), differentiated w.r.t. both θ and α. With every α equal to a
    constant this is exactly MAML. The rates are unconstrained (they may change sign, which
    the paper allows: α sets both the size and the direction of the update).

    Li et al. draw the initial α uniformly from [0.005, 0.1]; here every rate starts at the
    scalar ``init_inner_lr`` (no random draw), so the start is MAML's.

    Args:
        model: backbone whose output is the task prediction (a head of ``ways`` outputs).
        init_inner_lr: initial value of every learned rate.
        inner_steps: inner steps during meta-training (Li et al.: one).
        test_inner_steps: inner steps at validation/test (Li et al.: one).
        first_order: drop second derivatives; α still gets its gradient, which is exact
            for one step (∂θ′/∂α = −∇L_support(θ) needs no Hessian).
    """

    lr_keys = ("init_inner_lr",)

    def __init__(
        self,
        model: nn.Module,
        init_inner_lr: float,
        inner_steps: int,
        test_inner_steps: int,
        first_order: bool = False,
    ) -> None:
        super().__init__()
        inner_loop_settings(init_inner_lr, inner_steps, test_inner_steps, lr_key="algorithm.init_inner_lr")
        self.model = model
        self.inner_steps, self.test_inner_steps = inner_steps, test_inner_steps
        self.first_order = first_order
        params = dict(model.named_parameters())
        keys = {name: lr_key(name) for name in params}
        if len(set(keys.values())) != len(keys):
            raise ValueError("two parameter names of the model collide once dots become '__'.")
        self._lr_keys = keys
        self.inner_lrs = nn.ParameterDict(
            {keys[name]: nn.Parameter(torch.full_like(p.detach(), init_inner_lr)) for name, p in params.items()}
        )

    def learning_rates(self) -> dict[str, Tensor]:
        """The learned rates keyed by parameter name (the ``lr`` of `inner_loop.adapt`)."""
        return {name: self.inner_lrs[key] for name, key in self._lr_keys.items()}

    def check_episode_shape(self, train_ways: int, ways: int) -> None:
        same_ways(train_ways, ways)

    def meta_loss(self, batch: EpisodeBatch) -> MetaOutput:
        lrs = self.learning_rates()
        return adapted_meta_loss(
            self, batch, lambda theta, sx, sy: adapt(self.model, theta, sx, sy, self.inner_steps, lrs, self.first_order)
        )

    def predict(self, batch: EpisodeBatch) -> MetaOutput:
        lrs = {name: lr.detach() for name, lr in self.learning_rates().items()}
        return adapted_predictions(
            self,
            batch,
            lambda theta, sx, sy: adapt(self.model, theta, sx, sy, self.test_inner_steps, lrs, first_order=True),
        )
