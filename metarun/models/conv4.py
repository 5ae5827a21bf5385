"""The four-block convolutional backbone of the few-shot literature."""

from __future__ import annotations

from torch import Tensor, nn

from metarun.errors import ConfigError
from metarun.models.head import classifier_head
from metarun.models.norm import CONTEXT_NORMS, TaskNorm2d, batch_norm


class Conv4(nn.Module):
    """4 × [3×3 conv, batch norm, ReLU, 2×2 max-pool], then an optional linear head.

    Vinyals et al. 2016; Finn et al. 2017; Snell et al. 2017. On 28×28 Omniglot with 64
    channels the flattened embedding has 64 features.

    Args:
        in_channels: image channels (1 for Omniglot, 3 for mini-ImageNet).
        image_size: input height and width, which fixes the embedding size.
        hidden: channels of every block.
        out_features: classes of the linear head, or None for an embedding network.
        norm: "transductive", "running", "tasknorm", "support" or "none" (see
            `metarun.models.norm`).
        pooled_blocks: how many blocks, from the first, end with the 2×2 max-pool; the
            others keep their resolution. 4 is the standard backbone; Relation Networks
            (Sung et al. 2018) pool only the first 2, so a spatial map is left to compare.

    ``features(x)`` is the feature map ``[M, *feature_shape]`` before flattening.
    ``forward(x, context_size)``: with ``norm="tasknorm"`` or ``"support"`` the first
    ``context_size`` rows of ``x`` are the context (support) set whose moments every
    TaskNorm layer uses (None: the whole batch); the other norms ignore it. ``uses_context`` says whether it matters.
    """

    def __init__(
        self,
        in_channels: int = 1,
        image_size: int = 28,
        hidden: int = 64,
        out_features: int | None = None,
        norm: str = "transductive",
        pooled_blocks: int = 4,
    ) -> None:
        super().__init__()
        if isinstance(pooled_blocks, bool) or pooled_blocks not in range(5):
            raise ConfigError(
                f"model.pooled_blocks={pooled_blocks!r} is not allowed: it must be an integer from 0 to 4."
            )
        blocks = []
        for i in range(4):
            blocks += [
                nn.Conv2d(in_channels if i == 0 else hidden, hidden, 3, padding=1),
                batch_norm(hidden, norm),
                nn.ReLU(),
            ]
            if i < pooled_blocks:
                blocks.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*blocks)
        self.uses_context = norm in CONTEXT_NORMS
        side = image_size
        for _ in range(pooled_blocks):
            side //= 2  # each max-pool floors the side
        if side < 1:
            raise ConfigError(
                f"model.image_size={image_size} is not allowed: {pooled_blocks} 2x2 "
                f"poolings need at least {2**pooled_blocks} pixels."
            )
        self.feature_shape = (hidden, side, side)  # [C, h, w] of features(x)
        self.embedding_dim = hidden * side * side
        self.head = classifier_head(self.embedding_dim, out_features)

    def forward(self, x: Tensor, context_size: int | None = None) -> Tensor:
        h = x
        for layer in self.features:
            h = layer(h, context_size) if isinstance(layer, TaskNorm2d) else layer(h)
        z = h.flatten(1)  # [M, hidden * h * w]
        return z if self.head is None else self.head(z)
