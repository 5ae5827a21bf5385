"""Transductive inference for the nearest-centroid learners (``algorithm.transductive``): a task's
queries are labelled together, with the unlabelled query set informing the classifier, never
its labels.

- ``bd_cspn``: prototype rectification (Liu, Song & Qin, ECCV 2020, "Prototype Rectification
  for Few-Shot Learning"). The queries are shifted by the difference of the support and query
  means (cross-class bias); each prototype becomes the weighted mean of its class's support
  features and of the queries pseudo-labelled to it, weights ``exp(ε·cos(x, P))`` normalised
  per class (intra-class bias, ε = 10); queries are scored by ``ε·cos(q, P′)``. Every query
  takes part (the paper keeps the Z most confident; Z = all, as in the common implementations).
- ``tim``: TIM-GD (Boudiaf, Masud, Rony, Dolz, Piantanida & Ben Ayed, NeurIPS 2020,
  "Information Maximization for Few-Shot Learning"). On L2-normalised features, class weights
  W start at the support means; logits ``−τ/2·‖x − w‖²`` (τ = 15); 1,000 Adam steps (lr 1e-4)
  on ``0.1·CE(support) − (H(Ŷ_Q) − 0.1·H(Ŷ_Q | X_Q))``: the support cross-entropy against
  the query predictions' mutual information (marginal entropy, conditional entropy), the
  weights and settings of the authors' code (src/tim.py, scripts/evaluate/tim_gd/).
- ``pt_map``: PT-MAP (Hu, Gripon & Pateux, ICANN 2021, "Leveraging the Feature Distribution in
  Transfer-based Few-Shot Learning"). Power transform ``(x + 1e-6)^0.5`` of the (non-negative)
  features, unit norm, the support and query sets each centred on their own mean and
  normalised again; then 20 MAP epochs: query-to-class probabilities by Sinkhorn's optimal
  transport on the squared distances (``exp(−λ·d²)``, λ = 10, every query of mass 1, every
  class M/N, to 1e-6 or 1,000 iterations), support rows one-hot, and each centre moved by
  α = 0.2 towards the probability-weighted mean (the authors' test_standard.py; their QR
  reduction is a rotation, which changes none of the distances, and is left out).

Each returns query scores ``[B, M, N]`` whose softmax is the method's class probabilities
(PT-MAP: log-probabilities). The features are the learner's evaluation features (after
``algorithm.feature_transform``), detached: the method changes labels, not the network.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from metarun.algorithms.base import MetaAlgorithm, MetaOutput, class_means
from metarun.episodes import EpisodeBatch
from metarun.errors import ConfigError

KINDS = ("none", "bd_cspn", "tim", "pt_map")
NAMES = {"bd_cspn": "BD-CSPN", "tim": "TIM-GD", "pt_map": "PT-MAP"}


def check_transductive(kind: str) -> None:
    """``algorithm.transductive`` must be one of `KINDS`."""
    if kind not in KINDS:
        raise ConfigError(f"algorithm.transductive={kind!r} is not allowed: choose one of {', '.join(KINDS)}.")


def describe(kind: str | None) -> str:
    """How a run labels its test queries: "inductive" or "transductive (TIM-GD)"."""
    return "inductive" if kind in (None, "none") else f"transductive ({NAMES[kind]})"


def cosine(x: Tensor, centres: Tensor) -> Tensor:
    """``cos(x_i, c_k)``: ``x [B, n, D]``, ``centres [B, N, D]`` -> ``[B, n, N]``."""
    return F.normalize(x, dim=-1) @ F.normalize(centres, dim=-1).transpose(1, 2)


def bd_cspn(support: Tensor, support_y: Tensor, query: Tensor, ways: int, scale: float = 10.0) -> Tensor:
    """BD-CSPN's scores ``ε·cos(q + ξ, P′) [B, M, N]`` (see the module's docstring)."""
    query = query + (support.mean(1, keepdim=True) - query.mean(1, keepdim=True))  # [B, M, D]: ξ added
    prototypes = class_means(support, support_y, ways)  # [B, N, D]
    on_support = F.one_hot(support_y, ways).to(support.dtype)  # [B, n, N]
    query_cos = cosine(query, prototypes)  # [B, M, N]
    on_query = F.one_hot(query_cos.argmax(-1), ways).to(query.dtype)  # [B, M, N]: pseudo-labels
    # exp(ε·cos), less the constant exp(ε) that the per-class normalisation removes anyway
    w_support = on_support * torch.exp(scale * (cosine(support, prototypes) - 1))  # [B, n, N]
    w_query = on_query * torch.exp(scale * (query_cos - 1))  # [B, M, N]
    total = w_support.sum(1) + w_query.sum(1)  # [B, N]
    rectified = (w_support.transpose(1, 2) @ support + w_query.transpose(1, 2) @ query) / total[..., None]
    return scale * cosine(query, rectified)  # [B, M, N]


def tim_logits(x: Tensor, weights: Tensor, temperature: float) -> Tensor:
    """TIM's classifier ``−τ/2·‖x − w‖²``: ``x [B, n, D]``, ``weights [B, N, D]`` -> ``[B, n, N]``."""
    return temperature * (
        x @ weights.transpose(1, 2) - 0.5 * weights.pow(2).sum(-1)[:, None] - 0.5 * x.pow(2).sum(-1)[..., None]
    )


