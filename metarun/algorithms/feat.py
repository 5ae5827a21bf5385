"""FEAT: class prototypes adapted to their task by a set-to-set Transformer."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metarun.algorithms.base import MetaAlgorithm, MetaOutput, class_means, embedding_dim, embedding_network
from metarun.checks import number_in, positive_number
from metarun.episodes import TRAIN, EpisodeBatch, task_generator
from metarun.errors import ConfigError

STREAM = TRAIN + 10  # the dropout masks' generator stream, apart from the episodes' own draws


def dropped(x: Tensor, rate: float, generators: list[torch.Generator] | None) -> Tensor:
    """Dropout of ``x [B, ...]`` with task ``b``'s mask from ``generators[b]`` (None: no dropout)."""
    if generators is None or rate == 0:
        return x
    keep = torch.stack([torch.rand(x.shape[1:], generator=g) >= rate for g in generators])  # [B, ...]
    return x * keep.to(device=x.device, dtype=x.dtype) / (1 - rate)


class SetAttention(nn.Module):
    """FEAT's set-to-set function: one single-head Transformer layer over a set ``[B, S, D]``,
    ``LayerNorm(x + drop(W_o · drop(softmax(QKᵀ/√D)) V))`` with ``Q, K, V = x W_q, x W_k, x W_v``
    (no position: permuting the set permutes the output). Initialised as the authors' code."""

    def __init__(self, dim: int, dropout: float, attention_dropout: float) -> None:
        super().__init__()
        self.query, self.key, self.value = (nn.Linear(dim, dim, bias=False) for _ in range(3))
        for layer in (self.query, self.key, self.value):
            nn.init.normal_(layer.weight, std=math.sqrt(2.0 / (2 * dim)))
        self.out = nn.Linear(dim, dim)
        nn.init.xavier_normal_(self.out.weight)
        self.norm = nn.LayerNorm(dim)
        self.dropout, self.attention_dropout = dropout, attention_dropout

    def forward(self, x: Tensor, generators: list[torch.Generator] | None = None) -> Tensor:
        scores = self.query(x) @ self.key(x).transpose(1, 2) / math.sqrt(x.shape[-1])  # [B, S, S]
        attention = dropped(scores.softmax(-1), self.attention_dropout, generators)
        return self.norm(x + dropped(self.out(attention @ self.value(x)), self.dropout, generators))  # [B, S, D]


class FEAT(MetaAlgorithm):
    """FEAT (Ye, Hu, Zhan & Sha, CVPR 2020, "Few-Shot Learning via Embedding Adaptation with
    Set-to-Set Functions").

    Each task's class prototypes (mean support embeddings) are adapted together by a
    Transformer (`SetAttention`), so each depends on the others; a query is scored by
    ``−‖f(q) − ψ(c)_n‖² / temperature``. In training a contrastive regulariser is added,
    weighted by ``balance``: each class's support and query embeddings, as one set, go through
    the same Transformer, and every embedding is classified against the adapted sets' centres
    (``−‖f(x) − centre_n‖² / contrastive_temperature``). The paper starts from a pre-trained
    backbone (``model.init_from=<an algorithm=pretrain run>``); without it, it trains from scratch.

    Dropout masks come from task generators keyed by (``seed``, outer step, episode index), so
    they do not depend on how a meta-batch is split over chunks or DDP processes, and the step
    counter is saved with the weights.

    Args:
        model: embedding network (no classifier head) with ``embedding_dim``.
        temperature: the logits' divisor (the authors' ResNet-12 runs: 64).
        balance: the regulariser's weight (theirs: 0.01 for 1-shot, 0.1 for 5-shot).
        contrastive_temperature: the regulariser's divisor (theirs: 64 for 1-shot, 32 for 5-shot).
        dropout, attention_dropout: the Transformer's dropout rates (theirs: 0.5 and 0.1).
        seed: seeds the dropout masks.
    """

    needs_head = False
    tasks = ("classification",)

    def __init__(
        self,
        model: nn.Module,
        temperature: float = 64.0,
        balance: float = 0.01,
        contrastive_temperature: float = 64.0,
        dropout: float = 0.5,
        attention_dropout: float = 0.1,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.model = embedding_network(model, "FEAT")
        positive_number("algorithm.temperature", temperature)
        positive_number("algorithm.contrastive_temperature", contrastive_temperature)
        number_in("algorithm.balance", balance, 0)
        number_in("algorithm.dropout", dropout, 0, 1)
        number_in("algorithm.attention_dropout", attention_dropout, 0, 1)
        self.temperature, self.balance, self.contrastive_temperature = temperature, balance, contrastive_temperature
        self.attention = SetAttention(embedding_dim(model, "FEAT"), dropout, attention_dropout)
        self.seed = seed
        self.register_buffer("outer_step", torch.tensor(0))

    def end_outer_step(self) -> None:
        self.outer_step.add_(1)

    def check_variable_episodes(self, min_ways: int, max_ways: int) -> None:
        if self.balance > 0:
            raise ConfigError(
                f"algorithm.balance={self.balance} is not allowed with sampler=variable: FEAT's contrastive "
                f"term splits each class's support and query images into sets of one size, which "
                f"class-imbalanced supports do not have, so set algorithm.balance=0."
            )

    def generators(self, batch: EpisodeBatch) -> list[torch.Generator] | None:
        """Each task's dropout generator in training; None (no dropout) otherwise."""
        if not self.training:
            return None
        step = int(self.outer_step)
        return [task_generator(self.seed, STREAM, step, int(i)) for i in batch.index]

    def meta_loss(self, batch: EpisodeBatch) -> MetaOutput:
        b, nk = batch.support_y.shape
        ways = int(batch.support_y.max()) + 1
        z = self.embed_episodes(batch)  # [B, NK+NQ, D]
        generators = self.generators(batch)
        prototypes = self.attention(class_means(z[:, :nk], batch.support_y, ways), generators)  # [B, N, D]
        logits = -torch.cdist(z[:, nk:], prototypes).pow(2) / self.temperature  # [B, NQ, N]
        loss = F.cross_entropy(logits.flatten(0, 1), batch.query_y.flatten())
        if self.training and self.balance > 0:
            loss = loss + self.balance * self.contrastive_loss(z, batch, ways, generators)
        return MetaOutput(loss, logits.detach())

    def contrastive_loss(
        self, z: Tensor, batch: EpisodeBatch, ways: int, generators: list[torch.Generator] | None
    ) -> Tensor:
        """FEAT's regulariser: every embedding against the centres of its task's classes, each
        class's embeddings (support and query) adapted as one set."""
        labels = torch.cat([batch.support_y, batch.query_y], 1)  # [B, NK+NQ]
        order = labels.argsort(dim=1, stable=True)  # the embeddings grouped by class
        b, m, d = z.shape
        grouped = torch.gather(z, 1, order[..., None].expand(-1, -1, d)).reshape(b * ways, m // ways, d)
        sets = generators and [g for g in generators for _ in range(ways)]  # a task's classes share its generator
        centres = self.attention(grouped, sets).mean(1).reshape(b, ways, d)  # [B, N, D]
        logits = -torch.cdist(z, centres).pow(2) / self.contrastive_temperature  # [B, NK+NQ, N]
        return F.cross_entropy(logits.flatten(0, 1), labels.flatten())

    def predict(self, batch: EpisodeBatch) -> MetaOutput:
        return self.meta_loss(batch)
