"""CUB-200-2011 (Wah et al. 2011): 200 bird species, in Chen et al. 2019's 100/50/50 split."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar

from metarun.datasets.images import (
    DEFAULT_MAX_PIXELS,
    ImageDataset,
    Item,
    folder_fingerprint,
    image_files,
    packaged_lines,
)
from metarun.errors import ConfigError


class CUB(ImageDataset):
    """CUB-200-2011 from its official folder layout, ``CUB_200_2011/images/<class>/*.jpg``
    (``root`` may be the folder holding ``CUB_200_2011/`` or that folder itself), with the
    100/50/50 class split of Chen et al. 2019 ("A Closer Look at Few-shot Classification";
    the lists ship with the package).

    Args (beyond `ImageDataset`'s):
        crop_to_box: crop every image to its bird's bounding box (``images.txt`` and
            ``bounding_boxes.txt`` of the official release) before resizing.
    """

    name: ClassVar[str] = "cub"
    hint: ClassVar[str] = (
        "extract CUB_200_2011.tgz from https://www.vision.caltech.edu/datasets/cub_200_2011/ there "
        "(CUB_200_2011/images/<class>/*.jpg) or set METARUN_DATA_DIR to a folder with cub/"
    )

    def __init__(
        self,
        root: str,
        cache_dir: str,
        image_size: int = 84,
        channels: int = 3,
        mean: list[float] | None = None,
        std: list[float] | None = None,
        max_image_pixels: int = DEFAULT_MAX_PIXELS,
        crop_to_box: bool = False,
    ) -> None:
        super().__init__(root, cache_dir, image_size, channels, mean, std, max_image_pixels)
        self.crop_to_box = bool(crop_to_box)

    def cache_stem(self, split: str) -> str:
        return super().cache_stem(split) + ("_boxes" if self.crop_to_box else "")

    def _base(self) -> Path:
        return self.root if (self.root / "images").is_dir() else self.root / "CUB_200_2011"

    def _listed(self, split: str) -> tuple[list[Path], list[int], list[str]]:
        classes = list(json.loads("\n".join(packaged_lines("cub", f"{split}.json"))))
        images = self._base() / "images"
        files: list[Path] = []
        labels: list[int] = []
        for label, name in enumerate(classes):
            if not (images / name).is_dir():
                raise self._missing(f"class folder {images / name}")
            found = image_files(images / name)
            files += found
            labels += [label] * len(found)
        return files, labels, classes

    def _fingerprint(self, split: str) -> Any:
        return folder_fingerprint(self._listed(split)[0])

    def _items(self, split: str) -> tuple[list[Item], list[int], list[str]]:
        files, labels, classes = self._listed(split)
        boxes = self._boxes() if self.crop_to_box else {}
        base = self._base() / "images"
        items: list[Item] = []
        for path in files:
            key = path.relative_to(base).as_posix()
            if self.crop_to_box and key not in boxes:
                raise ConfigError(
                    f"dataset.crop_to_box=true is not allowed with dataset.root={self.root}: "
                    f"bounding_boxes.txt has no box for {key}, so set dataset.crop_to_box=false or {self.hint}."
                )
            items.append(("", str(path), boxes.get(key)))
        return items, labels, classes

    def _boxes(self) -> dict[str, tuple[float, float, float, float]]:
        """(left, upper, right, lower) of each image's bird, keyed by ``<class>/<file>``."""
        base = self._base()
        try:
            paths = dict(line.split(maxsplit=1) for line in (base / "images.txt").read_text().splitlines() if line)
            boxes = {}
            for line in (base / "bounding_boxes.txt").read_text().splitlines():
                if line.strip():
                    image_id, x, y, w, h = line.split()
                    left, upper = float(x), float(y)
                    boxes[paths[image_id].strip()] = (left, upper, left + float(w), upper + float(h))
        except FileNotFoundError as error:
            raise ConfigError(
                f"dataset.crop_to_box=true is not allowed with dataset.root={self.root}: it has no "
                f"{Path(error.filename).name}, so set dataset.crop_to_box=false or {self.hint}."
            ) from None
        except (ValueError, KeyError) as error:
            raise self._corrupt(str(base / "bounding_boxes.txt"), f"{type(error).__name__}: {error}") from None
        return boxes
