"""Almost No Inner Loop: MAML whose inner loop adapts only the classifier head."""

from __future__ import annotations

from torch import Tensor, nn

from metarun.algorithms.base import MetaOutput
from metarun.algorithms.inner_loop import Params, TaskAdapter, adapt, adapted_meta_loss, adapted_predictions
from metarun.algorithms.maml import MAML
from metarun.episodes import EpisodeBatch
from metarun.errors import ConfigError


class ANIL(MAML):
    """ANIL (Raghu, Raghu, Bengio & Vinyals, ICLR 2020, "Rapid Learning or Feature Reuse?").

    MAML with the inner loop restricted to the head: the parameters whose names start with
    ``head_prefix`` take ``inner_steps`` gradient steps on the support loss; the body (every
    other parameter) is shared by all tasks and changes only in the outer update. Meta-loss:
    mean over tasks of L_query(θ_body, θ′_head), θ′_head = θ_head − α∇_head L_support(θ_body,
    θ_head) (``inner_steps`` times). Second-order by default: the meta-gradient w.r.t. the body
    includes the path through the head's inner updates; ``first_order=True`` drops it.

    Args:
        model: backbone ending in a classifier head (Conv4 with ``model.out_features`` set).
        inner_lr: α, the step size of the head's inner loop.
        inner_steps: inner steps during meta-training.
        test_inner_steps: inner steps at validation/test.
        first_order: drop second derivatives.
        head_prefix: name prefix of the adapted parameters: ``head.`` for Conv4; for
            `metarun.models.mlp.MLP` the last Linear, ``net.<k>.`` (``net.4.`` for hidden
            [40, 40]). The empty string adapts every parameter, which is MAML.
    """

    def __init__(
        self,
        model: nn.Module,
        inner_lr: float,
        inner_steps: int,
        test_inner_steps: int,
        first_order: bool = False,
        head_prefix: str = "head.",
    ) -> None:
        super().__init__(model, inner_lr, inner_steps, test_inner_steps, first_order)
        names = [name for name, _ in model.named_parameters()]
        self.head_names = [name for name in names if name.startswith(head_prefix)]
        if not self.head_names:
            owners = sorted({name.rsplit(".", 1)[0] + "." for name in names if "." in name})
            raise ConfigError(
                f"algorithm.head_prefix={head_prefix!r} is not allowed: it matches no parameter "
                f"of the model, so choose one of {', '.join(owners) or 'none (no parameters)'} "
                f"(for Conv4, 'head.' needs model.out_features set)."
            )
        self.head_prefix = head_prefix

    def split(self, params: Params) -> tuple[Params, Params]:
        """``(head, body)``: the adapted parameters and the fixed rest."""
        head = {name: p for name, p in params.items() if name.startswith(self.head_prefix)}
        body = {name: p for name, p in params.items() if not name.startswith(self.head_prefix)}
        return head, body

    def adapt_head(self, head: Params, body: Params, x: Tensor, y: Tensor, steps: int, first_order: bool) -> Params:
        """The head after ``steps`` inner steps on ``(x, y)``; the body is never updated."""
        return adapt(self.model, head, x, y, steps, self.inner_lr, first_order, fixed=body)

    def adapt_task(self, steps: int, first_order: bool) -> TaskAdapter:
        """(θ, support_x, support_y) -> θ′ with only the head adapted."""

        def run(theta: Params, support_x: Tensor, support_y: Tensor) -> Params:
            head, body = self.split(theta)
            return {**body, **self.adapt_head(head, body, support_x, support_y, steps, first_order)}

        return run

    def meta_loss(self, batch: EpisodeBatch) -> MetaOutput:
        return adapted_meta_loss(self, batch, self.adapt_task(self.inner_steps, self.first_order))

    def predict(self, batch: EpisodeBatch) -> MetaOutput:
        return adapted_predictions(self, batch, self.adapt_task(self.test_inner_steps, first_order=True))
