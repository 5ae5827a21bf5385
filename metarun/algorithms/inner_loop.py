"""The pure inner loop shared by the gradient-based learners.

`adapt` takes and returns a ``dict[str, Tensor]`` of parameters and runs the model through
`torch.func.functional_call`; it never writes module parameters in place. ANIL is the same
call with ``params`` restricted to the head and the body passed as ``fixed``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from metarun.algorithms.base import MetaAlgorithm, MetaOutput
from metarun.algorithms.tasks import support_gradients
from metarun.episodes import EpisodeBatch

Params = dict[str, Tensor]
# (θ, support_x, support_y) -> θ′ adapted on the task's support set
TaskAdapter = Callable[[Params, Tensor, Tensor], Params]


def task_loss(pred: Tensor, target: Tensor) -> Tensor:
    """Mean squared error for float targets (regression), cross-entropy for class labels."""
    if target.is_floating_point():
        return F.mse_loss(pred, target)
    return F.cross_entropy(pred, target)


def forward(
    model: nn.Module, params: Mapping[str, Tensor], x: Tensor, fixed: Mapping[str, Tensor] | None = None
) -> Tensor:
    """``model(x)`` with ``params`` (and ``fixed``) in place of the module's parameters."""
    return functional_call(model, {**(fixed or {}), **params}, (x,))


def query_forward(
    model: nn.Module,
    params: Mapping[str, Tensor],
    support_x: Tensor,
    query_x: Tensor,
    fixed: Mapping[str, Tensor] | None = None,
) -> Tensor:
    """The model's output on ``query_x``, normalised with the support set's moments when the
    model has context-dependent normalisation (``model.uses_context``, TaskNorm).

    Such a model runs once on ``cat([support_x, query_x])`` with ``context_size =
    len(support_x)`` and the query rows are kept; any other model runs on ``query_x`` alone.
    """
    if not getattr(model, "uses_context", False):
        return forward(model, params, query_x, fixed)
    nk = support_x.shape[0]
    x = torch.cat([support_x, query_x])  # [N*K + N*Q, C, H, W]
    out = functional_call(model, {**(fixed or {}), **params}, (x,), {"context_size": nk})
    return out[nk:]  # [N*Q, ...]


def adapt(
    model: nn.Module,
    params: Params,
    x: Tensor,
    y: Tensor,
    steps: int,
    lr: float | Mapping[str, Tensor],
    first_order: bool,
    fixed: Mapping[str, Tensor] | None = None,
) -> Params:
    """``steps`` steps of gradient descent on the support loss, from ``params``.

    θ ← θ − α ∇θ L(θ; x, y). With ``first_order=False`` the graph of every step is kept, so
    the result is differentiable twice (MAML); with ``first_order=True`` each gradient is a
    constant and dθ′/dθ = I (FOMAML). ``lr`` is a scalar or, per parameter, a tensor
    broadcastable to it (Meta-SGD). Runs the same inside `map_tasks`' vmap.
    """
    for _ in range(steps):
        _, grads = support_gradients(
            lambda p: task_loss(forward(model, p, x, fixed), y), params, create_graph=not first_order
        )
        params = {name: p - (lr[name] if isinstance(lr, Mapping) else lr) * grads[name] for name, p in params.items()}
    return params


def adapted_meta_loss(
    algorithm: MetaAlgorithm, batch: EpisodeBatch, adapt_task: TaskAdapter, network: nn.Module | None = None
) -> MetaOutput:
    """Mean query loss at θ′ = ``adapt_task(θ, support_x, support_y)`` over the tasks,
    differentiable in θ, the parameters of ``network`` (default: the learner's model)."""
    model = algorithm.model if network is None else network
    theta = dict(model.named_parameters())

    def one_task(sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor) -> tuple[Tensor, Tensor]:
        pred = query_forward(model, adapt_task(theta, sx, sy), sx, qx)  # [N*Q, N]
        return task_loss(pred, qy), pred.detach()

    losses, logits = algorithm.map_tasks(
        one_task, batch.support_x, batch.support_y, batch.query_x, batch.query_y
    )  # [B], [B, N*Q, N]
    return MetaOutput(losses.mean(), logits)


def adapted_predictions(
    algorithm: MetaAlgorithm, batch: EpisodeBatch, adapt_task: TaskAdapter, network: nn.Module | None = None
) -> MetaOutput:
    """Query predictions before and after adapting a detached copy of θ (``network``'s
    parameters, default the learner's model) to each task."""
    model = algorithm.model if network is None else network
    theta = {k: v.detach() for k, v in model.named_parameters()}

    def one_task(sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor) -> tuple[Tensor, ...]:
        before = query_forward(model, theta, sx, qx).detach()
        pred = query_forward(model, adapt_task(theta, sx, sy), sx, qx).detach()  # [N*Q, N]
        return task_loss(pred, qy), pred, before

    with torch.enable_grad():
        losses, logits, before = algorithm.map_tasks(
            one_task, batch.support_x, batch.support_y, batch.query_x, batch.query_y
        )
    return MetaOutput(losses.mean(), logits, before)
