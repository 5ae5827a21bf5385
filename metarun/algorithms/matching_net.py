"""Matching Networks."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metarun.algorithms.base import MetaAlgorithm, MetaOutput, embedding_network
from metarun.checks import positive_int, positive_number
from metarun.episodes import EpisodeBatch
from metarun.errors import ConfigError


def cosine_attention_log_probs(
    support: Tensor, support_y: Tensor, query: Tensor, ways: int, scale: float = 1.0
) -> Tensor:
    """Log of the attention-weighted support label distribution (Vinyals et al. 2016, eq. 1-2).

    a(x̂, x_i) = softmax_i(s · cos(f(x̂), g(x_i))) and P(y = c | x̂, S) = Σ_{i: y_i = c} a(x̂, x_i);
    the paper's attention is s = 1.
    The log is taken as ``logsumexp_{i: y_i = c} cos_i − logsumexp_i cos_i``, which equals
    log P exactly and never takes the log of an underflowed probability (no clamp needed).

    ``support [S, D]``, ``support_y [S]``, ``query [M, D]`` -> ``[M, N]``.
    """
    cos = scale * (F.normalize(query, dim=-1) @ F.normalize(support, dim=-1).T)  # [M, S]
    onehot = F.one_hot(support_y, ways).to(cos.dtype)  # [S, N]
    masked = cos[:, :, None] + onehot.log()[None]  # [M, S, N]; −inf where y_i != c
    return masked.logsumexp(1) - cos.logsumexp(1, keepdim=True)  # [M, N]


class FullContextEmbedding(nn.Module):
    """The full context embeddings of Vinyals et al. 2016, appendix A.

    Support: g(x_i, S) = h→_i + h←_i + g′(x_i), a bidirectional LSTM over the support
    embeddings g′ in the episode's order. Query: f(x̂, S) = attLSTM(f′(x̂), g(S), K):

        r_{k−1} = Σ_i softmax_i(h_{k−1}ᵀ g(x_i)) g(x_i)
        ĥ_k, c_k = LSTM(f′(x̂), [h_{k−1}, r_{k−1}], c_{k−1}),   h_k = ĥ_k + f′(x̂)

    The paper puts r in the LSTM's hidden state; an LSTM's gates are linear in
    [input, hidden], so feeding [f′(x̂), r_{k−1}] as input with hidden h_{k−1} computes the
    same gates and keeps ĥ_k of size D. Not stated in the paper (our choice): h_0 = f′(x̂)
    (that is, ĥ_0 = 0) and c_0 = 0.

    Args:
        dim: D, the embedding size.
        lstm_layers: layers of the bidirectional support LSTM.
        steps: K, the processing steps of the attention LSTM.
    """

    def __init__(self, dim: int, lstm_layers: int, steps: int) -> None:
        super().__init__()
        self.support_lstm = nn.LSTM(dim, dim, num_layers=lstm_layers, bidirectional=True, batch_first=True)
        self.query_cell = nn.LSTMCell(2 * dim, dim)
        self.steps = steps

    def embed_support(self, g: Tensor) -> Tensor:
        """``g′ [S, D]`` -> ``g(x_i, S) [S, D]``."""
        out, _ = self.support_lstm(g[None])  # [1, S, 2D]: forward and backward states
        forward, backward = out[0].chunk(2, -1)  # [S, D] each
        return g + forward + backward

    def embed_query(self, f: Tensor, g: Tensor) -> Tensor:
        """``f′ [M, D]`` attending over ``g(S) [S, D]`` -> ``f(x̂, S) [M, D]``."""
        h, c = f, torch.zeros_like(f)  # [M, D]
        for _ in range(self.steps):
            readout = F.softmax(h @ g.T, -1) @ g  # [M, D]
            h_hat, c = self.query_cell(torch.cat([f, readout], -1), (h, c))  # [M, D]
            h = h_hat + f
        return h


class MatchingNet(MetaAlgorithm):
    """Matching Networks (Vinyals, Blundell, Lillicrap, Kavukcuoglu & Wierstra, NeurIPS 2016).

    A query is labelled by attention over the support set: a softmax over the cosine
    similarities between its embedding and each support embedding weights the support
    one-hot labels. The loss is the negative log-likelihood of the query labels under that
    distribution; ``query_logits`` are its log-probabilities (a softmax gives it back).
    There is no inner loop and no head, so any number of ways can be tested.

    Args:
        model: embedding network f′ = g′ (no classifier head).
        fce: use the full context embeddings (`FullContextEmbedding`); the model must
            expose ``embedding_dim``. Vinyals et al. use FCE for mini-ImageNet, not Omniglot.
        fce_lstm_layers: layers of the bidirectional support LSTM (FCE only).
        attention_steps: K, processing steps of the query attention LSTM (FCE only; the
            paper does not state K).
        cosine_scale: s, multiplying the cosines before the attention softmax. The paper's
            is 1; with non-negative embeddings (Conv4 ends in a ReLU) the loss of a query
            is then at least log(1 + (N − 1)/e), and a larger s lowers that floor to
            log(1 + (N − 1)e^{−s}) (not in the paper).
    """

    needs_head = False

    tasks = ("classification",)

    def __init__(
        self,
        model: nn.Module,
        fce: bool = False,
        fce_lstm_layers: int = 1,
        attention_steps: int = 2,
        cosine_scale: float = 1.0,
    ) -> None:
        super().__init__()
        embedding_network(model, "MatchingNet")
        positive_int("algorithm.fce_lstm_layers", fce_lstm_layers)
        positive_int("algorithm.attention_steps", attention_steps)
        positive_number("algorithm.cosine_scale", cosine_scale)
        self.model, self.cosine_scale = model, float(cosine_scale)
        self.fce: FullContextEmbedding | None = None
        if fce:
            dim = getattr(model, "embedding_dim", None)
            if not isinstance(dim, int):
                raise ConfigError(
                    f"algorithm.fce=true is not allowed with {type(model).__name__}: "
                    f"the full context embeddings need a model with an integer "
                    f"embedding_dim, such as Conv4."
                )
            self.fce = FullContextEmbedding(dim, fce_lstm_layers, attention_steps)

    def vmap_refusal(self) -> str | None:
        if self.fce is not None:
            return (
                "the full context embeddings run PyTorch's LSTM, which vmap cannot batch, "
                "so use task_batching=loop or algorithm.fce=false"
            )
        return super().vmap_refusal()

    def _task_log_probs(self, support_x: Tensor, support_y: Tensor, query_x: Tensor, ways: int) -> Tensor:
        """One episode (its own batch-norm batch) -> ``[N*Q, N]`` log-probabilities."""
        nk = support_y.shape[0]
        z = self.model(torch.cat([support_x, query_x]))  # [NK+NQ, D]
        z = z.flatten(1)  # [NK+NQ, D]
        g, f = z[:nk], z[nk:]  # [NK, D], [NQ, D]
        if self.fce is not None:
            g = self.fce.embed_support(g)  # [NK, D]
            f = self.fce.embed_query(f, g)  # [NQ, D]
        return cosine_attention_log_probs(g, support_y, f, ways, self.cosine_scale)  # [NQ, N]

    def meta_loss(self, batch: EpisodeBatch) -> MetaOutput:
        ways = int(batch.support_y.max()) + 1
        log_probs = self.map_tasks(  # [B, NQ, N]
            lambda sx, sy, qx: self._task_log_probs(sx, sy, qx, ways), batch.support_x, batch.support_y, batch.query_x
        )
        loss = F.nll_loss(log_probs.flatten(0, 1), batch.query_y.flatten())
        return MetaOutput(loss, log_probs.detach())

    def predict(self, batch: EpisodeBatch) -> MetaOutput:
        return self.meta_loss(batch)
