"""CIFAR-FS (Bertinetto et al. 2019): CIFAR-100's fine classes split 64/16/20."""

from __future__ import annotations

import json
from typing import ClassVar

from metarun.datasets.cifar100 import CIFAR100Splits
from metarun.datasets.images import packaged_lines


class CIFARFS(CIFAR100Splits):
    """CIFAR-FS: 64/16/20 CIFAR-100 fine classes of 600 images at 32×32, from the official
    ``cifar-100-python.tar.gz`` (downloaded and md5-checked when missing). The class lists
    (``[superclass, class]`` pairs, as torchmeta publishes them) ship with the package.
    Arguments as `CIFAR100Splits`."""

    name: ClassVar[str] = "cifar_fs"

    def fine_classes(self, split: str) -> list[str]:
        pairs = json.loads("\n".join(packaged_lines("cifar_fs", f"{split}.json")))
        return [fine for _, fine in pairs]
