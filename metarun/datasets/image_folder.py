"""A user's own images: one folder per class, split into train/val/test by class."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from metarun.datasets.images import DEFAULT_MAX_PIXELS, SPLITS, ImageDataset, Item, folder_fingerprint, image_files
from metarun.errors import ConfigError


class ImageFolder(ImageDataset):
    """``root/<class>/<image>`` in any format PIL reads (grey or RGB, converted to
    ``channels``), each class in exactly one of train/val/test.

    Args (beyond `ImageDataset`'s):
        split_files: ``{train: path, val: path, test: path}``, text files listing one class
            folder name per line (relative paths: from ``root``); or null to split by ratio.
        split_ratio: ``[train, val, test]`` fractions of the classes (summing to 1), drawn
            with ``split_seed``; every split gets at least one class.
        split_seed: the seed of the ratio split (a fixed split across runs and seeds).
    """

    name: ClassVar[str] = "image_folder"
    hint: ClassVar[str] = "put one folder of images per class there (root/<class>/<image>)"

    def __init__(
        self,
        root: str,
        cache_dir: str,
        image_size: int = 84,
        channels: int = 3,
        mean: list[float] | None = None,
        std: list[float] | None = None,
        max_image_pixels: int = DEFAULT_MAX_PIXELS,
        split_files: dict[str, str] | None = None,
        split_ratio: list[float] | tuple[float, ...] = (0.6, 0.2, 0.2),
        split_seed: int = 0,
    ) -> None:
        if root is None:
            raise ConfigError(
                "dataset.root=null is not allowed: set it to your folder with one folder of images per class "
                "(dataset.root=/path/to/root, root/<class>/<image>)."
            )
        super().__init__(root, cache_dir, image_size, channels, mean, std, max_image_pixels)
        if not self.root.is_dir():
            raise ConfigError(f"dataset.root={self.root} is not a folder, so {self.hint}.")
        self.folders = sorted(p.name for p in self.root.iterdir() if p.is_dir() and image_files(p))
        if len(self.folders) < len(SPLITS):
            raise ConfigError(
                f"dataset.root={self.root} has {len(self.folders)} class folders with images, and train, val "
                f"and test need at least one class each, so {self.hint}."
            )
        self.assignment = self._by_files(split_files) if split_files else self._by_ratio(split_ratio, split_seed)
        digest = hashlib.sha1(repr((str(self.root), self.assignment)).encode(), usedforsecurity=False)
        self.tag = digest.hexdigest()[:12]  # caches of different folders or splits never collide

    def cache_stem(self, split: str) -> str:
        return f"{self.name}_{self.tag}_{self.image_size}px_{self.channels}ch_{split}"

    def _by_ratio(self, ratio: Any, seed: Any) -> dict[str, list[str]]:
        values = list(ratio) if hasattr(ratio, "__iter__") else []  # a list, tuple or ListConfig
        if (
            len(values) != 3
            or any(isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0 for v in values)
            or abs(sum(values) - 1) > 1e-6
        ):
            raise ConfigError(
                f"dataset.split_ratio={ratio!r} is not allowed: it must be 3 positive fractions "
                f"[train, val, test] that sum to 1."
            )
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ConfigError(f"dataset.split_seed={seed!r} is not allowed: it must be a non-negative integer.")
        n = len(self.folders)
        val = max(1, round(values[1] * n))
        test = max(1, round(values[2] * n))
        train = n - val - test
        if train < 1:
            raise ConfigError(
                f"dataset.split_ratio={values} is not allowed with {n} classes: it leaves no training class, "
                f"so lower the val and test fractions."
            )
        order = [self.folders[i] for i in np.random.default_rng(seed).permutation(n)]
        return {
            "train": sorted(order[:train]),
            "val": sorted(order[train : train + val]),
            "test": sorted(order[-test:]),
        }

    def _by_files(self, files: Any) -> dict[str, list[str]]:
        if not hasattr(files, "keys") or set(files.keys()) != set(SPLITS):
            raise ConfigError(
                f"dataset.split_files={files!r} is not allowed: it must map train, val and test to "
                f"class-list files, or be null to split by dataset.split_ratio."
            )
        assignment: dict[str, list[str]] = {}
        seen: dict[str, str] = {}
        for split in SPLITS:
            path = Path(files[split]).expanduser()
            path = path if path.is_absolute() else self.root / path
            if not path.is_file():
                raise ConfigError(f"dataset.split_files.{split}={files[split]} is not allowed: {path} is not a file.")
            names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
            unknown = [name for name in names if name not in self.folders]
            if unknown or not names:
                problem = f"{unknown[0]} is not a class folder of dataset.root" if unknown else "it lists no class"
                raise ConfigError(f"dataset.split_files.{split}={files[split]} is not allowed: {problem}.")
            for name in names:
                if name in seen:
                    raise ConfigError(
                        f"dataset.split_files.{split}={files[split]} is not allowed: class {name} is also in "
                        f"the {seen[name]} split, and a class belongs to one split only."
                    )
                seen[name] = split
            assignment[split] = names
        return assignment

    def _listed(self, split: str) -> tuple[list[Path], list[int]]:
        files: list[Path] = []
        labels: list[int] = []
        for label, name in enumerate(self.assignment[split]):
            found = image_files(self.root / name)
            files += found
            labels += [label] * len(found)
        return files, labels

    def _fingerprint(self, split: str) -> Any:
        return folder_fingerprint(self._listed(split)[0])

    def _items(self, split: str) -> tuple[list[Item], list[int], list[str]]:
        files, labels = self._listed(split)
        return [("", str(path), None) for path in files], labels, list(self.assignment[split])
