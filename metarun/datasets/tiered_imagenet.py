"""tiered-ImageNet: 608 ImageNet classes under 34 categories (Ren et al. 2018), split by
category 20/6/8 into 351/97/160 classes."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from metarun.datasets.images import (
    CORRUPT,
    ImageDataset,
    Item,
    file_fingerprint,
    folder_fingerprint,
    image_files,
    load_pickle,
    packaged_lines,
)
from metarun.errors import ConfigError


def split_classes(split: str) -> list[tuple[str, str]]:
    """(wnid, category wnid) of each class of Ren et al.'s `split`, in the published order."""
    return [(line.split(",")[0], line.split(",")[1]) for line in packaged_lines("tiered_imagenet", f"{split}.csv")]


class TieredImageNet(ImageDataset):
    """tiered-ImageNet with Ren et al.'s split (the class lists ship with the package).

    Reads either on-disk format under ``root``:

    - an ImageNet-style train folder, ``train/<wnid>/*.JPEG`` (or ``<wnid>/`` directly under
      ``root``), of which each split takes its classes' folders;
    - the common pickles ``{split}_images_png.pkl`` (a list of PNG-encoded images) and
      ``{split}_labels.pkl`` (``label_specific`` per image, ``label_specific_str`` names).

    At 84×84 RGB the decoded cache is ~16 GB; it is memory-mapped, so DDP ranks share it.
    ImageNet's terms do not allow downloading the images: the error says where to put them.
    """

    name: ClassVar[str] = "tiered_imagenet"
    hint: ClassVar[str] = (
        "put ImageNet's train/<wnid>/ folders, or the {train,val,test}_images_png.pkl and _labels.pkl "
        "files, there (ImageNet's terms do not allow metarun to download them) or set METARUN_DATA_DIR "
        "to a folder with tiered_imagenet/"
    )

    def _pickles(self, split: str) -> tuple[Path, Path]:
        return self.root / f"{split}_images_png.pkl", self.root / f"{split}_labels.pkl"

    def _folder(self) -> Path:
        return self.root / "train" if (self.root / "train").is_dir() else self.root

    def _fingerprint(self, split: str) -> Any:
        images, labels = self._pickles(split)
        if images.is_file():
            return ["pickle", *file_fingerprint(images), *file_fingerprint(labels)]
        return ["folder", *folder_fingerprint([Path(path) for path, _ in self._listed(split)])]

    def _items(self, split: str) -> tuple[list[Item], list[int], list[str]]:
        wnids = [wnid for wnid, _ in split_classes(split)]
        images_path, labels_path = self._pickles(split)
        if not images_path.is_file():
            listed = self._listed(split)
            return [("", path, None) for path, _ in listed], [label for _, label in listed], wnids
        if not labels_path.is_file():
            raise self._missing(f"{labels_path.name} beside {images_path.name}")
        try:
            encoded = load_pickle(images_path)
            table = load_pickle(labels_path)
            specific = np.asarray(table["label_specific"], dtype=np.int64)
            names = [str(name) for name in table["label_specific_str"]]
        except (*CORRUPT, KeyError, TypeError) as error:
            raise self._corrupt(f"{images_path} or {labels_path}", f"{type(error).__name__}: {error}") from None
        if len(specific) != len(encoded) or len(names) != len(wnids):
            raise ConfigError(
                f"dataset.root={self.root}: {labels_path.name} labels {len(specific)} images of {len(names)} classes "
                f"but {images_path.name} holds {len(encoded)} images and Ren et al.'s {split} split has "
                f"{len(wnids)} classes, so {self.hint}."
            )
        # Files that name their classes by wnid are put in the published order; others keep theirs.
        order = {wnid: i for i, wnid in enumerate(wnids)}
        relabel = [order[n] for n in names] if set(names) == set(wnids) else list(range(len(names)))
        classes = wnids if set(names) == set(wnids) else names
        ids = np.argsort(np.asarray(relabel)[specific], kind="stable")  # images grouped by class
        items: list[Item] = [("", np.asarray(encoded[i], dtype=np.uint8).reshape(-1), None) for i in ids]
        return items, [relabel[specific[i]] for i in ids], classes

    def _listed(self, split: str) -> list[tuple[str, int]]:
        """(image path, label) of every image of `split` in the folder layout."""
        folder = self._folder()
        listed: list[tuple[str, int]] = []
        for label, (wnid, _) in enumerate(split_classes(split)):
            if not (folder / wnid).is_dir():
                raise self._missing(f"{split}_images_png.pkl nor class folder {folder / wnid}")
            files = image_files(folder / wnid)
            if not files:
                raise self._missing(f"images in {folder / wnid}")
            listed += [(str(path), label) for path in files]
        return listed

    def categories(self, split: str) -> list[str]:
        """The category wnid of each class of `split`, in label order (20/6/8 distinct)."""
        return [category for _, category in split_classes(split)]

    def superclasses(self, name: str) -> list[str] | None:
        """The categories are the superclasses (Ren et al. 2018's hierarchy), where the classes
        are in the published order (files that do not name them by wnid keep their own: None)."""
        wnids = [wnid for wnid, _ in split_classes(name)]
        return self.categories(name) if self._classes.get(name, wnids) == wnids else None
