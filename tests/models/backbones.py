"""Shared by the backbone tests: a tiny float64 image meta-batch and MAML's meta-gradient
checked against finite differences along random directions of chosen parameters."""

from __future__ import annotations

import torch
from torch import nn

from metarun.algorithms.maml import MAML
from metarun.datasets.base import ClassImages
from metarun.episodes import EpisodeBatch, EpisodeSampler
from tests.algorithms.learning import meta_gradient, meta_loss_value


def image_batch(channels: int = 3, size: int = 16, ways: int = 2, tasks: int = 2) -> EpisodeBatch:
    """A float64 meta-batch of ``tasks`` ``ways``-way 1-shot 2-query episodes of random images."""
    g = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (ways * 6, channels, size, size), dtype=torch.uint8, generator=g)
    split = ClassImages(pixels, torch.arange(ways * 6) % (ways * 2), "tiny")
    batch = EpisodeSampler(ways, 1, 2, tasks).train_batch(split, step=0)
    batch.support_x, batch.query_x = batch.support_x.double(), batch.query_x.double()
    return batch


def check_maml_finite_differences(
    model: nn.Module, names: list[str], batch: EpisodeBatch, inner_lr: float = 0.01, directions: int = 3
) -> None:
    """MAML's second-order meta-gradient w.r.t. each parameter of ``names`` (float64) equals
    central finite differences of the meta-loss along ``directions`` random unit directions of
    that parameter: ``g·v = (L(θ + εv) − L(θ − εv)) / 2ε`` (two meta-losses per direction instead
    of two per coordinate). (A small inner step: batch norm over a tiny batch is so curved that
    one step of 0.1 makes finite differences unstable.)"""
    alg = MAML(model.double(), inner_lr=inner_lr, inner_steps=1, test_inner_steps=1)
    alg.train()
    params = dict(alg.named_parameters())
    autograd = meta_gradient(alg, batch)
    offsets, start = {}, 0
    for name, p in alg.named_parameters():
        offsets[name] = (start, start + p.numel())
        start += p.numel()
    loss, eps = meta_loss_value(alg, batch), 1e-6
    g = torch.Generator().manual_seed(0)
    for name in names:
        p, grad = params[f"model.{name}"], autograd[slice(*offsets[f"model.{name}"])]
        assert grad.abs().sum() > 0, name
        for _ in range(directions):
            v = torch.randn(p.shape, generator=g, dtype=p.dtype)
            v /= v.norm()
            with torch.no_grad():
                p.add_(eps * v)
                up = loss()
                p.sub_(2 * eps * v)
                down = loss()
                p.add_(eps * v)
            expected = torch.tensor((up - down) / (2 * eps), dtype=torch.float64)
            torch.testing.assert_close(grad @ v.flatten(), expected, rtol=1e-5, atol=1e-7, msg=name)
