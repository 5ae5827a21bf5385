"""Implicit MAML: a proximal inner problem, the meta-gradient by the implicit function theorem."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.func import grad, grad_and_value

from metarun.algorithms.base import MetaAlgorithm, MetaOutput
from metarun.algorithms.inner_loop import Params, forward, query_forward, task_loss
from metarun.checks import inner_loop_settings, number_in, positive_int, positive_number, same_ways
from metarun.episodes import EpisodeBatch


def dot(a: Params, b: Params) -> Tensor:
    """``Σ_k ⟨a_k, b_k⟩`` over the parameters."""
    return sum((a[k] * b[k]).sum() for k in a)  # type: ignore[return-value]


def proximal_adapt(loss: Callable[[Params], Tensor], theta: Params, steps: int, lr: float, prox: float) -> Params:
    """``steps`` steps of gradient descent on ``loss(φ) + (λ/2)‖φ − θ‖²`` from φ = θ, without a
    graph to θ (memory does not grow with ``steps``). ``θ`` must be detached."""

    def objective(p: Params) -> Tensor:
        step = {k: p[k] - theta[k] for k in p}
        return loss(p) + 0.5 * prox * dot(step, step)

    phi = dict(theta)
    for _ in range(steps):
        g = grad(objective)(phi)
        phi = {k: (phi[k] - lr * g[k]).detach() for k in phi}
    return phi


def conjugate_gradient(apply: Callable[[Params], Params], b: Params, steps: int) -> Params:
    """``steps`` iterations of conjugate gradient for ``apply(x) = b`` from x = 0, truncated
    (Steihaug) where a direction of non-positive curvature appears: the iterate stops there,
    as the solution of a positive definite system would never need such a step. (``apply`` is
    ``I + H/λ``, whose H — a network's Hessian — can be indefinite.) A converged residual
    stays zero; the stop is a mask, so the loop runs the same under vmap."""
    x = {k: torch.zeros_like(v) for k, v in b.items()}
    r = dict(b)
    p = dict(b)
    rs = dot(r, r)
    going = rs > 0
    for _ in range(steps):
        ap = apply(p)
        curvature = dot(p, ap)
        going = going & (curvature > 0)
        alpha = torch.where(going, rs / torch.where(going, curvature, 1.0), 0.0)
        x = {k: x[k] + alpha * p[k] for k in x}
        r = {k: r[k] - alpha * ap[k] for k in r}
        new = dot(r, r)
        going = going & (new > 0)
        beta = torch.where(going, new / torch.where(rs > 0, rs, 1.0), 0.0)
        p = {k: r[k] + beta * p[k] for k in p}
        rs = new
    return x


def implicit_meta_gradient(
    model: nn.Module,
    theta: Params,
    sx: Tensor,
    sy: Tensor,
    qx: Tensor,
    qy: Tensor,
    steps: int,
    lr: float,
    prox: float,
    cg_steps: int,
    damping: float = 0.0,
    prox_damping: float = 0.0,
) -> tuple[Params, Tensor, Tensor]:
    """One task's iMAML meta-gradient ``(I + H/λ)⁻¹ ∇L_query(φ*)``, its query loss and predictions
    (with ``damping`` and ``prox_damping`` > 0, the authors' damped system
    ``((1 + damping) I + H/(λ + prox_damping))⁻¹ ∇L_query(φ*)``).

    φ* approximately minimises ``L_support(φ) + (λ/2)‖φ − θ‖²`` (`proximal_adapt`); H is the
    support loss's Hessian at φ*, applied through Hessian-vector products (reverse over reverse)
    inside `conjugate_gradient`. Pure in ``theta`` (detached): runs the same per task
    in a loop or under `torch.func.vmap`.
    """
    support_loss = lambda p: task_loss(forward(model, p, sx), sy)  # noqa: E731
    phi = proximal_adapt(support_loss, theta, steps, lr, prox)

    def query_loss(p: Params) -> tuple[Tensor, Tensor]:
        pred = query_forward(model, p, sx, qx)  # [N*Q, N] or [Q, D_out]
        return task_loss(pred, qy), pred

    g_query, (loss, pred) = grad_and_value(query_loss, has_aux=True)(phi)
    hessian = lambda v: grad(lambda p: dot(grad(support_loss)(p), v))(phi)  # noqa: E731
    apply = lambda v: {k: (1 + damping) * v[k] + h / (prox + prox_damping) for k, h in hessian(v).items()}  # noqa: E731
    return conjugate_gradient(apply, g_query, cg_steps), loss.detach(), pred.detach()


class IMAML(MetaAlgorithm):
    """iMAML (Rajeswaran, Finn, Kakade & Levine, NeurIPS 2019, "Meta-Learning with Implicit
    Gradients").

    Each task adapts by minimising its support loss plus ``(λ/2)‖φ − θ‖²`` (``inner_steps``
    gradient steps from θ). Because φ* is then the solution of an optimisation problem, its
    Jacobian is ``dφ*/dθ = (I + H/λ)⁻¹`` (H: the support loss's Hessian at φ*), and the
    meta-gradient ``(I + H/λ)⁻¹ ∇L_query(φ*)`` is found by ``cg_steps`` of conjugate gradient
    with Hessian-vector products, never by differentiating through the inner steps, so its
    memory does not depend on ``inner_steps``. The outer update is written as a surrogate loss
    whose gradient is the mean of the tasks' meta-gradients and whose value is the query loss.

    Args:
        model: backbone whose output is the task prediction.
        inner_lr: step size of the inner gradient descent.
        inner_steps: inner steps during meta-training.
        test_inner_steps: inner steps at validation/test.
        prox: λ, the strength of the pull of φ towards θ.
        cg_steps: conjugate-gradient iterations (the authors: 5).
        cg_damping, prox_damping: the authors' code solves ``((1 + cg_damping) I + H/(λ +
            prox_damping)) x = g`` (their ``regu_coef`` 1 and ``lam_damping`` 10), a damped,
            better conditioned system; both 0 give the exact implicit gradient.
    """

    lr_keys = ("inner_lr",)

    def __init__(
        self,
        model: nn.Module,
        inner_lr: float,
        inner_steps: int,
        test_inner_steps: int,
        prox: float = 2.0,
        cg_steps: int = 5,
        cg_damping: float = 1.0,
        prox_damping: float = 10.0,
    ) -> None:
        super().__init__()
        inner_loop_settings(inner_lr, inner_steps, test_inner_steps)
        positive_number("algorithm.prox", prox)
        positive_int("algorithm.cg_steps", cg_steps)
        self.model = model
        self.inner_lr, self.inner_steps, self.test_inner_steps = inner_lr, inner_steps, test_inner_steps
        self.prox, self.cg_steps = float(prox), cg_steps
        self.cg_damping = number_in("algorithm.cg_damping", cg_damping, 0)
        self.prox_damping = number_in("algorithm.prox_damping", prox_damping, 0)

    def check_episode_shape(self, train_ways: int, ways: int) -> None:
        same_ways(train_ways, ways)

    def meta_loss(self, batch: EpisodeBatch) -> MetaOutput:
        params = dict(self.model.named_parameters())
        theta = {k: p.detach() for k, p in params.items()}

        def one_task(sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor) -> tuple[Params, Tensor, Tensor]:
            return implicit_meta_gradient(
                self.model,
                theta,
                sx,
                sy,
                qx,
                qy,
                self.inner_steps,
                self.inner_lr,
                self.prox,
                self.cg_steps,
                self.cg_damping,
                self.prox_damping,
            )

        with torch.enable_grad():
            grads, losses, preds = self.map_tasks(
                one_task, batch.support_x, batch.support_y, batch.query_x, batch.query_y
            )  # {name: [B, ...]}, [B], [B, N*Q, N]
        surrogate = sum((params[k] * grads[k].mean(0)).sum() for k in params)
        loss = losses.mean() + surrogate - surrogate.detach()  # value: the query loss; gradient: the mean meta-gradient
        return MetaOutput(loss, preds)

    def predict(self, batch: EpisodeBatch) -> MetaOutput:
        theta = {k: p.detach() for k, p in self.model.named_parameters()}

        def one_task(sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor) -> tuple[Tensor, ...]:
            support_loss = lambda p: task_loss(forward(self.model, p, sx), sy)  # noqa: E731
            phi = proximal_adapt(support_loss, theta, self.test_inner_steps, self.inner_lr, self.prox)
            before = query_forward(self.model, theta, sx, qx).detach()
            pred = query_forward(self.model, phi, sx, qx).detach()
            return task_loss(pred, qy), pred, before

        with torch.enable_grad():
            losses, preds, before = self.map_tasks(
                one_task, batch.support_x, batch.support_y, batch.query_x, batch.query_y
            )
        return MetaOutput(losses.mean(), preds, before)
