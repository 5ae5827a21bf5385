"""The fine-tuning baselines Baseline and Baseline++ of Chen et al. (2019)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metarun.algorithms.base import MetaAlgorithm, MetaOutput, embed_episodes
from metarun.algorithms.checks import check_positive_int
from metarun.episodes import EpisodeBatch
from metarun.errors import ConfigError

HEADS = ("linear", "cosine")


def cosine_logits(features: Tensor, weight: Tensor, scale: float) -> Tensor:
    """``scale · cos(w_c, f)`` for every class: ``features [M, D]``, ``weight [N, D]`` -> ``[M, N]``."""
    return scale * F.normalize(features, dim=-1) @ F.normalize(weight, dim=-1).T


def head_logits(features: Tensor, weight: Tensor, bias: Tensor | None, head: str,
                scale: float) -> Tensor:
    """Linear ``f Wᵀ + b`` or cosine ``scale · cos(W, f)`` logits, ``[M, N]``."""
    if head == "cosine":
        return cosine_logits(features, weight, scale)
    return F.linear(features, weight, bias)


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

    tasks = ("classification",)

    def __init__(self, model: nn.Module, num_train_classes: int, head: str = "linear",
                 finetune_steps: int = 100, finetune_lr: float = 0.01,
                 cosine_scale: float = 10.0) -> None:
        super().__init__()
        if getattr(model, "head", None) is not None:
            raise ConfigError("model.out_features is not allowed to be set for FineTune: the "
                              "algorithm owns its classifier heads, so it must be null.")
        if head not in HEADS:
            raise ConfigError(f"algorithm.head={head!r} is not allowed: choose one of "
                              f"{', '.join(HEADS)}.")
        for key, value in (("algorithm.num_train_classes", num_train_classes),
                           ("algorithm.finetune_steps", finetune_steps)):
            check_positive_int(key, value)
        for key, value in (("algorithm.finetune_lr", finetune_lr),
                           ("algorithm.cosine_scale", cosine_scale)):
            if isinstance(value, bool) or not value > 0:
                raise ConfigError(f"{key}={value!r} is not allowed: it must be positive.")
        dim = getattr(model, "embedding_dim", None)
        if not isinstance(dim, int):
            raise ConfigError("model is not allowed for FineTune: it must expose an integer "
                              "embedding_dim (e.g. model=conv4).")
        self.model, self.head, self.num_train_classes = model, head, num_train_classes
        self.finetune_steps, self.finetune_lr, self.cosine_scale = finetune_steps, finetune_lr, cosine_scale
        bound = 1 / math.sqrt(dim)  # nn.Linear's initialisation, from a seeded generator
        g = torch.Generator().manual_seed(0)
        self.weight = nn.Parameter((torch.rand(num_train_classes, dim, generator=g) * 2 - 1) * bound)
        self.bias = None if head == "cosine" else nn.Parameter(torch.zeros(num_train_classes))

    def pretrain_logits(self, batch: EpisodeBatch) -> tuple[Tensor, Tensor]:
        """Logits over all training classes of every image, ``[B*(NK+NQ), C]``, and labels."""
        if batch.classes is None:
            raise ConfigError("dataset is not allowed for FineTune: its episodes carry no class "
                              "ids (batch.classes), so use a class-indexed image dataset.")
        if int(batch.classes.max()) >= self.num_train_classes:
            raise ConfigError(
                f"algorithm.num_train_classes={self.num_train_classes} is not allowed: the "
                f"training split has class id {int(batch.classes.max())}, so it must be at "
                f"least {int(batch.classes.max()) + 1}.")
        y = torch.cat([batch.support_y, batch.query_y], 1)  # [B, NK+NQ] in 0..N-1
        labels = batch.classes.gather(1, y).flatten()  # [B*(NK+NQ)] split class ids
        z = embed_episodes(self.model, batch).flatten(0, 1)  # [B*(NK+NQ), D]
        return head_logits(z, self.weight, self.bias, self.head, self.cosine_scale), labels

    def meta_loss(self, batch: EpisodeBatch) -> MetaOutput:
        logits, labels = self.pretrain_logits(batch)
        loss = F.cross_entropy(logits, labels)
        b, nk = batch.support_y.shape
        nq = batch.query_y.shape[1]
        query = logits.detach().view(b, nk + nq, -1)[:, nk:]  # [B, NQ, num_train_classes]
        cols = batch.classes[:, None, :].expand(b, nq, batch.classes.shape[1])  # [B, NQ, N]
        return MetaOutput(loss, query.gather(2, cols))  # [B, NQ, N]

    def fit_head(self, support: Tensor, support_y: Tensor, ways: int) -> tuple[Tensor, Tensor | None]:
        """A new ``ways``-class head fitted on frozen ``support [N*K, D]`` embeddings (pure)."""
        dim = support.shape[1]
        g = torch.Generator().manual_seed(0)
        bound = 1 / math.sqrt(dim)
        weight = (torch.rand(ways, dim, generator=g, dtype=support.dtype) * 2 - 1) * bound  # [N, D]
        weight = weight.to(support.device)
        params = [weight] if self.head == "cosine" else [weight, support.new_zeros(ways)]
        velocity = [torch.zeros_like(p) for p in params]
        support = support.detach()
        with torch.enable_grad():
            for _ in range(self.finetune_steps):
                params = [p.detach().requires_grad_() for p in params]
                bias = None if self.head == "cosine" else params[1]
                loss = F.cross_entropy(head_logits(support, params[0], bias, self.head,
                                                   self.cosine_scale), support_y)
                grads = torch.autograd.grad(loss, params)
                velocity = [0.9 * v + g_ + 1e-3 * p.detach() for v, g_, p in zip(velocity, grads, params)]
                params = [p.detach() - self.finetune_lr * v for p, v in zip(params, velocity)]
        return params[0], (None if self.head == "cosine" else params[1])

    def predict(self, batch: EpisodeBatch) -> MetaOutput:
        b, nk = batch.support_y.shape
        nq = batch.query_y.shape[1]
        ways = int(batch.support_y.max()) + 1
        with torch.no_grad():
            z = embed_episodes(self.model, batch).view(b, nk + nq, -1)  # [B, NK+NQ, D]
        logits = []
        for i in range(b):
            weight, bias = self.fit_head(z[i, :nk], batch.support_y[i], ways)
            logits.append(head_logits(z[i, nk:], weight, bias, self.head, self.cosine_scale))  # [NQ, N]
        logits = torch.stack(logits)  # [B, NQ, N]
        loss = F.cross_entropy(logits.flatten(0, 1), batch.query_y.flatten())
        return MetaOutput(loss, logits)
