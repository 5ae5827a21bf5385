"""The MLP of the sinusoid experiments (Finn et al. 2017, 1-40-40-1): shape and parameter count."""

from __future__ import annotations

import torch

from metarun.models.mlp import MLP


def test_finn_et_al_sinusoid_network() -> None:
    model = MLP(1, (40, 40), 1)
    assert sum(p.numel() for p in model.parameters()) == (1 * 40 + 40) + (40 * 40 + 40) + (40 * 1 + 1)
    assert model(torch.zeros(7, 1)).shape == (7, 1)
