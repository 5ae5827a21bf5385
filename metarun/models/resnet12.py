"""ResNet-12, the residual backbone of TADAM (Oreshkin et al. 2018) and MetaOptNet (Lee et al. 2019)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from metarun.checks import number_in, positive_ints
from metarun.errors import ConfigError
from metarun.models.dropout import DropBlock
from metarun.models.head import classifier_head
from metarun.models.norm import CONTEXT_NORMS, TaskNorm2d, batch_norm


def _normed(layer: nn.Module, x: Tensor, context_size: int | None) -> Tensor:
    return layer(x, context_size) if isinstance(layer, TaskNorm2d) else layer(x)


class ResBlock(nn.Module):
    """3 × [3×3 conv, norm], LeakyReLU(0.1) between, a 1×1 conv + norm shortcut, LeakyReLU,
    2×2 max-pool, then DropBlock."""

    def __init__(self, cin: int, cout: int, norm: str, drop: DropBlock) -> None:
        super().__init__()
        self.conv1, self.norm1 = nn.Conv2d(cin, cout, 3, padding=1, bias=False), batch_norm(cout, norm)
        self.conv2, self.norm2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False), batch_norm(cout, norm)
        self.conv3, self.norm3 = nn.Conv2d(cout, cout, 3, padding=1, bias=False), batch_norm(cout, norm)
        self.shortcut, self.norm_shortcut = nn.Conv2d(cin, cout, 1, bias=False), batch_norm(cout, norm)
        self.drop = drop

    def forward(self, x: Tensor, context_size: int | None = None) -> Tensor:
        h = F.leaky_relu(_normed(self.norm1, self.conv1(x), context_size), 0.1)
        h = F.leaky_relu(_normed(self.norm2, self.conv2(h), context_size), 0.1)
        h = _normed(self.norm3, self.conv3(h), context_size)
        h = F.leaky_relu(h + _normed(self.norm_shortcut, self.shortcut(x), context_size), 0.1)
        return self.drop(F.max_pool2d(h, 2))


class ResNet12(nn.Module):
    """ResNet-12: 4 residual blocks of widths 64-160-320-640 (Lee et al. 2019; 64-128-256-512
    in Oreshkin et al. 2018), each halving the resolution, global average pooling, then an
    optional linear head. 84×84 images give a 5×5×640 map and a 640-d embedding.

    Args:
        in_channels: image channels (the dataset's ``channels``).
        image_size: input height and width (at least 16: four 2×2 poolings).
        widths: the 4 block widths.
        out_features: classes of the linear head, or None for an embedding network.
        norm: as `Conv4` ("transductive", "running", "tasknorm", "support", "none").
        drop_rate: DropBlock's rate in the last two blocks (MetaOptNet: 0.1), 0 for none.
        drop_block_size: DropBlock's square side (MetaOptNet: 5).
        seed: seeds DropBlock's masks.
        pool: average the final map into a vector ("avg", the usual embedding) or keep it
            ("none": ``embedding_dim`` is the flattened map, for Relation Networks).

    ``feature_shape`` is ``[C, h, w]`` of the map before pooling, ``uses_context`` as `Conv4`.
    """

    def __init__(
        self,
        in_channels: int = 3,
        image_size: int = 84,
        widths: tuple[int, int, int, int] | list[int] = (64, 160, 320, 640),
        out_features: int | None = None,
        norm: str = "transductive",
        drop_rate: float = 0.0,
        drop_block_size: int = 5,
        seed: int = 0,
        pool: str = "avg",
    ) -> None:
        super().__init__()
        widths = list(positive_ints("model.widths", widths, 4))
        number_in("model.drop_rate", drop_rate, 0, 1)
        if pool not in ("avg", "none"):
            raise ConfigError(f"model.pool={pool!r} is not allowed: use avg or none.")
        side = image_size // 16
        if side < 1:
            raise ConfigError(
                f"model.image_size={image_size} is not allowed: ResNet-12's four 2x2 poolings need at least 16 pixels."
            )
        blocks = []
        for i, (cin, cout) in enumerate(zip([in_channels, *widths[:3]], widths)):
            rate = drop_rate if i >= 2 else 0.0
            blocks.append(ResBlock(cin, cout, norm, DropBlock(rate, drop_block_size if i == 3 else 1, seed + i)))
        self.features = nn.Sequential(*blocks)
        self.uses_context = norm in CONTEXT_NORMS
        self.pool = pool
        self.feature_shape = (widths[3], side, side)  # [C, h, w] before pooling
        self.embedding_dim = widths[3] if pool == "avg" else widths[3] * side * side
        self.head = classifier_head(self.embedding_dim, out_features)

    def forward(self, x: Tensor, context_size: int | None = None) -> Tensor:
        h = x
        for block in self.features:
            h = block(h, context_size)  # [M, C_i, H / 2^i, W / 2^i]
        z = h.mean(dim=(-2, -1)) if self.pool == "avg" else h.flatten(1)  # [M, D]
        return z if self.head is None else self.head(z)
