"""Random masks drawn from a layer's own seeded generator: dropout and DropBlock."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class SeededMask(nn.Module):
    """A training-time random mask from the layer's own generator (seeded by ``seed``; its
    state is part of the state dict, so a resumed run draws the same masks). Random masks
    differ per task, so a layer with ``rate > 0`` refuses ``task_batching=vmap``. Subclasses
    give ``masked(x)``: ``x`` with a fresh mask applied and the kept units rescaled."""

    kind = "mask"  # how refusals name the layer

    def __init__(self, rate: float, seed: int) -> None:
        super().__init__()
        self.rate = float(rate)
        self.generator = torch.Generator().manual_seed(seed)

    def vmap_refusal(self, name: str) -> str | None:
        if self.rate > 0:
            return (
                f"its {self.kind} {name} draws a random mask per task, which vmap cannot, so use "
                f"task_batching=loop or model.drop_rate=0"
            )
        return None

    def get_extra_state(self) -> Tensor:
        return self.generator.get_state()

    def set_extra_state(self, state: Tensor) -> None:
        self.generator.set_state(state)

    def masked(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.rate == 0:
            return x
        return self.masked(x)


class SeededDropout(SeededMask):
    """Dropout: each unit kept with probability ``1 - rate`` and scaled by ``1 / (1 - rate)``."""

    kind = "dropout"

    def masked(self, x: Tensor) -> Tensor:
        keep = torch.rand(x.shape, generator=self.generator) >= self.rate
        return x * keep.to(device=x.device, dtype=x.dtype) / (1 - self.rate)


class DropBlock(SeededMask):
    """DropBlock (Ghiasi et al. 2018): in training, zero ``block_size``² squares of each
    feature map, about ``rate`` of the units, and rescale the rest (as MetaOptNet)."""

    kind = "DropBlock"

    def __init__(self, rate: float, block_size: int, seed: int) -> None:
        super().__init__(rate, seed)
        self.block_size = int(block_size)

    def masked(self, x: Tensor) -> Tensor:
        m, c, h, w = x.shape
        size = min(self.block_size, h, w)
        valid = (h - size + 1) * (w - size + 1)
        gamma = self.rate / size**2 * h * w / valid  # so that ~rate of the units drop
        centres = torch.rand(m, c, h - size + 1, w - size + 1, generator=self.generator) < gamma  # [M, C, h', w']
        pad = size // 2, size - 1 - size // 2
        seeds = F.pad(centres.float(), (pad[0], pad[1], pad[0], pad[1]))  # [M, C, H, W] block centres
        dropped = F.max_pool2d(seeds, size, stride=1, padding=0) if size > 1 else seeds
        dropped = F.pad(dropped, (0, w - dropped.shape[-1], 0, h - dropped.shape[-2]))  # [M, C, H, W]
        keep = (1 - dropped).to(device=x.device, dtype=x.dtype)
        return x * keep * (keep.numel() / keep.sum().clamp(min=1))
