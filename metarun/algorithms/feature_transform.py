"""SimpleShot's feature transforms for the nearest-centroid learners (Wang, Chao, Weinberger &
van der Maaten 2019, "SimpleShot: Revisiting Nearest-Neighbor Classification for Few-Shot
Learning"): before the centroids and distances of an evaluation episode, each feature is

- ``none``: left as it is;
- ``l2n``: L2-normalised;
- ``cl2n``: centred on the mean feature of the training split, then L2-normalised.

As in SimpleShot the transform applies when tasks are labelled (validation, test, `metarun-eval`,
`metarun-predict`), never to the training loss. The training mean is measured on `MEAN_IMAGES`
training images (a fixed, seeded draw) at the start of every validation and test, so it is the
mean of the weights being evaluated, and is saved with them in every checkpoint.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metarun.algorithms.base import embedding_dim
from metarun.errors import ConfigError

TRANSFORMS = ("none", "l2n", "cl2n")
MEAN_IMAGES = 2048  # the training images whose mean feature centres cl2n (fewer if the split is smaller)
STREAM = 4  # their draw's generator stream: after training, validation, test and test-time fine-tuning
CHUNK = 256  # images embedded per forward call while measuring the mean


def feature_transform_for(model: nn.Module, kind: str, learner: str) -> FeatureTransform:
    """``kind`` for ``model``'s features (cl2n reads its ``embedding_dim``)."""
    transform = FeatureTransform(kind)
    return FeatureTransform(kind, embedding_dim(model, learner)) if transform.needs_mean else transform


class FeatureTransform(nn.Module):
    """One of `TRANSFORMS` on features ``[..., D]``.

    Args:
        kind: none, l2n or cl2n.
        dim: the feature size D (the mean's; cl2n only).
    """

    def __init__(self, kind: str = "none", dim: int | None = None) -> None:
        super().__init__()
        if kind not in TRANSFORMS:
            raise ConfigError(
                f"algorithm.feature_transform={kind!r} is not allowed: it must be one of {', '.join(TRANSFORMS)}."
            )
        self.kind = kind
        if kind == "cl2n":  # saved with the weights; a checkpoint without cl2n holds neither
            self.register_buffer("mean", torch.zeros(int(dim or 0)))  # [D]
            self.register_buffer("fitted", torch.tensor(False))

    @property
    def needs_mean(self) -> bool:
        return self.kind == "cl2n"

    @torch.no_grad()
    def fit(self, embed: nn.Module, images: Tensor) -> None:
        """Set the mean to that of ``embed``'s features of ``images [M, C, H, W]``."""
        total = torch.cat([embed(chunk).to(self.mean.dtype) for chunk in images.split(CHUNK)]).mean(
            0
        )  # [D], the buffer's precision
        self.mean.copy_(total)
        self.fitted.fill_(True)

    def forward(self, z: Tensor) -> Tensor:
        if self.kind == "none":
            return z
        if self.kind == "cl2n":
            if not bool(self.fitted):
                raise RuntimeError("feature_transform=cl2n: fit the training mean before labelling tasks")
            z = z - self.mean.to(z.dtype)
        return F.normalize(z, dim=-1)
