"""The fine-tuning baselines Baseline and Baseline++ of Chen et al. (2019)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metarun.algorithms.base import MetaAlgorithm, MetaOutput, embedding_dim, embedding_network
from metarun.algorithms.tasks import support_gradients
from metarun.checks import positive_int, positive_number
from metarun.episodes import EpisodeBatch
from metarun.errors import ConfigError

HEADS = ("linear", "cosine")


def cosine_logits(features: Tensor, weight: Tensor, scale: float | Tensor) -> Tensor:
    """``scale · cos(w_c, f)`` for every class: ``features [M, D]``, ``weight [N, D]`` -> ``[M, N]``."""
    return scale * F.normalize(features, dim=-1) @ F.normalize(weight, dim=-1).T


def head_logits(features: Tensor, weight: Tensor, bias: Tensor | None, head: str, scale: float | Tensor) -> Tensor:
    """Linear ``f Wᵀ + b`` or cosine ``scale · cos(W, f)`` logits, ``[M, N]``."""
    if head == "cosine":
        return cosine_logits(features, weight, scale)
    return F.linear(features, weight, bias)


def fit_head(
    support: Tensor, support_y: Tensor, start: list[Tensor], head: str, scale: float | Tensor, steps: int, lr: float
) -> tuple[Tensor, Tensor | None]:
    """A ``head`` ("linear" or "cosine") fitted from ``start`` (weight, and bias for
    "linear") on frozen ``support [N*K, D]`` embeddings by ``steps`` full-batch SGD steps
    (momentum 0.9, weight decay 1e-3, as Chen et al.'s code); pure, no gradient to ``start``."""
    params = dict(zip(("weight", "bias"), (p.detach() for p in start)))
    velocity = {k: torch.zeros_like(p) for k, p in params.items()}
    support = support.detach()
    scale = scale.detach() if isinstance(scale, Tensor) else scale

    def loss(p: dict[str, Tensor]) -> Tensor:
        return F.cross_entropy(head_logits(support, p["weight"], p.get("bias"), head, scale), support_y)

    for _ in range(steps):
        _, grads = support_gradients(loss, params, create_graph=False)
        velocity = {k: 0.9 * velocity[k] + grads[k] + 1e-3 * p for k, p in params.items()}
        params = {k: p - lr * velocity[k] for k, p in params.items()}
    return params["weight"], params.get("bias")


class FineTune(MetaAlgorithm):
    """Baseline and Baseline++ (Chen, Liu, Kira, Wang & Huang, ICLR 2019, "A Closer Look at
    Few-shot Classification").

    Training is ordinary supervised learning over all training classes: every image of the
    meta-batch (support and query alike) is labelled with its split class id
    (``batch.classes``) and classified by a head over the embedding, with cross-entropy.
    The head is linear (Baseline) or cosine, ``scale · cos(w_c, f(x))`` (Baseline++).

    Testing freezes the embedding, fits a new head of the same kind on each episode's
    support embeddings by ``finetune_steps`` full-batch SGD steps (momentum 0.9, weight
    decay 1e-3, as in the authors' code; they use mini-batches of 4 for 100 epochs) from
    a fixed seeded initialisation, and scores the query set. The pre-training head is not
    used at test time, so any number of ways can be tested.

    ``query_logits`` of `meta_loss` are the pre-training logits of the episode's own N
    classes (columns ``batch.classes``), so the training accuracy is an N-way accuracy.

    Args:
        model: embedding network without a classifier head, with ``embedding_dim``.
        num_train_classes: classes of the training split (Omniglot, Vinyals split: 4112).
        head: "linear" (Baseline) or "cosine" (Baseline++).
        finetune_steps: SGD steps fitting the test head.
        finetune_lr: their step size.
        cosine_scale: the cosine head's fixed scale (the authors' code: 2 up to 200 classes,
            10 above).
    """

    needs_head = False  # it builds its own whole-class head

    tasks = ("classification",)

    def __init__(
        self,
        model: nn.Module,
        num_train_classes: int,
        head: str = "linear",
        finetune_steps: int = 100,
        finetune_lr: float = 0.01,
        cosine_scale: float = 10.0,
    ) -> None:
        super().__init__()
        embedding_network(model, "FineTune", "the algorithm owns its classifier heads")
        if head not in HEADS:
            raise ConfigError(f"algorithm.head={head!r} is not allowed: choose one of {', '.join(HEADS)}.")
        for key, value in (
            ("algorithm.num_train_classes", num_train_classes),
            ("algorithm.finetune_steps", finetune_steps),
        ):
            positive_int(key, value)
        for key, value in (("algorithm.finetune_lr", finetune_lr), ("algorithm.cosine_scale", cosine_scale)):
            positive_number(key, value)
        dim = embedding_dim(model, "FineTune")
        self.model, self.head, self.num_train_classes = model, head, num_train_classes
        self.finetune_steps, self.finetune_lr, self.cosine_scale = finetune_steps, finetune_lr, cosine_scale
        bound = 1 / math.sqrt(dim)  # nn.Linear's initialisation, from a seeded generator
        g = torch.Generator().manual_seed(0)
        self.weight = nn.Parameter((torch.rand(num_train_classes, dim, generator=g) * 2 - 1) * bound)
        self.bias = None if head == "cosine" else nn.Parameter(torch.zeros(num_train_classes))

    def pretrain_logits(self, batch: EpisodeBatch) -> tuple[Tensor, Tensor]:
        """Logits over all training classes of every image, ``[B*(NK+NQ), C]``, and labels."""
        if batch.classes is None:
            raise ConfigError(
                "dataset is not allowed for FineTune: its episodes carry no class "
                "ids (batch.classes), so use a class-indexed image dataset."
            )
        if int(batch.classes.max()) >= self.num_train_classes:
            raise ConfigError(
                f"algorithm.num_train_classes={self.num_train_classes} is not allowed: the "
                f"training split has class id {int(batch.classes.max())}, so it must be at "
                f"least {int(batch.classes.max()) + 1}."
            )
        y = torch.cat([batch.support_y, batch.query_y], 1)  # [B, NK+NQ] in 0..N-1
        labels = batch.classes.gather(1, y).flatten()  # [B*(NK+NQ)] split class ids
        z = self.embed_episodes(batch).flatten(0, 1)  # [B*(NK+NQ), D]
        return head_logits(z, self.weight, self.bias, self.head, self.cosine_scale), labels

    def meta_loss(self, batch: EpisodeBatch) -> MetaOutput:
        logits, labels = self.pretrain_logits(batch)
        loss = F.cross_entropy(logits, labels)
        b, nk = batch.support_y.shape
        nq = batch.query_y.shape[1]
        query = logits.detach().view(b, nk + nq, -1)[:, nk:]  # [B, NQ, num_train_classes]
        cols = batch.classes[:, None, :].expand(b, nq, batch.classes.shape[1])  # [B, NQ, N]
        return MetaOutput(loss, query.gather(2, cols))  # [B, NQ, N]

    def initial_head(self, dim: int, ways: int, like: Tensor) -> list[Tensor]:
        """The test head's fixed seeded starting weights (and zero bias for "linear")."""
        g = torch.Generator().manual_seed(0)
        bound = 1 / math.sqrt(dim)
        weight = (torch.rand(ways, dim, generator=g, dtype=like.dtype) * 2 - 1) * bound  # [N, D]
        weight = weight.to(like.device)
        return [weight] if self.head == "cosine" else [weight, like.new_zeros(ways)]

    def fit_head(self, support: Tensor, support_y: Tensor, start: list[Tensor]) -> tuple[Tensor, Tensor | None]:
        """A new head fitted from ``start`` on frozen ``support [N*K, D]`` embeddings (pure)."""
        return fit_head(support, support_y, start, self.head, self.cosine_scale, self.finetune_steps, self.finetune_lr)

    def predict(self, batch: EpisodeBatch) -> MetaOutput:
        nk = batch.support_y.shape[1]
        ways = int(batch.support_y.max()) + 1
        with torch.no_grad():
            z = self.embed_episodes(batch)  # [B, NK+NQ, D]
        start = self.initial_head(z.shape[-1], ways, z)

        def one_task(support: Tensor, support_y: Tensor, query: Tensor) -> Tensor:
            weight, bias = self.fit_head(support, support_y, start)
            return head_logits(query, weight, bias, self.head, self.cosine_scale)  # [NQ, N]

        with torch.enable_grad():
            logits = self.map_tasks(one_task, z[:, :nk], batch.support_y, z[:, nk:])  # [B, NQ, N]
        loss = F.cross_entropy(logits.flatten(0, 1), batch.query_y.flatten())
        return MetaOutput(loss, logits.detach())
