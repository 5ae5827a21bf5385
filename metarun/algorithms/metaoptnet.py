"""MetaOptNet: a multi-class linear SVM head solved per task and differentiated through its
optimality conditions."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metarun.algorithms.base import MetaAlgorithm, MetaOutput, embedding_network, solved_in_float32
from metarun.checks import number_in, positive_int, positive_number
from metarun.episodes import EpisodeBatch


def project_rows(v: Tensor, upper: Tensor) -> Tensor:
    """The Euclidean projection of each row of ``v [..., N]`` onto ``{t ≤ upper, Σ_k t_k = 0}``.

    The projection is ``min(upper, v − θ)`` with θ the root of ``Σ_k min(u_k, v_k − θ) = 0``.
    That sum is at most ``L_j(θ) = Σ_{top j} u + Σ_{rest} (v − θ)`` for every prefix of the
    components sorted by ``v − u`` (each term is replaced by one of the two it is the minimum
    of), with equality on the root's own piece, so θ is the smallest of the roots of the L_j.
    Exact, sort-based, no iteration; ``upper`` must have a positive row sum.
    """
    n = v.shape[-1]
    order = (v - upper).argsort(-1, descending=True)  # clipped first
    u_sorted, v_sorted = upper.gather(-1, order), v.gather(-1, order)  # [..., N]
    zero = torch.zeros_like(v[..., :1])
    top_u = torch.cat([zero, u_sorted.cumsum(-1)], -1)[..., :n]  # Σ u over the first j, j = 0..N-1
    top_v = torch.cat([zero, v_sorted.cumsum(-1)], -1)[..., :n]
    free = torch.arange(n, 0, -1, dtype=v.dtype, device=v.device)  # N − j
    theta = ((top_u + v.sum(-1, keepdim=True) - top_v) / free).min(-1, keepdim=True).values  # [..., 1]
    return torch.minimum(upper, v - theta)


def kkt_solve(q: Tensor, onehot: Tensor, upper: Tensor, active: Tensor) -> Tensor:
    """The solution of the SVM dual's KKT conditions with the bound constraints in ``active``
    held at their bounds: one linear system per task, differentiable in ``q``.

    Unknowns: τ ``[n, N]`` (flattened) and one multiplier per support example for ``Σ_k τ_ik = 0``.
    Rows of free τ_ik: ``(Q τ)_ik + ν_i = Y_ik``; rows of active τ_ik: ``τ_ik = upper_ik``;
    rows of the equality constraints: ``Σ_k τ_ik = 0``. ``q [B, n, n]``, the rest ``[B, n, N]``.
    """
    b, n, ways = onehot.shape
    m = n * ways
    eye_w = torch.eye(ways, dtype=q.dtype, device=q.device)
    big_q = (q[:, :, None, :, None] * eye_w[None, None, :, None, :]).reshape(b, m, m)  # Q ⊗ I  [B, m, m]
    a = torch.eye(n, dtype=q.dtype, device=q.device).repeat_interleave(ways, 1)  # [n, m]: row i sums τ_i·
    act = active.reshape(b, m, 1)
    top = torch.cat([big_q, a.t().expand(b, m, n)], -1)  # [B, m, m+n]
    fixed = torch.cat([torch.eye(m, dtype=q.dtype, device=q.device), q.new_zeros(m, n)], -1)  # [m, m+n]
    top = torch.where(act, fixed.expand(b, m, m + n), top)
    bottom = torch.cat([a, a.new_zeros(n, n)], -1).expand(b, n, m + n)  # [B, n, m+n]
    rhs = torch.cat([torch.where(act[..., 0], upper.reshape(b, m), onehot.reshape(b, m)), q.new_zeros(b, n)], -1)
    z = torch.linalg.solve(torch.cat([top, bottom], 1), rhs)  # [B, m+n]
    return z[:, :m].reshape(b, n, ways)


def svm_dual(kernel: Tensor, support_y: Tensor, ways: int, c: float, ridge: float, steps: int) -> Tensor:
    """The Crammer–Singer multi-class SVM dual, solved per task: ``τ [B, n, N]``.

        min_τ  ½ Σ_k τ_·kᵀ (K + ridge·I) τ_·k − Σ_i τ_{i,y_i}   s.t.  τ_ik ≤ C·[k = y_i],  Σ_k τ_ik = 0,

    whose classifier is ``w_k = Σ_i τ_ik f(x_i)`` (``kernel [B, n, n]``: support inner products).
    ``steps`` iterations of accelerated projected gradient (step 1/L, momentum for a μ-strongly
    convex objective; `project_rows` is exact) find the bound constraints that hold; the
    solution is then the KKT system of that active set (`kkt_solve`), exact and differentiable
    in the kernel by the implicit function theorem, so memory does not grow with ``steps``.
    A task whose active set was not found (the polished solution leaves the feasible set)
    keeps the iterate, detached.
    """
    onehot = F.one_hot(support_y, ways).to(kernel.dtype)  # [B, n, N]
    upper = c * onehot
    eye = torch.eye(kernel.shape[-1], dtype=kernel.dtype, device=kernel.device)
    q = kernel + ridge * eye  # [B, n, n]
    with torch.no_grad():
        qd = q.detach()
        eig = torch.linalg.eigvalsh(qd)  # [B, n], ascending
        lip, mu = eig[:, -1:, None], eig[:, :1, None].clamp_min(0)  # [B, 1, 1]
        momentum = (lip.sqrt() - mu.sqrt()) / (lip.sqrt() + mu.sqrt())
        tau = torch.zeros_like(onehot)
        y = tau
        for _ in range(steps):
            new = project_rows(y - (qd @ y - onehot) / lip, upper)
            y = new + momentum * (new - tau)
            tau = new
        active = tau >= upper
    solved = kkt_solve(q, onehot, upper, active)  # [B, n, N]
    feasible = ((solved <= upper + 1e-6 * c).all(-1).all(-1))[:, None, None]
    return torch.where(feasible, solved, tau)


class MetaOptNet(MetaAlgorithm):
    """MetaOptNet-SVM (Lee, Maji, Ravichandran & Soatto, CVPR 2019, "Meta-Learning with
    Differentiable Convex Optimization").

    Each task fits a Crammer–Singer multi-class linear SVM to its embedded support set by
    solving the dual (`svm_dual`), and scores a query by ``s · Σ_i τ_ik ⟨f(x_i), f(q)⟩`` with a
    learned scale s. The meta-gradient reaches the backbone through the optimality (KKT)
    conditions of the solution rather than through the solver's iterations. As in the
    authors' released code the dual's kernel carries a ridge of 1 (``kernel_ridge``).
    Under mixed precision the backbone runs in bf16/fp16 and the solve in float32.

    The solver is our own, not a QP library: it runs batched on CPU and GPU in plain torch
    (and under `map_tasks`' vmap), has a fixed cost per step, and its backward is one linear
    solve of size n·N + n per task (n support images, N ways).

    Args:
        model: embedding network (no classifier head).
        c: the SVM's cost C (the authors: 0.1).
        kernel_ridge: added to the kernel's diagonal (the authors: 1.0).
        solver_steps: iterations before the active set is read off (exactness comes from
            the KKT solve; the steps only have to find which bounds hold).
        scale: the logits' learned scale, starting value (the authors: 1).
        label_smoothing: on the query loss during meta-training (the authors: 0.1).
    """

    needs_head = False
    tasks = ("classification",)

    def __init__(
        self,
        model: nn.Module,
        c: float = 0.1,
        kernel_ridge: float = 1.0,
        solver_steps: int = 100,
        scale: float = 1.0,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__()
        self.model = embedding_network(model, "MetaOptNet")
        positive_number("algorithm.c", c)
        positive_number("algorithm.scale", scale)
        positive_int("algorithm.solver_steps", solver_steps)
        self.c, self.solver_steps = float(c), solver_steps
        self.kernel_ridge = number_in("algorithm.kernel_ridge", kernel_ridge, 0)
        self.label_smoothing = number_in("algorithm.label_smoothing", label_smoothing, 0, 1)
        self.scale = nn.Parameter(torch.tensor(float(scale)))

    def logits(self, z: Tensor, support_y: Tensor) -> Tensor:
        """SVM scores of episodes embedded as ``z [B, NK+NQ, D]`` -> ``[B, NQ, N]``."""
        nk = support_y.shape[1]
        ways = int(support_y.max()) + 1
        support, query = z[:, :nk], z[:, nk:]
        kernel = support @ support.transpose(1, 2)  # [B, NK, NK]
        tau = svm_dual(kernel, support_y, ways, self.c, self.kernel_ridge, self.solver_steps)  # [B, NK, N]
        return self.scale * (query @ support.transpose(1, 2)) @ tau  # [B, NQ, N]

    def meta_loss(self, batch: EpisodeBatch) -> MetaOutput:
        logits = solved_in_float32(self.logits, self.embed_episodes(batch).flatten(2), batch.support_y)  # [B, NQ, N]
        smoothing = self.label_smoothing if self.training else 0.0
        loss = F.cross_entropy(logits.flatten(0, 1), batch.query_y.flatten(), label_smoothing=smoothing)
        return MetaOutput(loss, logits.detach())

    def predict(self, batch: EpisodeBatch) -> MetaOutput:
        return self.meta_loss(batch)
