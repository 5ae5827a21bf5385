"""R2-D2's backbone: four convolutional blocks whose last two feed the embedding together."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from metarun.checks import number_in, positive_ints
from metarun.errors import ConfigError
from metarun.models.dropout import SeededDropout
from metarun.models.head import classifier_head
from metarun.models.norm import CONTEXT_NORMS, TaskNorm2d, batch_norm


class R2D2Net(nn.Module):
    """The backbone of R2-D2 (Bertinetto, Henriques, Torr & Vedaldi, ICLR 2019), as the authors'
    code builds it (``RRFeatures``): four blocks of 3×3 convolution, normalisation, 2×2 max-pool
    (stride 2, the fourth stride 1) and LeakyReLU, with dropout after the third and fourth
    blocks; the embedding is the third block's output max-pooled again (2×2, stride 1) and the
    fourth block's, flattened and concatenated (widths 96-192-384-512: 72,576-d at 84×84,
    8,064-d at 32×32).

    Args:
        in_channels, image_size: what the dataset produces.
        widths: the four blocks' channels (the authors: 96, 192, 384, 512; "RRNet_small": 64 each).
        out_features: classes of a linear head, or None for an embedding network.
        norm: batch norm mode (`metarun.models.norm.batch_norm`).
        slope: LeakyReLU's negative slope (theirs: 0.1).
        drop_rate: dropout after blocks 3 and 4 (theirs: 0.1 on mini-ImageNet, 0.4 on CIFAR-FS).
        seed: seeds the dropout masks.
    """

    def __init__(
        self,
        in_channels: int = 3,
        image_size: int = 84,
        widths: tuple[int, ...] = (96, 192, 384, 512),
        out_features: int | None = None,
        norm: str = "running",
        slope: float = 0.1,
        drop_rate: float = 0.0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        widths = positive_ints("model.widths", widths, 4)
        number_in("model.drop_rate", drop_rate, 0, 1)
        side = image_size // 8  # three 2x2 pools of stride 2
        if side < 2:
            raise ConfigError(
                f"model.image_size={image_size} is not allowed: R2-D2's network needs at least 16 pixels."
            )
        self.blocks = nn.ModuleList()
        for i, width in enumerate(widths):
            layers: list[nn.Module] = [
                nn.Conv2d(in_channels if i == 0 else widths[i - 1], width, 3, padding=1),
                batch_norm(width, norm),
                nn.MaxPool2d(2, stride=2 if i < 3 else 1),
                nn.LeakyReLU(slope),
            ]
            if i >= 2:
                layers.append(SeededDropout(drop_rate, seed + i))
            self.blocks.append(nn.Sequential(*layers))
        self.pool3 = nn.MaxPool2d(2, stride=1)
        self.uses_context = norm in CONTEXT_NORMS
        self.embedding_dim = (widths[2] + widths[3]) * (side - 1) ** 2
        self.head = classifier_head(self.embedding_dim, out_features)

    def forward(self, x: Tensor, context_size: int | None = None) -> Tensor:
        h, third = x, x
        for i, block in enumerate(self.blocks):
            for layer in block:
                h = layer(h, context_size) if isinstance(layer, TaskNorm2d) else layer(h)
            if i == 2:
                third = self.pool3(h)
        z = torch.cat([third.flatten(1), h.flatten(1)], 1)  # [M, (w3 + w4) * (side - 1)^2]
        return z if self.head is None else self.head(z)
