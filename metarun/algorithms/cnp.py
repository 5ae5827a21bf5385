"""Conditional Neural Processes for few-shot regression."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metarun.algorithms.base import MetaAlgorithm, MetaOutput
from metarun.checks import positive_int
from metarun.episodes import EpisodeBatch
from metarun.errors import ConfigError


def linear_sizes(module: nn.Module) -> tuple[int, int] | None:
    """(in_features of the first, out_features of the last) `nn.Linear`, or None if none."""
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    return (linears[0].in_features, linears[-1].out_features) if linears else None


def check_sizes(
    module: nn.Module, key: str, inputs: int | None, outputs: int | None, why_in: str, why_out: str
) -> None:
    """Raise `ConfigError` naming ``key`` if an MLP-like module has the wrong widths."""
    sizes = linear_sizes(module)
    if sizes is None:
        return
    if inputs is not None and sizes[0] != inputs:
        raise ConfigError(f"{key}.in_features={sizes[0]} is not allowed: {why_in}, so it must be {inputs}.")
    if outputs is not None and sizes[1] != outputs:
        raise ConfigError(f"{key}.out_features={sizes[1]} is not allowed: {why_out}, so it must be {outputs}.")


def check_regression(name: str, train_ways: int, ways: int) -> None:
    for key, value in (("sampler.ways", ways), ("sampler.train_ways", train_ways)):
        if value != 1:
            raise ConfigError(
                f"{key}={value} is not allowed for {name}: it models one function "
                f"per task (a regression dataset such as dataset=sinusoid), so "
                f"it must be 1."
            )


def gaussian_log_prob(y: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """log N(y; mean, std²) summed over the output dimension: ``[..., D]`` -> ``[...]``."""
    z = (y - mean) / std
    return (-0.5 * z.pow(2) - std.log() - 0.5 * math.log(2 * math.pi)).sum(-1)


def decode(decoder: nn.Module, representation: Tensor, x: Tensor, min_std: float) -> tuple[Tensor, Tensor]:
    """Mean and std at targets ``x [B, T, Dx]`` given one representation ``[B, R]`` per task.

    std = min_std + (1 − min_std)·softplus(raw) (Garnelo et al. 2018: 0.1 + 0.9·softplus).
    """
    r = representation[:, None].expand(-1, x.shape[1], -1)  # [B, T, R]
    out = decoder(torch.cat([r, x], -1))  # [B, T, 2*Dy]
    mean, raw = out.chunk(2, -1)  # [B, T, Dy] each
    return mean, min_std + (1 - min_std) * F.softplus(raw)


class CNP(MetaAlgorithm):
    """Conditional Neural Process (Garnelo et al., ICML 2018, "Conditional Neural Processes").

    An encoder MLP maps each context pair (x, y) to r_i; the task representation is their
    mean r = (1/K)Σ r_i (order-invariant); the decoder maps (r, x_target) to a Gaussian
    predictive mean and std, std = 0.1 + 0.9·softplus(raw). Training minimises the negative
    mean Gaussian log-likelihood of the target ys. Context = the support set; in training
    the targets are support ∪ query (the paper's context ⊂ target), at test the query set.
    No inner loop: a task is "adapted to" by one forward pass of its context.

    ``query_logits`` are the predicted means ``[B, Q, Dy]`` (the module reports their MSE);
    ``extra["log_likelihood"] [B]`` is each task's mean predictive log-likelihood per
    target point.

    Args:
        model: the decoder, [r, x] (R + x_dim inputs) -> [mean, raw std] (2·y_dim outputs);
            the model group's MLP, sized by conf/algorithm/cnp.yaml.
        encoder: [x, y] (x_dim + y_dim inputs) -> r (R outputs).
        x_dim, y_dim: input and output dimensions of a task's function.
        min_std: lower bound of the predicted std (the paper: 0.1).
    """

    tasks = ("regression",)

    def __init__(
        self,
        model: nn.Module,
        encoder: nn.Module,
        x_dim: int = 1,
        y_dim: int = 1,
        min_std: float = 0.1,
    ) -> None:
        super().__init__()
        for key, value in (("algorithm.x_dim", x_dim), ("algorithm.y_dim", y_dim)):
            positive_int(key, value)
        if not 0 <= min_std < 1:
            raise ConfigError(f"algorithm.min_std={min_std!r} is not allowed: it must be in [0, 1).")
        enc = linear_sizes(encoder)
        check_sizes(
            encoder,
            "algorithm.encoder",
            x_dim + y_dim,
            None,
            "the encoder reads (x, y) pairs of algorithm.x_dim + algorithm.y_dim numbers",
            "",
        )
        check_sizes(
            model,
            "model",
            None if enc is None else enc[1] + x_dim,
            2 * y_dim,
            "the decoder reads [r, x]: algorithm.encoder.out_features + algorithm.x_dim",
            "the decoder outputs a mean and a std for each of algorithm.y_dim outputs",
        )
        self.model, self.encoder = model, encoder
        self.x_dim, self.y_dim, self.min_std = x_dim, y_dim, min_std

    def check_episode_shape(self, train_ways: int, ways: int) -> None:
        check_regression("CNP", train_ways, ways)

    def represent(self, x: Tensor, y: Tensor) -> Tensor:
        """r = mean_i encoder([x_i, y_i]): ``x [B, K, Dx]``, ``y [B, K, Dy]`` -> ``[B, R]``."""
        return self.encoder(torch.cat([x, y], -1)).mean(1)  # [B, K, R] -> [B, R]

    def distribution(self, batch: EpisodeBatch, target_x: Tensor) -> tuple[Tensor, Tensor]:
        """Predictive mean and std ``[B, T, Dy]`` at ``target_x`` given the support set."""
        r = self.represent(batch.support_x, batch.support_y)  # [B, R]
        return decode(self.model, r, target_x, self.min_std)

    def meta_loss(self, batch: EpisodeBatch) -> MetaOutput:
        k = batch.support_x.shape[1]
        target_x = torch.cat([batch.support_x, batch.query_x], 1)  # [B, K+Q, Dx]
        target_y = torch.cat([batch.support_y, batch.query_y], 1)  # [B, K+Q, Dy]
        mean, std = self.distribution(batch, target_x)  # [B, K+Q, Dy] each
        log_lik = gaussian_log_prob(target_y, mean, std).mean(1)  # [B]
        return MetaOutput(-log_lik.mean(), mean[:, k:].detach(), extra={"log_likelihood": log_lik.detach()})

    def predict(self, batch: EpisodeBatch) -> MetaOutput:
        with torch.no_grad():
            mean, std = self.distribution(batch, batch.query_x)  # [B, Q, Dy] each
            log_lik = gaussian_log_prob(batch.query_y, mean, std).mean(1)  # [B]
        return MetaOutput(-log_lik.mean(), mean, extra={"log_likelihood": log_lik}, query_std=std)
