"""FC100 (Oreshkin et al. 2018): CIFAR-100 split by superclass 12/4/4 (60/20/20 classes)."""

from __future__ import annotations

import json
from typing import ClassVar

from metarun.datasets.cifar100 import CIFAR100Splits
from metarun.datasets.images import packaged_lines


class FC100(CIFAR100Splits):
    """FC100: CIFAR-100's 20 superclasses split 12/4/4, each bringing its 5 fine classes, so
    60/20/20 classes of 600 images at 32×32 and no superclass shared between splits. From
    the official ``cifar-100-python.tar.gz``; the superclass lists ship with the package.
    Arguments as `CIFAR100Splits`."""

    name: ClassVar[str] = "fc100"

    def superclasses(self, split: str) -> list[str]:
        return list(json.loads("\n".join(packaged_lines("fc100", f"{split}.json"))))

    def fine_classes(self, split: str) -> list[str]:
        return self.fine_of(self.superclasses(split))
