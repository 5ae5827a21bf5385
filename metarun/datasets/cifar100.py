"""CIFAR-100 (Krizhevsky 2009) read from its official archive, the source of CIFAR-FS and FC100.

Both few-shot benchmarks pool the archive's train and test parts (600 images per fine
class) and regroup the 100 classes into their own train/val/test splits.
"""

from __future__ import annotations

import tarfile
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from metarun.datasets.images import (
    CORRUPT,
    DEFAULT_MAX_PIXELS,
    ImageDataset,
    Item,
    file_fingerprint,
    load_pickle,
)

URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
MD5 = "eb9058c3a382ffc7106e4002c42a8d85"
ARCHIVE = "cifar-100-python.tar.gz"
FOLDER = "cifar-100-python"
PARTS = ("train", "test")


class CIFAR100Splits(ImageDataset):
    """Few-shot class splits of CIFAR-100; a subclass names each split's fine classes.

    Args (beyond `ImageDataset`'s):
        download: fetch ``cifar-100-python.tar.gz`` from the official URL (md5-checked)
            when ``root`` has neither it nor its extracted ``cifar-100-python/`` folder.
    """

    hint: ClassVar[str] = (
        f"put the official {ARCHIVE} ({URL}, md5 {MD5}) there, or set dataset.download=true on a "
        f"connected machine, or set METARUN_DATA_DIR to a folder with cifar100/"
    )

    def __init__(
        self,
        root: str,
        cache_dir: str,
        image_size: int = 32,
        channels: int = 3,
        mean: list[float] | None = None,
        std: list[float] | None = None,
        max_image_pixels: int = DEFAULT_MAX_PIXELS,
        download: bool = True,
    ) -> None:
        super().__init__(root, cache_dir, image_size, channels, mean, std, max_image_pixels)
        self.download = download
        self._data: tuple[np.ndarray, np.ndarray, np.ndarray, list[str], list[str]] | None = None

    def fine_classes(self, split: str) -> list[str]:
        """The fine class names of `split`, in label order."""
        raise NotImplementedError

    def _source(self) -> Path:
        archive, folder = self.root / ARCHIVE, self.root / FOLDER
        if archive.is_file():
            return archive
        if folder.is_dir():
            return folder
        if not self.download:
            raise self._missing(f"{ARCHIVE} (nor an extracted {FOLDER}/ folder) and dataset.download=false")
        self._fetch(URL, archive, MD5, "CIFAR-100")
        return archive

    def _fingerprint(self, split: str) -> Any:
        source = self._source()
        return file_fingerprint(source) if source.is_file() else ["folder", *file_fingerprint(source / "train")]

    def _read(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str], list[str]]:
        """images uint8 [60000, 32, 32, 3], fine [60000], coarse [60000], fine and coarse names."""
        if self._data is None:
            source = self._source()
            try:
                if source.is_file():
                    with tarfile.open(source, "r:gz") as archive:
                        raw = {name: _member(archive, f"{FOLDER}/{name}") for name in (*PARTS, "meta")}
                else:
                    raw = {name: (source / name).read_bytes() for name in (*PARTS, "meta")}
                parts = [_plain(load_pickle(raw[name])) for name in PARTS]
                meta = _plain(load_pickle(raw["meta"]))
                images = np.concatenate([np.asarray(p["data"], dtype=np.uint8).reshape(-1, 3, 32, 32) for p in parts])
                fine = np.concatenate([np.asarray(p["fine_labels"]) for p in parts])
                coarse = np.concatenate([np.asarray(p["coarse_labels"]) for p in parts])
                names = [_text(n) for n in meta["fine_label_names"]], [_text(n) for n in meta["coarse_label_names"]]
            except (*CORRUPT, KeyError, TypeError) as error:
                raise self._corrupt(str(source), f"{type(error).__name__}: {error}") from None
            self._data = (images.transpose(0, 2, 3, 1), fine, coarse, *names)  # [N, 32, 32, 3]
        return self._data

    def _items(self, split: str) -> tuple[list[Item], list[int], list[str]]:
        images, fine, _, fine_names, _ = self._read()
        classes = self.fine_classes(split)
        unknown = sorted(set(classes) - set(fine_names))
        if unknown:
            raise self._corrupt(str(self._source()), f"it has no class {unknown[0]}")
        index = {name: i for i, name in enumerate(fine_names)}
        items: list[Item] = []
        labels: list[int] = []
        for label, name in enumerate(classes):
            ids = np.flatnonzero(fine == index[name])  # 600 images: 500 train, 100 test
            items += [("", images[i], None) for i in ids]
            labels += [label] * len(ids)
        return items, labels, classes

    def fine_of(self, coarse_names: list[str]) -> list[str]:
        """The fine classes of each superclass in `coarse_names`, in CIFAR-100's label order."""
        _, fine, coarse, fine_names, coarse_names_all = self._read()
        out = []
        for name in coarse_names:
            if name not in coarse_names_all:
                raise self._corrupt(str(self._source()), f"it has no superclass {name}")
            labels = np.unique(fine[coarse == coarse_names_all.index(name)])
            out += [fine_names[i] for i in labels]
        return out


def _member(archive: tarfile.TarFile, name: str) -> bytes:
    """One member's bytes, read without extracting anything to disk."""
    handle = archive.extractfile(name)
    if handle is None:
        raise KeyError(name)
    return handle.read()


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _plain(table: dict) -> dict[str, Any]:
    """CIFAR's Python 2 pickles key by bytes or str, depending on the reader: str keys."""
    return {_text(k): v for k, v in table.items()}
