"""Shared by the backbone tests: a tiny float64 image meta-batch and MAML's meta-gradient
checked against finite differences on chosen parameters."""

from __future__ import annotations

import torch
from torch import nn

from metarun.algorithms.maml import MAML
from metarun.datasets.base import ClassImages
from metarun.episodes import EpisodeBatch, EpisodeSampler
from tests.algorithms.learning import finite_difference, meta_gradient, meta_loss_value


def image_batch(channels: int = 3, size: int = 16, ways: int = 2, tasks: int = 2) -> EpisodeBatch:
    """A float64 meta-batch of ``tasks`` ``ways``-way 1-shot 2-query episodes of random images."""
    g = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (ways * 6, channels, size, size), dtype=torch.uint8, generator=g)
    split = ClassImages(pixels, torch.arange(ways * 6) % (ways * 2), "tiny")
    batch = EpisodeSampler(ways, 1, 2, tasks).train_batch(split, step=0)
    batch.support_x, batch.query_x = batch.support_x.double(), batch.query_x.double()
    return batch


def check_maml_finite_differences(
    model: nn.Module, names: list[str], batch: EpisodeBatch, inner_lr: float = 0.01
) -> None:
    """MAML's second-order meta-gradient w.r.t. the parameters ``names`` (float64) equals
    central finite differences of the meta-loss. (A small inner step: batch norm over a
    tiny batch is so curved that one step of 0.1 makes finite differences unstable.)"""
    alg = MAML(model.double(), inner_lr=inner_lr, inner_steps=1, test_inner_steps=1)
    alg.train()
    params = dict(alg.named_parameters())
    chosen = [params[f"model.{name}"] for name in names]
    autograd = meta_gradient(alg, batch)
    offsets, start = {}, 0
    for name, p in alg.named_parameters():
        offsets[name] = (start, start + p.numel())
        start += p.numel()
    picked = torch.cat([autograd[slice(*offsets[f"model.{name}"])] for name in names])
    expected = finite_difference(meta_loss_value(alg, batch), chosen)
    assert picked.abs().sum() > 0
    torch.testing.assert_close(picked, expected, rtol=1e-5, atol=1e-7)
