"""The normalisation choice for backbones used by episodic learners."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from metarun.errors import ConfigError

NORMS = ("transductive", "running", "tasknorm", "support", "none")
CONTEXT_NORMS = ("tasknorm", "support")  # normalise with the support (context) set: need context_size


class TaskNorm2d(nn.Module):
    """TaskNorm-I (Bronskill, Gordon, Requeima, Nowozin & Turner, ICML 2020, "TaskNorm:
    Rethinking Batch Normalization for Meta-Learning").

    Each example is normalised with moments that blend the context (support) set's batch
    moments with the example's own instance-norm moments, per channel::

        α  = sigmoid(scale · n + offset)          n = number of context examples
        μ  = α μ_BN + (1 − α) μ_IN(x)
        σ² = α (σ²_BN + (μ_BN − μ)²) + (1 − α) (σ²_IN(x) + (μ_IN(x) − μ)²)
        y  = weight · (x − μ) / √(σ² + eps) + bias

    μ_BN, σ²_BN are the biased mean and variance over the context examples and pixels;
    μ_IN(x), σ²_IN(x) over the pixels of x alone. ``scale`` and ``offset`` are learned
    scalars, both initialised to 0 (α = ½) as in the authors' code; ``weight`` and
    ``bias`` are the usual per-channel affine parameters.

    Which rows are the context: ``forward(x, context_size)`` takes the first
    ``context_size`` rows of ``x`` as the context set (``None``: all of them). The layer
    keeps no state, so it is pure under `torch.func.functional_call`: to score a query set
    with its support set's moments, run the model once on ``cat([support, query])`` with
    ``context_size = len(support)`` and keep the query rows. A query row never changes
    another row's output (its own instance moments only), so this is not transductive over
    the query set. The authors' code instead stores the context moments in the module in
    training mode and reuses them in evaluation mode; we chose the argument to keep the
    inner loop pure. Training and evaluation behave the same (no running averages).

    With ``blend=False`` α is fixed at 1 (no ``scale``/``offset``): every row, support and
    query alike, is normalised with the context set's batch moments only ("MetaBN" in
    Bronskill et al. 2020), which is ``model.norm=support``.

    Args:
        channels: feature channels.
        eps: added to the variance.
        blend: learn α (TaskNorm-I); False fixes α = 1 (support moments only).

    """

    def __init__(self, channels: int, eps: float = 1e-5, blend: bool = True) -> None:
        super().__init__()
        self.eps, self.blend = eps, blend
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        if blend:
            self.scale = nn.Parameter(torch.zeros(()))
            self.offset = nn.Parameter(torch.zeros(()))

    def alpha(self, context_size: int) -> Tensor:
        """α = sigmoid(scale · n + offset), the weight of the context moments (1 without blend)."""
        if not self.blend:
            return self.weight.new_ones(())
        return torch.sigmoid(self.scale * context_size + self.offset)

    def forward(self, x: Tensor, context_size: int | None = None) -> Tensor:
        n = x.shape[0] if context_size is None else context_size
        if not 0 < n <= x.shape[0]:
            raise ValueError(f"context_size={n} must be in 1..{x.shape[0]} (rows of x).")
        context = x[:n]  # [n, C, H, W]
        mu_bn = context.mean((0, 2, 3), keepdim=True)  # [1, C, 1, 1]
        var_bn = context.var((0, 2, 3), unbiased=False, keepdim=True)  # [1, C, 1, 1]
        mu_in = x.mean((2, 3), keepdim=True)  # [M, C, 1, 1]
        var_in = x.var((2, 3), unbiased=False, keepdim=True)  # [M, C, 1, 1]
        a = self.alpha(n)
        mu = a * mu_bn + (1 - a) * mu_in  # [M, C, 1, 1]
        var = a * (var_bn + (mu_bn - mu) ** 2) + (1 - a) * (var_in + (mu_in - mu) ** 2)
        y = (x - mu) / torch.sqrt(var + self.eps)
        return y * self.weight[:, None, None] + self.bias[:, None, None]  # [M, C, H, W]


class BatchStatNorm2d(nn.BatchNorm2d):
    """Batch norm with the current batch's statistics only (``model.norm=transductive``).

    Outside `torch.func` transforms this is PyTorch's fused kernel. Inside one (the tasks
    of `metarun.algorithms.tasks.map_tasks` under vmap) the same normalisation is written
    with plain tensor operations: PyTorch's fused batch norm gives a wrong second
    derivative under vmap (measured: second-order MAML's meta-gradient off by 5e-2 in
    float64, exact with these operations). Same parameters (``weight``, ``bias``) and
    state dict as ``nn.BatchNorm2d(channels, track_running_stats=False)``.
    """

    def __init__(self, channels: int) -> None:
        super().__init__(channels, track_running_stats=False)

    def forward(self, x: Tensor) -> Tensor:
        if torch._C._functorch.maybe_current_level() is None:  # not inside vmap / grad
            return super().forward(x)
        mean = x.mean((0, 2, 3), keepdim=True)  # [1, C, 1, 1]
        var = x.var((0, 2, 3), unbiased=False, keepdim=True)  # [1, C, 1, 1]
        y = (x - mean) * torch.rsqrt(var + self.eps)
        return y * self.weight[:, None, None] + self.bias[:, None, None]  # [M, C, H, W]


def batch_norm(channels: int, norm: str) -> nn.Module:
    """Batch norm in one of five modes (the `model.norm` key).

    - ``transductive``: always the current batch's statistics, no running buffers; at test
      time the statistics come from whatever batch the model is called on — in MAML the
      support set while adapting and the query set (all queries together) when scoring,
      so query examples influence each other (Finn et al. 2017).
    - ``running``: standard batch norm; running averages accumulated in training are used
      in evaluation (Snell et al. 2017). Evaluation is then independent of the task, but
      the statistics are those of the training classes.
    - ``tasknorm``: TaskNorm-I (Bronskill et al. 2020, `TaskNorm2d`): the support set's
      batch moments blended with each example's instance moments, with a learned weight
      depending on the support-set size; queries are normalised with the support moments
      and never with each other's. Needs a model that passes ``context_size`` (`Conv4`);
      called without it, the whole batch is the context.
    - ``support``: every example, support and query, is normalised with the support set's
      batch moments alone (`TaskNorm2d` with α = 1; "MetaBN" in Bronskill et al. 2020).
      Queries never see each other or their own statistics: our counterpart, in a pure
      inner loop, to Ravi & Larochelle's (2017) rule of never normalising a meta-test
      batch with its own statistics.
    - ``none``: identity.
    """
    if norm == "transductive":
        return BatchStatNorm2d(channels)
    if norm == "running":
        return nn.BatchNorm2d(channels)
    if norm == "tasknorm":
        return TaskNorm2d(channels)
    if norm == "support":
        return TaskNorm2d(channels, blend=False)
    if norm == "none":
        return nn.Identity()
    raise ConfigError(f"model.norm={norm!r} is not allowed: choose one of {', '.join(NORMS)}.")
