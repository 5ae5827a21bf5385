"""The four-block convolutional backbone of the few-shot literature."""

from __future__ import annotations

from torch import Tensor, nn

from metarun.errors import ConfigError
from metarun.models.norm import batch_norm


class Conv4(nn.Module):
    """4 × [3×3 conv, batch norm, ReLU, 2×2 max-pool], then an optional linear head.

    Vinyals et al. 2016; Finn et al. 2017; Snell et al. 2017. On 28×28 Omniglot with 64
    channels the flattened embedding has 64 features.

    Args:
        in_channels: image channels (1 for Omniglot, 3 for mini-ImageNet).
        image_size: input height and width, which fixes the embedding size.
        hidden: channels of every block.
        out_features: classes of the linear head, or None for an embedding network.
        norm: "transductive", "running" or "none" (see `metarun.models.norm`).
    """

    def __init__(self, in_channels: int = 1, image_size: int = 28, hidden: int = 64,
                 out_features: int | None = None, norm: str = "transductive") -> None:
        super().__init__()
        if out_features is not None and out_features <= 0:
            raise ConfigError(f"model.out_features={out_features} is not allowed: it must be "
                              f"a positive number of classes or null for an embedding.")
        blocks = []
        for i in range(4):
            blocks += [nn.Conv2d(in_channels if i == 0 else hidden, hidden, 3, padding=1),
                       batch_norm(hidden, norm), nn.ReLU(), nn.MaxPool2d(2)]
        self.features = nn.Sequential(*blocks)
        side = image_size
        for _ in range(4):
            side //= 2  # each max-pool floors the side
        if side < 1:
            raise ConfigError(f"model.image_size={image_size} is not allowed: four 2x2 poolings "
                              f"need at least 16 pixels.")
        self.embedding_dim = hidden * side * side
        self.head = None if out_features is None else nn.Linear(self.embedding_dim, out_features)

    def forward(self, x: Tensor) -> Tensor:
        z = self.features(x).flatten(1)  # [M, hidden * h * w]
        return z if self.head is None else self.head(z)
