"""Conv4 (Vinyals et al. 2016; Finn et al. 2017): the published shapes and parameter count,
the head, and MAML's meta-gradient through it against finite differences."""

from __future__ import annotations

import torch

from metarun.models.conv4 import Conv4
from tests.models.backbones import check_maml_finite_differences, image_batch


def test_published_shapes_and_parameters() -> None:
    model = Conv4(in_channels=1, image_size=28)
    assert model.embedding_dim == 64 and model(torch.zeros(2, 1, 28, 28)).shape == (2, 64)
    # 4 blocks of 3x3 conv (64 filters) + batch norm (scale, shift): 1 -> 64 -> 64 -> 64 -> 64
    convs = (1 * 64 * 9 + 64) + 3 * (64 * 64 * 9 + 64)
    assert sum(p.numel() for p in model.parameters()) == convs + 4 * 2 * 64
    assert Conv4(in_channels=3, image_size=84).embedding_dim == 64 * 5 * 5  # Snell et al.'s 1600-d
    assert Conv4(in_channels=1, image_size=28, out_features=5)(torch.zeros(3, 1, 28, 28)).shape == (3, 5)


def test_maml_meta_gradient_matches_finite_differences() -> None:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = Conv4(in_channels=3, image_size=16, hidden=3, out_features=2)
    names = [n for n, _ in model.named_parameters() if n.startswith(("features.0.", "head."))][:4]
    check_maml_finite_differences(model, names, image_batch(size=16))
