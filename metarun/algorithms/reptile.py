"""Reptile: first-order meta-learning by moving the initialisation towards adapted weights."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from metarun.algorithms.base import MetaAlgorithm, MetaOutput
from metarun.algorithms.inner_loop import Params, forward, query_forward, task_loss
from metarun.algorithms.tasks import support_gradients
from metarun.checks import inner_loop_settings, positive_int, positive_number, same_ways
from metarun.episodes import EpisodeBatch, task_generator
from metarun.errors import ConfigError

INNER_OPTIMIZERS = ("sgd", "adam")
# Streams of the minibatch-order generators, apart from the sampler's 0 (train), 1, 2 (val, test).
TRAIN_ORDER, EVAL_ORDER = 10, 11


def minibatch_indices(
    size: int, batch_size: int | None, steps: int, generator: torch.Generator | None
) -> list[Tensor | None]:
    """Which support examples each inner step uses (None: all of them).

    As in Nichol et al.'s code, the support set is shuffled and cut into consecutive
    minibatches, reshuffled whenever it is exhausted (a minibatch may span two shuffles).
    """
    if batch_size is None or batch_size >= size:
        return [None] * steps
    epochs = -(-steps * batch_size // size)  # ceil: enough shuffles for every step
    order = torch.cat([torch.randperm(size, generator=generator) for _ in range(epochs)])
    return [order[s * batch_size : (s + 1) * batch_size] for s in range(steps)]  # steps × [b]


def inner_train(
    model: nn.Module,
    params: Params,
    x: Tensor,
    y: Tensor,
    steps: int,
    lr: float,
    optimizer: str,
    batches: Tensor | None,
    betas: tuple[float, float] = (0.0, 0.999),
    eps: float = 1e-8,
) -> Params:
    """``steps`` first-order steps of SGD or Adam on the support loss, from ``params``.

    Pure: takes and returns a ``dict[str, Tensor]``; the result is detached (Reptile never
    differentiates through the inner loop). ``batches [steps, b]``: the support examples of
    each step (None: all of them). Adam is written functionally with a fresh state per
    task: m ← β₁m + (1−β₁)g, v ← β₂v + (1−β₂)g², θ ← θ − lr·m̂/(√v̂ + ε) with the usual
    bias corrections m̂ = m/(1−β₁ᵗ), v̂ = v/(1−β₂ᵗ). Runs the same inside `map_tasks`' vmap.
    """
    params = {k: v.detach() for k, v in params.items()}
    m = {k: torch.zeros_like(v) for k, v in params.items()}
    v2 = {k: torch.zeros_like(v) for k, v in params.items()}
    b1, b2 = betas
    for t in range(1, steps + 1):
        xb, yb = (x, y) if batches is None else (x[batches[t - 1]], y[batches[t - 1]])  # [b, ...]
        _, grads = support_gradients(
            lambda p, xb=xb, yb=yb: task_loss(forward(model, p, xb), yb), params, create_graph=False
        )
        new: Params = {}
        for name, p in params.items():
            g = grads[name]
            if optimizer == "sgd":
                step = lr * g
            else:
                m[name] = b1 * m[name] + (1 - b1) * g
                v2[name] = b2 * v2[name] + (1 - b2) * g * g
                m_hat = m[name] / (1 - b1**t)
                v_hat = v2[name] / (1 - b2**t)
                step = lr * m_hat / (v_hat.sqrt() + eps)
            new[name] = (p - step).detach()
        params = new
    return params


class Reptile(MetaAlgorithm):
    """Reptile (Nichol, Achiam & Schulman 2018, "On First-Order Meta-Learning Algorithms").

    For each task, train a copy of the weights θ for k steps of SGD or Adam on the task's
    support set, giving θ′; then move the initialisation towards it, θ ← θ + ε(θ′ − θ),
    averaged over the meta-batch. The outer update is written as the surrogate loss
    ½‖θ − stopgrad(θ′)‖² (summed over parameters, averaged over tasks), whose gradient is
    exactly θ − θ′: one outer SGD step with learning rate ε is Reptile, and the Lightning
    module and DDP need no special case. (Any other outer optimiser, e.g. Adam, applies its
    own rule to the Reptile direction.) The inner loop uses the support set only, never the
    query set; the query set is predicted by θ′ for the metrics.

    Args:
        model: backbone whose output is the task prediction (a head of ``ways`` outputs).
        inner_lr: the inner optimiser's learning rate.
        inner_steps: k, inner steps during meta-training.
        test_inner_steps: inner steps at validation/test (the paper: 50 on Omniglot).
        inner_optimizer: "sgd" or "adam" (the paper uses Adam with β₁ = 0 on Omniglot).
        inner_batch_size: support examples per inner step, shuffled and cycled; None (or a
            size at least the support set) uses the whole support set every step.
        test_inner_batch_size: the same at validation/test.
        inner_betas: Adam's (β₁, β₂) for ``inner_optimizer="adam"``.
        inner_eps: Adam's ε.
        seed: seeds the minibatch order, from (seed, update count, task index).
    """

    lr_keys = ("inner_lr",)

    def __init__(
        self,
        model: nn.Module,
        inner_lr: float,
        inner_steps: int,
        test_inner_steps: int,
        inner_optimizer: str = "sgd",
        inner_batch_size: int | None = None,
        test_inner_batch_size: int | None = None,
        inner_betas: Sequence[float] = (0.0, 0.999),
        inner_eps: float = 1e-8,
        seed: int = 0,
    ) -> None:
        super().__init__()
        inner_loop_settings(inner_lr, inner_steps, test_inner_steps)
        positive_int("algorithm.inner_batch_size", inner_batch_size, allow_none=True)
        positive_int("algorithm.test_inner_batch_size", test_inner_batch_size, allow_none=True)
        if inner_optimizer not in INNER_OPTIMIZERS:
            raise ConfigError(
                f"algorithm.inner_optimizer={inner_optimizer!r} is not allowed: "
                f"choose one of {', '.join(INNER_OPTIMIZERS)}."
            )
        betas = tuple(inner_betas)
        if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
            raise ConfigError(
                f"algorithm.inner_betas={list(inner_betas)!r} is not allowed: it must be two numbers in [0, 1)."
            )
        positive_number("algorithm.inner_eps", inner_eps)
        self.model = model
        self.inner_lr, self.inner_steps = inner_lr, inner_steps
        self.test_inner_steps = test_inner_steps
        self.inner_optimizer = inner_optimizer
        self.inner_batch_size, self.test_inner_batch_size = inner_batch_size, test_inner_batch_size
        self.inner_betas: tuple[float, float] = (float(betas[0]), float(betas[1]))
        self.inner_eps, self.seed = inner_eps, seed
        # outer updates so far: with the task index it seeds the minibatch order, and it is
        # saved in checkpoints, so a resumed run draws what an uninterrupted one would
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))

    def check_episode_shape(self, train_ways: int, ways: int) -> None:
        same_ways(train_ways, ways)

    def end_outer_step(self) -> None:
        self.updates += 1

    def minibatches(
        self, batch: EpisodeBatch, stream: int, update: int, steps: int, batch_size: int | None
    ) -> Tensor | None:
        """Each task's support examples per inner step, ``[B, steps, b]``, drawn from the
        task's own generator (seed, stream, update, task index); None: the whole support set."""
        size = batch.support_x.shape[1]
        if batch_size is None or batch_size >= size:
            return None
        return torch.stack(
            [  # [B, steps, b]
                torch.stack(
                    minibatch_indices(size, batch_size, steps, task_generator(self.seed, stream, update, int(i)))
                )
                for i in batch.index
            ]
        ).to(batch.support_x.device)

    def adapt_tasks(
        self,
        batch: EpisodeBatch,
        steps: int,
        batches: Tensor | None,
        score: Callable[[Params, Params, Tensor, Tensor, Tensor], Any],
    ) -> Any:
        """Run the inner optimiser on every task's support set from the current weights
        and return ``score(θ, θ′, support_x, query_x, query_y)`` per task, stacked."""
        theta = dict(self.model.named_parameters())

        def one_task(sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor, *idx: Tensor) -> Any:
            adapted = inner_train(
                self.model,
                theta,
                sx,
                sy,
                steps,
                self.inner_lr,
                self.inner_optimizer,
                idx[0] if idx else None,
                self.inner_betas,
                self.inner_eps,
            )
            return score(theta, adapted, sx, qx, qy)

        tensors = [batch.support_x, batch.support_y, batch.query_x, batch.query_y]
        return self.map_tasks(one_task, *tensors, *([] if batches is None else [batches]))

    def meta_loss(self, batch: EpisodeBatch) -> MetaOutput:
        def score(theta: Params, adapted: Params, sx: Tensor, qx: Tensor, qy: Tensor) -> tuple[Tensor, Tensor]:
            # ½‖θ − stopgrad(θ′)‖²: its gradient w.r.t. θ is θ − θ′
            surrogate = sum(0.5 * (theta[k] - adapted[k]).pow(2).sum() for k in theta)
            return surrogate, query_forward(self.model, adapted, sx, qx).detach()  # [N*Q, N]

        batches = self.minibatches(batch, TRAIN_ORDER, int(self.updates), self.inner_steps, self.inner_batch_size)
        losses, logits = self.adapt_tasks(batch, self.inner_steps, batches, score)
        return MetaOutput(losses.mean(), logits)

    def predict(self, batch: EpisodeBatch) -> MetaOutput:
        def score(theta: Params, adapted: Params, sx: Tensor, qx: Tensor, qy: Tensor) -> tuple[Tensor, ...]:
            before = query_forward(self.model, theta, sx, qx).detach()
            pred = query_forward(self.model, adapted, sx, qx).detach()  # [N*Q, N]
            return task_loss(pred, qy), pred, before

        batches = self.minibatches(batch, EVAL_ORDER, 0, self.test_inner_steps, self.test_inner_batch_size)
        with torch.enable_grad():
            losses, logits, before = self.adapt_tasks(batch, self.test_inner_steps, batches, score)
        return MetaOutput(losses.mean(), logits, before)
