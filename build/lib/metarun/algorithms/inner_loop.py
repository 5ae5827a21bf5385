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

from metarun.algorithms.base import MetaOutput
from metarun.episodes import Episode, EpisodeBatch

Params = dict[str, Tensor]
TaskAdapter = Callable[[Params, Episode], Params]  # (θ, task) -> θ′ from the task's support set


def task_loss(pred: Tensor, target: Tensor) -> Tensor:
    """Mean squared error for float targets (regression), cross-entropy for class labels."""
    if target.is_floating_point():
        return F.mse_loss(pred, target)
    return F.cross_entropy(pred, target)


def forward(model: nn.Module, params: Mapping[str, Tensor], x: Tensor,
            fixed: Mapping[str, Tensor] | None = None) -> Tensor:
    """``model(x)`` with ``params`` (and ``fixed``) in place of the module's parameters."""
    return functional_call(model, {**(fixed or {}), **params}, (x,))


def query_forward(model: nn.Module, params: Mapping[str, Tensor], support_x: Tensor,
                  query_x: Tensor, fixed: Mapping[str, Tensor] | None = None) -> Tensor:
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


def adapt(model: nn.Module, params: Params, x: Tensor, y: Tensor, steps: int,
          lr: float | Mapping[str, Tensor], first_order: bool,
          fixed: Mapping[str, Tensor] | None = None) -> Params:
    """``steps`` steps of gradient descent on the support loss, from ``params``.

    θ ← θ − α ∇θ L(θ; x, y). With ``first_order=False`` the graph of every step is kept, so
    the result is differentiable twice (MAML); with ``first_order=True`` each gradient is a
    constant and dθ′/dθ = I (FOMAML). ``lr`` is a scalar or, per parameter, a tensor
    broadcastable to it (Meta-SGD).
    """
    for _ in range(steps):
        loss = task_loss(forward(model, params, x, fixed), y)
        grads = torch.autograd.grad(loss, list(params.values()), create_graph=not first_order)
        params = {name: p - (lr[name] if isinstance(lr, Mapping) else lr) * g
                  for (name, p), g in zip(params.items(), grads)}
    return params


def adapted_meta_loss(model: nn.Module, batch: EpisodeBatch, adapt_task: TaskAdapter) -> MetaOutput:
    """Mean query loss at θ′ = ``adapt_task(θ, task)`` over the tasks, differentiable in θ."""
    theta = dict(model.named_parameters())
    losses, logits = [], []
    for i in range(len(batch)):
        task = batch.task(i)
        pred = query_forward(model, adapt_task(theta, task), task.support_x, task.query_x)  # [N*Q, N]
        losses.append(task_loss(pred, task.query_y))
        logits.append(pred.detach())
    return MetaOutput(torch.stack(losses).mean(), torch.stack(logits))


def adapted_predictions(model: nn.Module, batch: EpisodeBatch, adapt_task: TaskAdapter) -> MetaOutput:
    """Query predictions before and after adapting a detached copy of θ to each task."""
    losses, logits, before = [], [], []
    with torch.enable_grad():
        for i in range(len(batch)):
            task = batch.task(i)
            theta = {k: v.detach().requires_grad_() for k, v in model.named_parameters()}
            before.append(query_forward(model, theta, task.support_x, task.query_x).detach())
            pred = query_forward(model, adapt_task(theta, task), task.support_x,
                                 task.query_x).detach()  # [N*Q, N]
            losses.append(task_loss(pred, task.query_y))
            logits.append(pred)
    return MetaOutput(torch.stack(losses).mean(), torch.stack(logits), torch.stack(before))
