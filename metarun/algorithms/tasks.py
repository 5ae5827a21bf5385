"""`map_tasks`: the one place a per-task computation runs over a meta-batch's task axis.

A per-task function takes one task's tensors (no dataclasses) and returns a tensor or a
tuple of tensors; `map_tasks` runs it for every task, either in a Python loop or under
`torch.func.vmap`, and stacks the results on a new leading task axis. Inside a vmapped
function `torch.autograd.grad` cannot see the graph, so the inner loops take their
gradients through `support_gradients`, which switches to `torch.func.grad` there.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_map

from metarun.errors import ConfigError

TASK_BATCHING = ("loop", "vmap", "auto")


def check_task_batching(value: str) -> None:
    """The top-level ``task_batching`` must be one of `TASK_BATCHING`."""
    if value not in TASK_BATCHING:
        raise ConfigError(f"task_batching={value!r} is not allowed: choose one of {', '.join(TASK_BATCHING)}.")


def modules_vmap_refusal(module: nn.Module) -> str | None:
    """Why ``module`` cannot run under vmap: batch norm that updates running statistics in
    place (``model.norm=running``), which vmap cannot write back per task, or a submodule
    whose own ``vmap_refusal(name)`` gives a reason (e.g. DropBlock's random masks); else None."""
    for name, m in module.named_modules():
        own = getattr(m, "vmap_refusal", None)
        if m is not module and callable(own):
            why = own(name)
            if why:
                return why
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
            return (
                f"its batch norm {name} keeps running statistics (model.norm=running), which "
                f"are updated in place and cannot be carried per task under vmap, so use "
                f"task_batching=loop or another model.norm"
            )
    return None


def in_transform() -> bool:
    """Whether this code runs inside a `torch.func` transform (vmap, grad)."""
    return torch._C._functorch.maybe_current_level() is not None


def map_tasks(fn: Callable[..., Any], *tensors: Tensor, vmap: bool = False) -> Any:
    """``fn(t₀[i], t₁[i], ...)`` for every task ``i``, the outputs stacked on a new axis 0.

    ``tensors``: each ``[B, ...]``; ``fn`` returns a tensor or a tuple of tensors, the
    stacked result has the same structure with a leading ``[B]``. ``vmap=True`` runs the
    tasks as one batched computation through `torch.func.vmap` (random draws inside ``fn``
    are refused; take them outside); otherwise the one Python loop over tasks in metarun.
    """
    if vmap:
        return torch.func.vmap(fn, randomness="error")(*tensors)
    outputs = [fn(*(t[i] for t in tensors)) for i in range(tensors[0].shape[0])]
    return tree_map(lambda *per_task: torch.stack(per_task), *outputs)


def support_gradients(
    loss: Callable[[dict[str, Tensor]], Tensor], params: Mapping[str, Tensor], create_graph: bool
) -> tuple[Tensor, dict[str, Tensor]]:
    """``(L(params), ∇L(params))`` for a per-task loss, inside or outside vmap.

    Outside a transform: `torch.autograd.grad`, keeping the graph when ``create_graph``
    (second order) and making leaves of parameters that do not require a gradient.
    Inside one: `torch.func.grad`, whose result the outer autograd differentiates again;
    ``create_graph=False`` detaches it (first order). The loss is returned detached
    unless ``create_graph``.
    """
    params = dict(params)
    if in_transform():
        grads, value = torch.func.grad_and_value(loss)(params)
        if not create_graph:
            grads, value = {k: g.detach() for k, g in grads.items()}, value.detach()
        return value, grads
    with torch.enable_grad():
        leaves = {k: p if p.requires_grad else p.detach().requires_grad_() for k, p in params.items()}
        value = loss(leaves)
        grads = torch.autograd.grad(value, list(leaves.values()), create_graph=create_graph)
    return (value if create_graph else value.detach()), dict(zip(leaves, grads))
