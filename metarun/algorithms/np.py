"""Latent-variable Neural Processes for few-shot regression."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from metarun.algorithms.base import MetaAlgorithm, MetaOutput
from metarun.algorithms.cnp import check_regression, check_sizes, decode, gaussian_log_prob, linear_sizes
from metarun.checks import positive_int
from metarun.episodes import EpisodeBatch, task_generator
from metarun.errors import ConfigError

# Streams of the latent-noise generators, apart from the sampler's 0 (train), 1, 2 (val, test).
TRAIN_NOISE, EVAL_NOISE = 20, 21


def kl_diagonal_gaussians(mean_q: Tensor, std_q: Tensor, mean_p: Tensor, std_p: Tensor) -> Tensor:
    """KL(N(mean_q, diag std_q²) ‖ N(mean_p, diag std_p²)), summed over the last axis.

    Σ_d log(σp/σq) + (σq² + (μq − μp)²) / (2σp²) − ½.
    """
    return (std_p.log() - std_q.log() + (std_q.pow(2) + (mean_q - mean_p).pow(2)) / (2 * std_p.pow(2)) - 0.5).sum(-1)


def task_noise(seed: int, stream: int, step: int, index: Tensor, shape: tuple[int, ...], like: Tensor) -> Tensor:
    """Standard normal noise ``[B, *shape]``, each task's from its own seeded generator.

    Task ``index[i]`` draws the same noise whichever process or batch position holds it.
    """
    eps = [torch.randn(shape, generator=task_generator(seed, stream, step, int(i)), dtype=like.dtype) for i in index]
    return torch.stack(eps).to(like.device)  # [B, *shape]


class NeuralProcess(MetaAlgorithm):
    """Neural Process (Garnelo et al. 2018, "Neural Processes", ICML workshop).

    A global latent variable z describes the task's function. The latent encoder maps each
    pair (x, y) to s_i; their mean s gives q(z | pairs) = N(μ(s), diag σ(s)²), with
    σ = 0.1 + 0.9·sigmoid(raw) (DeepMind's reference implementation). The decoder maps
    [r, z, x_target] to a Gaussian mean and std = min_std + (1 − min_std)·softplus(raw), where
    r is an optional deterministic path (the mean of a second encoder over the context, as
    in the Attentive NP paper's baseline; the original NP has none).

    Training maximises the ELBO with the targets T = support ∪ query and the context C =
    support (context ⊂ target, as in the paper):
    E_{q(z|T)}[Σ_T log p(y | z, x)] − KL(q(z|T) ‖ q(z|C)), divided by |T|, with one
    reparameterised sample z = μ + σ·ε whose ε comes from a generator seeded by (seed,
    update count, task index), never the global RNG. At test the context is the support
    set: ``query_logits`` is the predictive mean E_z[mean(z, x)] over ``test_samples``
    draws z ~ q(z|C), and ``extra["log_likelihood"] [B]`` the Monte Carlo estimate
    (1/Q) log (1/S) Σ_s Π_q p(y_q | z_s, x_q) per task (z is shared by a task's targets).

    Args:
        model: the decoder, [r, z, x] -> [mean, raw std] (2·y_dim outputs); the model
            group's MLP, sized by conf/algorithm/np.yaml.
        latent_encoder: [x, y] -> s (2·latent_dim outputs: the mean and raw std of z).
        latent_dim: size of z.
        deterministic_encoder: [x, y] -> r, or None for the latent path only (the paper).
        x_dim, y_dim: input and output dimensions of a task's function.
        min_std: lower bound of the decoder's std (0.1, as in the CNP).
        test_samples: S, latent samples per task at validation/test.
        seed: seeds the latent noise.
    """

    tasks = ("regression",)

    def __init__(
        self,
        model: nn.Module,
        latent_encoder: nn.Module,
        latent_dim: int,
        deterministic_encoder: nn.Module | None = None,
        x_dim: int = 1,
        y_dim: int = 1,
        min_std: float = 0.1,
        test_samples: int = 32,
        seed: int = 0,
    ) -> None:
        super().__init__()
        for key, value in (
            ("algorithm.latent_dim", latent_dim),
            ("algorithm.x_dim", x_dim),
            ("algorithm.y_dim", y_dim),
            ("algorithm.test_samples", test_samples),
        ):
            positive_int(key, value)
        if not 0 <= min_std < 1:
            raise ConfigError(f"algorithm.min_std={min_std!r} is not allowed: it must be in [0, 1).")
        pairs = "the encoders read (x, y) pairs of algorithm.x_dim + algorithm.y_dim numbers"
        check_sizes(
            latent_encoder,
            "algorithm.latent_encoder",
            x_dim + y_dim,
            2 * latent_dim,
            pairs,
            "it gives the mean and raw std of z, twice algorithm.latent_dim",
        )
        decoder_in: int | None = latent_dim + x_dim
        if deterministic_encoder is not None:
            check_sizes(deterministic_encoder, "algorithm.deterministic_encoder", x_dim + y_dim, None, pairs, "")
            det = linear_sizes(deterministic_encoder)
            decoder_in = None if det is None else det[1] + latent_dim + x_dim
        check_sizes(
            model,
            "model",
            decoder_in,
            2 * y_dim,
            "the decoder reads [r, z, x]: the deterministic encoder's out_features "
            "(if any) + algorithm.latent_dim + algorithm.x_dim",
            "the decoder outputs a mean and a std for each of algorithm.y_dim outputs",
        )
        self.model, self.latent_encoder = model, latent_encoder
        self.deterministic_encoder = deterministic_encoder
        self.latent_dim, self.x_dim, self.y_dim = latent_dim, x_dim, y_dim
        self.min_std, self.test_samples, self.seed = min_std, test_samples, seed
        # outer updates so far: with the task index it seeds the training noise, and it is
        # saved in checkpoints, so a resumed run draws what an uninterrupted one would
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))

    def end_outer_step(self) -> None:
        self.updates += 1

    def check_episode_shape(self, train_ways: int, ways: int) -> None:
        check_regression("NeuralProcess", train_ways, ways)

    def latent(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and std ``[B, L]`` of q(z | pairs) from ``x [B, M, Dx]``, ``y [B, M, Dy]``."""
        s = self.latent_encoder(torch.cat([x, y], -1)).mean(1)  # [B, M, 2L] -> [B, 2L]
        mean, raw = s.chunk(2, -1)  # [B, L] each
        return mean, 0.1 + 0.9 * torch.sigmoid(raw)

    def representation(self, batch: EpisodeBatch, z: Tensor) -> Tensor:
        """The decoder's task input [r, z]: ``z [B, L]`` -> ``[B, R+L]``, ``[B, S, L]`` ->
        ``[B, S, R+L]`` (r, the deterministic path, sees the context only)."""
        if self.deterministic_encoder is None:
            return z
        pairs = torch.cat([batch.support_x, batch.support_y], -1)  # [B, K, Dx+Dy]
        r = self.deterministic_encoder(pairs).mean(1)  # [B, R]
        if z.dim() == 3:
            r = r[:, None].expand(-1, z.shape[1], -1)  # [B, S, R]
        return torch.cat([r, z], -1)

    def meta_loss(self, batch: EpisodeBatch) -> MetaOutput:
        target_x = torch.cat([batch.support_x, batch.query_x], 1)  # [B, K+Q, Dx]
        target_y = torch.cat([batch.support_y, batch.query_y], 1)  # [B, K+Q, Dy]
        prior_mean, prior_std = self.latent(batch.support_x, batch.support_y)  # [B, L] each
        post_mean, post_std = self.latent(target_x, target_y)  # [B, L] each
        eps = task_noise(
            self.seed, TRAIN_NOISE, int(self.updates), batch.index, (self.latent_dim,), post_mean
        )  # [B, L]
        z = post_mean + post_std * eps  # [B, L], reparameterised
        mean, std = decode(self.model, self.representation(batch, z), target_x, self.min_std)
        log_lik = gaussian_log_prob(target_y, mean, std).sum(1)  # [B]
        kl = kl_diagonal_gaussians(post_mean, post_std, prior_mean, prior_std)  # [B]
        elbo = (log_lik - kl) / target_x.shape[1]  # [B], per target point
        with torch.no_grad():  # the metric's prediction sees the context only: z = E[q(z|C)]
            pred, _ = decode(
                self.model, self.representation(batch, prior_mean), batch.query_x, self.min_std
            )  # [B, Q, Dy]
        return MetaOutput(-elbo.mean(), pred, extra={"elbo": elbo.detach(), "kl": kl.detach()})

    def predict(self, batch: EpisodeBatch) -> MetaOutput:
        b, q = batch.query_x.shape[:2]
        s = self.test_samples
        with torch.no_grad():
            prior_mean, prior_std = self.latent(batch.support_x, batch.support_y)  # [B, L] each
            eps = task_noise(self.seed, EVAL_NOISE, 0, batch.index, (s, self.latent_dim), prior_mean)  # [B, S, L]
            z = prior_mean[:, None] + prior_std[:, None] * eps  # [B, S, L]
            rep = self.representation(batch, z).flatten(0, 1)  # [B*S, R+L]
            x = batch.query_x[:, None].expand(-1, s, -1, -1).flatten(0, 1)  # [B*S, Q, Dx]
            mean, std = decode(self.model, rep, x, self.min_std)  # [B*S, Q, Dy] each
            mean, std = mean.view(b, s, q, -1), std.view(b, s, q, -1)  # [B, S, Q, Dy]
            joint = gaussian_log_prob(batch.query_y[:, None], mean, std).sum(-1)  # [B, S]
            log_lik = (torch.logsumexp(joint, 1) - math.log(s)) / q  # [B]
        # the mixture over the S latent draws: E[y] = E[μ], Var[y] = E[σ²] + Var[μ]
        spread = (std.pow(2).mean(1) + mean.var(1, unbiased=False)).sqrt()  # [B, Q, Dy]
        return MetaOutput(-log_lik.mean(), mean.mean(1), extra={"log_likelihood": log_lik}, query_std=spread)
