"""A parameter-generating learner: an MLP maps each class's support embeddings to its classifier weights."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metarun.algorithms.base import MetaAlgorithm, MetaOutput, class_means, embedding_dim, embedding_network
from metarun.algorithms.finetune import cosine_logits, fit_head
from metarun.checks import integer_at_least, positive_number
from metarun.episodes import EpisodeBatch


class WeightGenerator(MetaAlgorithm):
    """Classifier weights generated from the support set (Qiao, Liu, Shen & Yuille, CVPR 2018,
    "Few-Shot Image Recognition by Predicting Parameters from Activations"; Gidaris & Komodakis,
    CVPR 2018, "Dynamic Few-Shot Visual Learning without Forgetting").

    For each class n the normalised mean support embedding ``μ̂_n`` is mapped to that class's
    weight vector ``w_n = a ⊙ μ̂_n + g(μ̂_n)``, ``a`` a learned per-feature scale (starting at
    1) and ``g`` an MLP whose last layer starts at zero, so an untrained generator is the
    cosine nearest-centroid classifier. Queries are scored by a cosine classifier with a
    learned scale, ``τ · cos(f(q), w_n)``. Meta-training on episodes learns ``a``, ``g``, ``τ``
    and (unless ``freeze_backbone``) the backbone, usually started from a whole-class
    pre-training run (``model.init_from``; the papers freeze it, as ``freeze_backbone=true``).
    At test time the generated classifier can be fine-tuned on the support set
    (``finetune_steps`` SGD steps on frozen features) before it labels the queries.

    Args:
        model: embedding network without a classifier head, with ``embedding_dim``.
        hidden: the MLP's hidden width (0: no MLP, ``w_n = a ⊙ μ̂_n``).
        temperature: τ's starting value.
        freeze_backbone: keep the backbone's weights fixed during meta-training.
        finetune_steps: SGD steps fitting the generated classifier on each test support set.
        finetune_lr: their step size.
    """

    needs_head = False
    tasks = ("classification",)

    def __init__(
        self,
        model: nn.Module,
        hidden: int = 512,
        temperature: float = 10.0,
        freeze_backbone: bool = False,
        finetune_steps: int = 0,
        finetune_lr: float = 0.01,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        self.model = embedding_network(model, name, "the learner generates its own classifier")
        dim = embedding_dim(model, name)
        integer_at_least("algorithm.hidden", hidden, 0)
        integer_at_least("algorithm.finetune_steps", finetune_steps, 0)
        positive_number("algorithm.temperature", temperature)
        positive_number("algorithm.finetune_lr", finetune_lr)
        self.scale = nn.Parameter(torch.ones(dim))  # a
        self.generator = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, dim)) if hidden else None
        if self.generator is not None:
            g = torch.Generator().manual_seed(0)  # seeded, independent of the global RNG
            first = self.generator[0]
            bound = 1 / dim**0.5
            with torch.no_grad():
                first.weight.copy_((torch.rand(hidden, dim, generator=g) * 2 - 1) * bound)
                first.bias.zero_()
                nn.init.zeros_(self.generator[2].weight)
                nn.init.zeros_(self.generator[2].bias)
        self.temperature = nn.Parameter(torch.tensor(float(temperature)))
        self.freeze_backbone = bool(freeze_backbone)
        if self.freeze_backbone:
            self.model.requires_grad_(False)
        self.finetune_steps, self.finetune_lr = finetune_steps, finetune_lr

    def generate(self, support: Tensor, support_y: Tensor, ways: int) -> Tensor:
        """Classifier weights ``[B, N, D]`` from ``support [B, N*K, D]`` embeddings."""
        means = F.normalize(class_means(support, support_y, ways), dim=-1)  # [B, N, D]
        weights = self.scale * means
        return weights if self.generator is None else weights + self.generator(means)

    def _logits(self, batch: EpisodeBatch, finetune: bool) -> Tensor:
        nk = batch.support_y.shape[1]
        ways = int(batch.support_y.max()) + 1
        z = self.embed_episodes(batch)  # [B, NK+NQ, D]
        if self.freeze_backbone:
            z = z.detach()
        weights = self.generate(z[:, :nk], batch.support_y, ways)  # [B, N, D]
        if not (finetune and self.finetune_steps):
            return self.temperature * F.normalize(z[:, nk:], dim=-1) @ F.normalize(weights, dim=-1).transpose(1, 2)

        def one_task(support: Tensor, support_y: Tensor, query: Tensor, start: Tensor) -> Tensor:
            weight, _ = fit_head(
                support, support_y, [start], "cosine", self.temperature, self.finetune_steps, self.finetune_lr
            )
            return cosine_logits(query, weight, self.temperature.detach())  # [NQ, N]

        with torch.enable_grad():
            return self.map_tasks(one_task, z[:, :nk], batch.support_y, z[:, nk:], weights)  # [B, NQ, N]

    def meta_loss(self, batch: EpisodeBatch) -> MetaOutput:
        logits = self._logits(batch, finetune=False)  # [B, NQ, N]
        loss = F.cross_entropy(logits.flatten(0, 1), batch.query_y.flatten())
        return MetaOutput(loss, logits.detach())

    def predict(self, batch: EpisodeBatch) -> MetaOutput:
        logits = self._logits(batch, finetune=True)  # [B, NQ, N]
        loss = F.cross_entropy(logits.flatten(0, 1), batch.query_y.flatten())
        return MetaOutput(loss, logits.detach())
