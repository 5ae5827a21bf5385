"""The pure inner loop shared by the gradient-based learners.

`adapt` takes and returns a ``dict[str, Tensor]`` of parameters and runs the model through
`torch.func.functional_call`; it never writes module parameters in place. ANIL is the same
call with ``params`` restricted to the head and the body passed as ``fixed``.
"""

from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

Params = dict[str, Tensor]


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