def tim_loss(
    support: Tensor,
    support_y: Tensor,
    query: Tensor,
    weights: Tensor,
    temperature: float = 15.0,
    loss_weights: tuple[float, float, float] = (0.1, 1.0, 0.1),
) -> Tensor:
    """``λ·CE − (α_H·H(Ŷ_Q) − α_C·H(Ŷ_Q|X_Q))``, each term a mean within a task, summed over tasks."""
    ways = weights.shape[1]
    ce = -(F.one_hot(support_y, ways) * F.log_softmax(tim_logits(support, weights, temperature), -1)).sum(-1)
    p = tim_logits(query, weights, temperature).softmax(-1)  # [B, M, N]
    conditional = -(p * torch.log(p + 1e-12)).sum(-1).mean(1)  # [B]: H(Ŷ_Q | X_Q)
    marginal = p.mean(1)  # [B, N]
    entropy = -(marginal * torch.log(marginal + 1e-12)).sum(-1)  # [B]: H(Ŷ_Q)
    ce_weight, entropy_weight, conditional_weight = loss_weights
    return (ce_weight * ce.mean(1) - (entropy_weight * entropy - conditional_weight * conditional)).sum()


def tim(
    support: Tensor,
    support_y: Tensor,
    query: Tensor,
    ways: int,
    steps: int = 1000,
    lr: float = 1e-4,
    temperature: float = 15.0,
) -> Tensor:
    """TIM-GD's query logits ``[B, M, N]`` after ``steps`` Adam steps on the class weights."""
    support, query = F.normalize(support, dim=-1), F.normalize(query, dim=-1)
    weights = class_means(support, support_y, ways).clone().requires_grad_()  # [B, N, D]
    optimizer = torch.optim.Adam([weights], lr=lr)
    with torch.enable_grad():  # labelling runs under no_grad; the weights are fitted here
        for _ in range(steps):
            optimizer.zero_grad()
            tim_loss(support, support_y, query, weights, temperature).backward()
            optimizer.step()
    return tim_logits(query, weights.detach(), temperature)


def sinkhorn(cost: Tensor, lam: float, eps: float = 1e-6, max_iters: int = 1000) -> Tensor:
    """The entropic optimal transport plan ``[B, M, N]`` of ``cost [B, M, N]``: rows of mass 1,
    columns of mass M/N, from ``exp(−λ·cost)`` (PT-MAP's ``compute_optimal_transport``)."""
    m, n = cost.shape[1:]
    plan = torch.exp(-lam * cost)
    plan = plan / plan.sum((1, 2), keepdim=True)
    rows, columns = 1.0, m / n
    u = torch.zeros_like(plan[..., 0])
    for _ in range(max_iters):
        if (u - plan.sum(2)).abs().max() <= eps:
            break
        u = plan.sum(2)  # [B, M]
        plan = plan * (rows / u)[..., None]
        plan = plan * (columns / plan.sum(1))[:, None]
    return plan


def pt_map_features(support: Tensor, query: Tensor, beta: float = 0.5) -> tuple[Tensor, Tensor]:
    """PT-MAP's preprocessing: power transform, unit norm, each set centred on its own mean and
    normalised again. Negative features (no ReLU before the embedding) count as 0."""
    z = F.normalize((torch.cat([support, query], 1).clamp_min(0) + 1e-6).pow(beta), dim=-1)
    n = support.shape[1]
    centred = lambda x: F.normalize(x - x.mean(1, keepdim=True), dim=-1)  # noqa: E731
    return centred(z[:, :n]), centred(z[:, n:])


def pt_map(
    support: Tensor,
    support_y: Tensor,
    query: Tensor,
    ways: int,
    lam: float = 10.0,
    alpha: float = 0.2,
    epochs: int = 20,
) -> Tensor:
    """PT-MAP's query log-probabilities ``[B, M, N]`` after ``epochs`` MAP epochs."""
    support, query = pt_map_features(support, query)
    features = torch.cat([support, query], 1)  # [B, n+M, D]
    on_support = F.one_hot(support_y, ways).to(support.dtype)  # [B, n, N]
    centres = class_means(support, support_y, ways)  # [B, N, D]

    def probabilities(centres: Tensor) -> Tensor:  # [B, n+M, N]
        return torch.cat([on_support, sinkhorn(torch.cdist(query, centres).pow(2), lam)], 1)

    for _ in range(epochs):
        p = probabilities(centres)
        estimate = p.transpose(1, 2) @ features / p.sum(1)[..., None]  # [B, N, D]
        centres = centres + alpha * (estimate - centres)
    plan = probabilities(centres)[:, support.shape[1] :]  # [B, M, N]
    return torch.log((plan / plan.sum(-1, keepdim=True)).clamp_min(1e-30))


METHODS = {"bd_cspn": bd_cspn, "tim": tim, "pt_map": pt_map}


def transductive_scores(kind: str, support: Tensor, support_y: Tensor, query: Tensor, ways: int) -> Tensor:
    """The query scores ``[B, M, N]`` of method ``kind`` (not "none"), in float32 or better."""
    dtype = torch.promote_types(support.dtype, torch.float32)
    with torch.autocast(device_type=support.device.type, enabled=False):
        return METHODS[kind](support.detach().to(dtype), support_y, query.detach().to(dtype), ways)


def transductive_predictions(algorithm: MetaAlgorithm, batch: EpisodeBatch, kind: str) -> MetaOutput:
    """``algorithm``'s evaluation features of each episode, its queries labelled by method
    ``kind``; the loss (cross-entropy of the scores) is the only use of the query labels."""
    nk = batch.support_y.shape[1]
    ways = int(batch.support_y.max()) + 1
    with torch.no_grad():
        z = algorithm.embed_episodes(batch)  # [B, NK+NQ, D]
    scores = transductive_scores(kind, z[:, :nk], batch.support_y, z[:, nk:], ways)  # [B, NQ, N]
    loss = F.cross_entropy(scores.flatten(0, 1), batch.query_y.flatten())
    return MetaOutput(loss, scores)
