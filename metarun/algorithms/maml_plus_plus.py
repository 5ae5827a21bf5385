"""MAML++: MAML with the training fixes of "How to train your MAML"."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from metarun.algorithms.base import MetaAlgorithm, MetaOutput
from metarun.algorithms.inner_loop import Params, adapt, query_forward, task_loss
from metarun.checks import inner_loop_settings, integer_at_least, same_ways
from metarun.episodes import EpisodeBatch
from metarun.errors import ConfigError
from metarun.models.norm import TaskNorm2d

MSL_FLOOR = 0.03  # the non-final step weights anneal down to MSL_FLOOR / inner_steps


def _key(name: str) -> str:
    """A dotted module or parameter name as an `nn.ModuleDict` / `nn.ParameterDict` key."""
    return name.replace(".", "__")


def multi_step_loss_weights(steps: int, epoch: int, anneal_epochs: int) -> list[float]:
    """The importance of each inner step's query loss (MSL) at ``epoch``, as in the authors' code.

    At epoch 0 every step weighs 1/S. Each epoch every non-final weight drops by
    1/(S·``anneal_epochs``), down to a floor of 0.03/S, and the final weight gains what the others
    lose (up to 1 − (S−1)·0.03/S), so the weights sum to one at every epoch and the last step
    dominates after about ``anneal_epochs`` epochs.
    """
    if anneal_epochs < 1:
        raise ValueError(f"anneal_epochs={anneal_epochs}: MSL needs at least one epoch.")
    uniform = 1.0 / steps
    decay = uniform / anneal_epochs
    floor = MSL_FLOOR / steps
    weights = [max(uniform - epoch * decay, floor) for _ in range(steps - 1)]
    weights.append(min(uniform + epoch * (steps - 1) * decay, 1.0 - (steps - 1) * floor))
    return weights


class PerStepBatchNorm(nn.Module):
    """One batch-norm layer's affine parameters and running statistics, one row per inner step.

    ``weight``, ``bias``, ``running_mean``, ``running_var``: ``[S, C]``; ``num_batches_tracked``:
    ``[S]``; each is absent (None) where the layer has none (``affine=False``, or
    ``track_running_stats=False`` for the transductive norm). Rows start as copies of the layer's
    own tensors.
    """

    def __init__(self, norm: nn.Module, steps: int) -> None:
        super().__init__()
        for name in ("weight", "bias"):
            value = getattr(norm, name)
            self.register_parameter(
                name, None if value is None else nn.Parameter(value.detach().repeat(steps, 1))
            )  # [S, C]
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            value = getattr(norm, name, None)  # TaskNorm keeps no running statistics
            rows = None if value is None else value.detach().repeat(steps, *[1] * value.dim())
            self.register_buffer(name, rows)  # [S, C], or [S] for num_batches_tracked

    def at(self, step: int, prefix: str) -> dict[str, Tensor]:
        """Row ``step`` of every tensor, named as in the backbone (``prefix`` + ``weight``, ...).

        The running statistics are views: batch norm's in-place update in training mode writes
        into this step's row.
        """
        tensors = {**dict(self.named_parameters(recurse=False)), **dict(self.named_buffers(recurse=False))}
        return {prefix + name: value[step] for name, value in tensors.items()}


class MAMLPlusPlus(MetaAlgorithm):
    """MAML++ (Antoniou, Edwards & Storkey, ICLR 2019, "How to train your MAML").

    MAML with:

    - MSL, multi-step loss: the meta-loss is Σ_s w_s · L_query(θ_{s+1}) over the inner steps,
      with weights annealed towards the last step over ``multi_step_loss_epochs`` epochs
      (`multi_step_loss_weights`); from then on only the last step's query loss counts.
    - LSLR: a learned learning rate per parameter tensor ("layer") and per inner step,
      initialised to ``inner_lr``: θ_{s+1} = θ_s − α_{p,s} ∇L_support(θ_s).
    - BNWB / BNRS: each inner step s uses its own batch-norm weights and biases (meta-learned,
      never adapted in the inner loop) and, when the backbone keeps running statistics
      (``model.norm=running``), its own running mean and variance. They are swapped in
      through `functional_call`; the backbone's own batch-norm affine parameters are then
      frozen (``requires_grad=False``) and unused. With ``model.norm=tasknorm`` the per-step
      rows are TaskNorm's weights and biases; its blend (``scale``, ``offset``) is adapted
      like any other parameter, and queries are normalised with the support set's moments.
    - DA, derivative-order annealing: first-order for the first ``first_order_epochs``
      epochs, second-order after.
    - CA, cosine annealing of the outer learning rate: a config scheduler
      (``scheduler: {_target_: torch.optim.lr_scheduler.CosineAnnealingLR, ...}``).

    Epochs are counted by the ``outer_step`` buffer, advanced once per outer update by
    `end_outer_step` (so it is saved in checkpoints and restored on resume, and a meta-batch
    split into chunks advances it once):
    epoch = outer_step // ``steps_per_epoch``. At test time steps beyond ``inner_steps`` reuse
    the last step's learning rates and batch-norm set.

    With one inner step, MSL off, fixed rates and shared batch norm this is exactly MAML.

    Args:
        model: backbone whose output is the task prediction (a head of ``ways`` outputs).
        inner_lr: initial value of every per-step learning rate.
        inner_steps: inner steps during meta-training (S).
        test_inner_steps: inner steps at validation/test.
        multi_step_loss_epochs: epochs of MSL annealing; 0 turns MSL off.
        first_order_epochs: epochs of first-order meta-gradients before second order; 0
            is second-order throughout.
        learn_inner_lr: meta-learn the per-step rates (LSLR); false keeps them at ``inner_lr``.
        per_step_bn: per-step batch-norm parameters and statistics (BNWB/BNRS); false shares
            the backbone's batch norm across steps and adapts its affine parameters like MAML.
        steps_per_epoch: outer steps per epoch (the authors: 500).
    """

    lr_keys = ("inner_lr",)

    def __init__(
        self,
        model: nn.Module,
        inner_lr: float,
        inner_steps: int,
        test_inner_steps: int,
        multi_step_loss_epochs: int = 10,
        first_order_epochs: int = 0,
        learn_inner_lr: bool = True,
        per_step_bn: bool = True,
        steps_per_epoch: int = 500,
    ) -> None:
        super().__init__()
        inner_loop_settings(inner_lr, inner_steps, test_inner_steps)
        integer_at_least("algorithm.multi_step_loss_epochs", multi_step_loss_epochs, 0)
        integer_at_least("algorithm.first_order_epochs", first_order_epochs, 0)
        integer_at_least("algorithm.steps_per_epoch", steps_per_epoch, 1)
        self.model = model
        self.inner_steps, self.test_inner_steps = inner_steps, test_inner_steps
        self.multi_step_loss_epochs = multi_step_loss_epochs
        self.first_order_epochs = first_order_epochs
        self.steps_per_epoch = steps_per_epoch
        self.per_step_bn, self.learn_inner_lr = per_step_bn, learn_inner_lr

        norms = {
            name: m for name, m in model.named_modules() if isinstance(m, (nn.modules.batchnorm._BatchNorm, TaskNorm2d))
        }
        if per_step_bn and not norms:
            raise ConfigError(
                "algorithm.per_step_bn=true is not allowed with this model: it "
                "has no batch-norm layers (model.norm=none, or an MLP), so set it "
                "to false."
            )
        self.norms = nn.ModuleDict(
            {_key(name): PerStepBatchNorm(m, inner_steps) for name, m in norms.items()} if per_step_bn else {}
        )
        self._norm_names = {name: _key(name) for name in norms} if per_step_bn else {}
        replaced = {f"{name}.{p}" for name in self._norm_names for p in ("weight", "bias")}
        params = dict(model.named_parameters())
        for name in replaced & params.keys():
            params[name].requires_grad_(False)  # swapped for the per-step rows
        self.adapted_names = [name for name in params if name not in replaced]
        self.inner_lrs = nn.ParameterDict(
            {
                _key(name): nn.Parameter(
                    torch.full((inner_steps,), float(inner_lr), dtype=params[name].dtype, device=params[name].device),
                    requires_grad=learn_inner_lr,
                )
                for name in self.adapted_names
            }
        )  # [S] per parameter tensor
        self.register_buffer("outer_step", torch.zeros((), dtype=torch.long))

    # state of the schedule -----------------------------------------------------------------

    @property
    def epoch(self) -> int:
        """The current training epoch, from the ``outer_step`` counter."""
        return int(self.outer_step) // self.steps_per_epoch

    def uses_first_order(self, epoch: int) -> bool:
        """Derivative-order annealing: first-order during the first ``first_order_epochs``."""
        return epoch < self.first_order_epochs

    def step_weights(self, epoch: int) -> list[float] | None:
        """MSL weights of the inner steps at ``epoch``, or None once only the last step counts."""
        if epoch >= self.multi_step_loss_epochs:
            return None
        return multi_step_loss_weights(self.inner_steps, epoch, self.multi_step_loss_epochs)

    # per-step tensors ----------------------------------------------------------------------

    def step_learning_rates(self, step: int) -> dict[str, Tensor]:
        """α_{p,s} for every adapted parameter p (0-dim tensors), steps past S reuse S−1."""
        s = min(step, self.inner_steps - 1)
        return {name: self.inner_lrs[_key(name)][s] for name in self.adapted_names}

    def step_norm(self, step: int) -> dict[str, Tensor]:
        """The batch-norm tensors of inner step ``step`` (empty when batch norm is shared)."""
        s = min(step, self.inner_steps - 1)
        out: dict[str, Tensor] = {}
        for name, key in self._norm_names.items():
            out |= self.norms[key].at(s, name + ".")
        return out

    # meta-learning -------------------------------------------------------------------------

    def check_episode_shape(self, train_ways: int, ways: int) -> None:
        same_ways(train_ways, ways)

    def end_outer_step(self) -> None:
        self.outer_step.add_(1)

    def meta_loss(self, batch: EpisodeBatch) -> MetaOutput:
        epoch = self.epoch
        first_order = self.uses_first_order(epoch)
        weights = self.step_weights(epoch)
        theta = dict(self.model.named_parameters())
        start: Params = {name: theta[name] for name in self.adapted_names}

        def one_task(sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor) -> tuple[Tensor, Tensor]:
            params, total = start, 0.0
            for s in range(self.inner_steps):
                norm = self.step_norm(s)
                params = adapt(self.model, params, sx, sy, 1, self.step_learning_rates(s), first_order, fixed=norm)
                if weights is not None or s == self.inner_steps - 1:
                    pred = query_forward(self.model, params, sx, qx, fixed=norm)  # [N*Q, N]
                    loss = task_loss(pred, qy)
                    total = total + (loss if weights is None else weights[s] * loss)
            return total, pred.detach()

        losses, logits = self.map_tasks(
            one_task, batch.support_x, batch.support_y, batch.query_x, batch.query_y
        )  # [B], [B, N*Q, N]
        return MetaOutput(losses.mean(), logits)

    def predict(self, batch: EpisodeBatch) -> MetaOutput:
        theta = dict(self.model.named_parameters())
        start = {name: theta[name].detach() for name in self.adapted_names}

        def one_task(sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor) -> tuple[Tensor, ...]:
            norm = {k: v.detach() for k, v in self.step_norm(0).items()}
            before = query_forward(self.model, start, sx, qx, fixed=norm).detach()
            params = start
            for s in range(self.test_inner_steps):
                norm = {k: v.detach() for k, v in self.step_norm(s).items()}
                lrs = {k: v.detach() for k, v in self.step_learning_rates(s).items()}
                params = adapt(self.model, params, sx, sy, 1, lrs, first_order=True, fixed=norm)
            pred = query_forward(self.model, params, sx, qx, fixed=norm).detach()  # [N*Q, N]
            return task_loss(pred, qy), pred, before

        with torch.enable_grad():
            losses, logits, before = self.map_tasks(
                one_task, batch.support_x, batch.support_y, batch.query_x, batch.query_y
            )
        return MetaOutput(losses.mean(), logits, before)
