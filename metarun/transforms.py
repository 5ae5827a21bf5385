"""Training augmentation of episodes, drawn from each task's own generator.

The `transform` config group builds one `Augment`; the episode sampler applies it to
training episodes only (validation and test episodes are never augmented), after the
images are chosen and before the dataset's mean/std normalisation. Every random number
comes from the task's `torch.Generator`, so training stays reproducible under a seed and
identical on 1 and W DDP processes (each task's draws do not depend on the rank).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from metarun.errors import ConfigError

CROPS = ("none", "pad", "resized")
GREY = (0.299, 0.587, 0.114)  # ITU-R 601 luma, as PIL's convert("L") and torchvision


class Augment:
    """Random crop, horizontal flip and colour jitter of a batch of images, all vectorised.

    A crop of the zero-padded image moves by whole pixels and a flip mirrors the columns,
    both exact (indexing); a resized crop (with its flip) is one bilinear affine resampling
    per image (`grid_sample`).

    Args:
        crop: "none"; "pad": a random ``H×W`` crop of the image zero-padded by ``padding``
            pixels (the CIFAR-style crop of MetaOptNet, Lee et al. 2019); "resized": a random
            crop of ``scale`` of the area and ``ratio`` aspect, resized back to ``H×W`` (as
            torchvision's RandomResizedCrop, the size clamped to the image instead of re-drawn).
        padding: pixels of zero padding for ``crop="pad"``.
        scale: (min, max) fraction of the area kept by ``crop="resized"``.
        ratio: (min, max) aspect ratio (width / height) of ``crop="resized"``.
        flip: mirror each image left-right with probability 1/2.
        brightness, contrast, saturation: colour jitter as torchvision's ColorJitter: each
            image's factor is uniform in ``[1 - s, 1 + s]`` (applied in this order); 0: off.
            Saturation changes nothing on grey images.
    """

    def __init__(
        self,
        crop: str = "none",
        padding: int = 4,
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        flip: bool = True,
        brightness: float = 0.0,
        contrast: float = 0.0,
        saturation: float = 0.0,
    ) -> None:
        if crop not in CROPS:
            raise ConfigError(f"transform.crop={crop!r} is not allowed: use one of {', '.join(CROPS)}.")
        if isinstance(padding, bool) or not isinstance(padding, int) or padding < 0:
            raise ConfigError(f"transform.padding={padding!r} is not allowed: it must be a non-negative integer.")
        scale, ratio = tuple(scale), tuple(ratio)
        if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
            raise ConfigError(
                f"transform.scale={list(scale)} is not allowed: it must be [min, max] with 0 < min <= max <= 1."
            )
        if len(ratio) != 2 or not 0 < ratio[0] <= ratio[1]:
            raise ConfigError(
                f"transform.ratio={list(ratio)} is not allowed: it must be [min, max] with 0 < min <= max."
            )
        for key, value in (("brightness", brightness), ("contrast", contrast), ("saturation", saturation)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
                raise ConfigError(f"transform.{key}={value!r} is not allowed: it must be a number in [0, 1).")
        self.crop, self.padding, self.flip = crop, padding, bool(flip)
        self.scale = (float(scale[0]), float(scale[1]))
        self.log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
        self.jitter = (float(brightness), float(contrast), float(saturation))

    def __call__(self, x: Tensor, generator: torch.Generator) -> Tensor:
        """``x [M, C, H, W]`` in [0, 1] -> augmented ``[M, C, H, W]`` in [0, 1]."""
        if self.crop == "resized":
            x = self._geometry(x, generator)
        elif self.crop == "pad" or self.flip:
            x = self._shift_flip(x, generator)
        if any(self.jitter):
            x = self._colour(x, generator)
        return x

    def _shift_flip(self, x: Tensor, g: torch.Generator) -> Tensor:
        """Whole-pixel crops of the zero-padded images and mirror flips, by indexing (exact,
        and many times faster than resampling)."""
        m, _, h, w = x.shape
        if self.crop == "pad":
            p = self.padding
            shift = torch.randint(-p, p + 1, (2, m), generator=g)  # [2, M] pixels
            padded = F.pad(x, (p, p, p, p))  # [M, C, H + 2p, W + 2p]
            x = torch.stack(
                [padded[i, :, p + dy : p + dy + h, p + dx : p + dx + w] for i, (dx, dy) in enumerate(shift.T.tolist())]
            )  # [M, C, H, W]
        if self.flip:
            flip = torch.rand(m, generator=g) < 0.5  # [M]
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        return x

    def _geometry(self, x: Tensor, g: torch.Generator) -> Tensor:
        """A random resized crop (and flip) as one affine resampling per image: output pixel
        centre u (normalised, align_corners=False) samples the input at s * u + t."""
        m = x.shape[0]
        u = torch.rand(4, m, generator=g)  # [4, M]
        area = self.scale[0] + (self.scale[1] - self.scale[0]) * u[0]
        aspect = torch.exp(self.log_ratio[0] + (self.log_ratio[1] - self.log_ratio[0]) * u[1])
        sx = torch.sqrt(area * aspect).clamp(max=1.0)  # crop width / W
        sy = torch.sqrt(area / aspect).clamp(max=1.0)  # crop height / H
        tx, ty = (1 - sx) * (2 * u[2] - 1), (1 - sy) * (2 * u[3] - 1)  # the crop lies inside
        if self.flip:
            sx = sx * torch.where(torch.rand(m, generator=g) < 0.5, -1.0, 1.0)
        theta = torch.zeros(m, 2, 3)  # [M, 2, 3]
        theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = sx, tx, sy, ty
        grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)  # [M, H, W, 2]
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

    def _colour(self, x: Tensor, g: torch.Generator) -> Tensor:
        m, c = x.shape[:2]
        factors = 1 + (2 * torch.rand(3, m, 1, 1, 1, generator=g) - 1) * torch.tensor(self.jitter).view(3, 1, 1, 1, 1)
        brightness, contrast, saturation = factors  # each [M, 1, 1, 1]
        x = (x * brightness).clamp(0, 1)
        grey = self._grey(x)  # [M, 1, H, W]
        mean = grey.mean(dim=(1, 2, 3), keepdim=True)  # [M, 1, 1, 1]
        x = ((x - mean) * contrast + mean).clamp(0, 1)
        if c == 3:
            grey = self._grey(x)
            x = ((x - grey) * saturation + grey).clamp(0, 1)
        return x

    @staticmethod
    def _grey(x: Tensor) -> Tensor:
        if x.shape[1] == 1:
            return x
        weights = torch.tensor(GREY, dtype=x.dtype).view(1, 3, 1, 1)
        return (x * weights).sum(dim=1, keepdim=True)  # [M, 1, H, W]
