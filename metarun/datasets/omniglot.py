"""Omniglot: 1623 handwritten characters from 50 alphabets, 20 drawings each.

The two official archives are decoded once (PNG -> 'L' -> LANCZOS resize) into one uint8
tensor and cached memory-mapped by the shared image layer (`metarun.datasets.images`), so
later runs start in well under a second.
"""

from __future__ import annotations

import http.client
import logging
import urllib.error
import zipfile
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from metarun.datasets import images as image_layer
from metarun.datasets.base import ClassImages
from metarun.datasets.images import CORRUPT, DEFAULT_MAX_PIXELS, SPLITS, ImageDataset
from metarun.errors import ConfigError

log = logging.getLogger(__name__)

PARTS = ("images_background", "images_evaluation")
# Where `download=True` fetches the archives, and their md5 (the same as torchvision's).
OFFICIAL: dict[str, Any] = {
    "base_url": "https://github.com/brendenlake/omniglot/raw/master/python",
    "md5": {
        "images_background": "68d2efa1b9178cc56df9314c21c6e718",
        "images_evaluation": "6b91aef0f799c5bb55b94e3f2daec811",
    },
}
SCHEMES = ("vinyals", "lake")
TRAIN_ON = ("train", "train+val")
LAKE_VAL_ALPHABETS = 5  # the last 5 background alphabets (sorted) validate Lake's split
FETCH_HINT = (
    "put the official images_background.zip and images_evaluation.zip from "
    "github.com/brendenlake/omniglot there or set METARUN_DATA_DIR to a folder with omniglot/"
)


class Omniglot(ImageDataset):
    """Omniglot (Lake, Salakhutdinov & Tenenbaum, Science 2015) as in-memory class splits.

    ``split_scheme="vinyals"`` is the few-shot split of Vinyals et al. (2016) as published
    with Snell et al.'s Prototypical Networks (2017): 1028/172/423 characters, each in 4
    rotations (0/90/180/270 degrees), so 4112/688/1692 classes. The split files ship with
    the package (``splits/vinyals/*.txt``, MIT) as one character per line; each line stands
    for the 4 consecutive ``Alphabet/characterNN/rotDDD`` lines of Snell's file. The
    rotation is counter-clockwise, like Snell's PIL ``Image.rotate(deg)``.
    ``split_scheme="lake"`` is Lake's split: background alphabets train (the last 5 in
    sorted order validate), evaluation alphabets test; ``rotations`` adds the 3 rotations
    of each character as classes (Vinyals always uses them).

    Images keep the archives' intensities: background 255, ink near 0. ``prepare_image``
    turns any image into a training image (grey, resized), for `metarun-predict`.

    Args:
        root: folder with ``images_background.zip`` and ``images_evaluation.zip`` (or their
            extracted folders); relative paths are resolved against the current directory.
        cache_dir: where the decoded tensor is cached as ``omniglot_<image_size>.npy`` (+ ``.pt``).
        image_size: side of the square images after the LANCZOS resize (originals: 105).
        channels: 1 (grey, as published) or 3 (the grey image in each of R, G, B), for a
            backbone that expects RGB.
        mean, std: per-channel normalisation of the [0, 1] pixels, or None (as published).
        split_scheme: "vinyals" or "lake".
        rotations: for "lake", whether each rotation of a character is its own class.
        train_on: "train", or "train+val": the training split also holds the validation
            classes, as Snell et al. (2017) trained their final Omniglot models. Validation
            still runs on the validation classes, which are then seen in training, so its
            numbers are optimistic and choose the best checkpoint less well.
        download: fetch missing archives from github.com/brendenlake/omniglot (md5-checked).
    """

    name = "omniglot"
    hint = FETCH_HINT

    def __init__(
        self,
        root: str,
        cache_dir: str,
        image_size: int = 28,
        channels: int = 1,
        mean: list[float] | None = None,
        std: list[float] | None = None,
        max_image_pixels: int = DEFAULT_MAX_PIXELS,
        split_scheme: str = "vinyals",
        rotations: bool = True,
        train_on: str = "train",
        download: bool = True,
    ) -> None:
        super().__init__(root, cache_dir, image_size, channels, mean, std, max_image_pixels)
        if split_scheme not in SCHEMES:
            raise ConfigError(f"dataset.split_scheme={split_scheme!r} is not allowed: use one of {', '.join(SCHEMES)}.")
        if train_on not in TRAIN_ON:
            raise ConfigError(
                f"dataset.train_on={train_on!r} is not allowed: use one of {', '.join(TRAIN_ON)} (train+val: "
                f"the training split also holds the validation classes, as Snell et al. 2017)."
            )
        self.split_scheme, self.train_on = split_scheme, train_on
        self.rotations, self.download = rotations, download
        sources = [self._source(part) for part in PARTS]
        self.images, self.labels, self.keys, self.num_background = self._load(sources)
        self._vinyals = {name: _vinyals_characters(name) for name in SPLITS} if split_scheme == "vinyals" else {}
        missing = sorted({c for chars in self._vinyals.values() for c in chars} - set(self.keys))
        if missing:
            raise ConfigError(
                f"dataset.split_scheme=vinyals needs all 1623 Omniglot characters but dataset.root="
                f"{self.root} lacks {len(missing)} of them (e.g. {missing[0]}), so {FETCH_HINT}."
            )

    def classes(self, name: str) -> list[str]:
        """Class names of split `name`, one per label: ``Alphabet/characterNN/rotDDD``."""
        return [f"{key}/rot{90 * turns:03d}" for key, turns in self._class_list(name)]

    def class_count(self, name: str) -> int:
        """Classes of split `name`, from the split lists (nothing is decoded)."""
        return len(self._class_list(name))

    def superclasses(self, name: str) -> list[str]:
        """The alphabet of each class of split `name` (its four rotations included)."""
        return [key.split("/")[0] for key, _ in self._class_list(name)]

    def split(self, name: str) -> ClassImages:
        """The "train", "val" or "test" split: uint8 ``[N, C, H, W]``, built once."""
        if name not in self._splits:
            classes = self._class_list(name)
            members = torch.split(
                torch.argsort(self.labels, stable=True), torch.bincount(self.labels).tolist()
            )  # image ids per character
            label_of = {key: i for i, key in enumerate(self.keys)}
            # torch.rot90 on dims (H, W) turns counter-clockwise, as PIL's rotate(90 * turns).
            # index_select: advanced indexing x[ids] can be ~1000x slower here (OpenMP).
            blocks = [
                torch.rot90(self.images.index_select(0, members[label_of[key]]), turns, dims=(-2, -1))
                for key, turns in classes
            ]  # each [20, C, H, W]
            sizes = torch.tensor([len(block) for block in blocks])  # [num_classes]
            labels = torch.repeat_interleave(torch.arange(len(classes)), sizes)  # [N]
            what = f"omniglot/{self.split_scheme}/{self.train_on if name == 'train' else name}"
            self._splits[name] = ClassImages(
                torch.cat(blocks), labels, what, self.mean, self.std, self.classes(name), self.superclasses(name)
            )
        return self._splits[name]

    def _class_list(self, name: str) -> list[tuple[str, int]]:
        """(character key, quarter turns) of each class of split `name`, in label order."""
        if name not in SPLITS:
            raise ValueError(f"split {name!r} is not one of {SPLITS}")
        if name == "train" and self.train_on == "train+val":
            return self._listed("train") + self._listed("val")
        return self._listed(name)

    def _listed(self, name: str) -> list[tuple[str, int]]:
        """(character key, quarter turns) of each class the split scheme puts in split `name`."""
        if self.split_scheme == "vinyals":
            return [(key, turns) for key in self._vinyals[name] for turns in range(4)]
        background, evaluation = self.keys[: self.num_background], self.keys[self.num_background :]
        val_alphabets = set(sorted({key.split("/")[0] for key in background})[-LAKE_VAL_ALPHABETS:])
        if name == "test":
            characters = evaluation
        else:
            characters = [key for key in background if (key.split("/")[0] in val_alphabets) == (name == "val")]
        return [(key, turns) for key in characters for turns in (range(4) if self.rotations else (0,))]

    def _source(self, part: str) -> Path:
        """The archive of `part`, or `root` when `part` is extracted there; downloads if needed."""
        archive = self.root / f"{part}.zip"
        if archive.is_file():
            return archive
        if (self.root / part).is_dir():
            return self.root
        if not self.download:
            raise ConfigError(
                f"dataset.root={self.root} has no {archive.name} (nor an extracted {part}/ folder) and "
                f"dataset.download=false, so {FETCH_HINT}."
            )
        url = f"{OFFICIAL['base_url']}/{archive.name}"
        try:
            image_layer.download(url, archive, OFFICIAL["md5"][part], "Omniglot")
        except (OSError, http.client.HTTPException) as error:
            reason = error.reason if isinstance(error, urllib.error.URLError) else error
            raise ConfigError(
                f"dataset.root={self.root} has no {archive.name}; downloading {url} failed ({reason}), so {FETCH_HINT}."
            ) from error
        return archive

    def _load(self, sources: list[Path]) -> tuple[Tensor, Tensor, list[str], int]:
        """images uint8 [N, C, H, W] (memory-mapped), labels int64 [N], character keys, #background keys."""
        stem = f"omniglot_{self.image_size}" + ("" if self.channels == 1 else "_rgb")
        fingerprint = [source.stat().st_size if source.is_file() else "folder" for source in sources]

        def build(allocate: image_layer.Allocate) -> tuple[Tensor, Tensor, dict[str, Any]]:
            images, labels, keys, num_background = self._decode(sources, allocate)
            return images, labels, {"keys": keys, "num_background": num_background}

        images, labels, meta = image_layer.cached(self.cache_dir / stem, fingerprint, build, "Omniglot")
        return images, labels, list(meta["keys"]), int(meta["num_background"])

    def _decode(
        self, sources: list[Path], allocate: image_layer.Allocate | None = None
    ) -> tuple[Tensor, Tensor, list[str], int]:
        """Decode every PNG of both parts, in sorted order (the shared layer's process pool)."""
        members_of: list[list[str]] = []  # the PNG members of each part
        items: list[image_layer.Item] = []
        for part, source in zip(PARTS, sources):
            try:
                if source.is_file():
                    with zipfile.ZipFile(source) as archive:
                        names = archive.namelist()
                else:
                    names = [p.relative_to(source).as_posix() for p in (source / part).glob("*/*/*.png")]
            except CORRUPT as error:
                raise self._corrupt(str(source), image_layer.failure_reason(error)) from error
            members = sorted(n for n in names if n.endswith(".png") and n.split("/")[0] == part and n.count("/") == 3)
            if not members:
                raise ConfigError(
                    f"dataset.root={self.root}: {source} holds no {part}/<Alphabet>/<character>/*.png "
                    f"images, so delete it and {FETCH_HINT}."
                )
            members_of.append(members)
            items += [(str(source), m, None) if source.is_file() else ("", str(source / m), None) for m in members]
        out = allocate((len(items), self.channels, self.image_size, self.image_size)) if allocate else None
        images = image_layer.decode(
            items, self.image_size, self.channels, self._corrupt, out, self.max_image_pixels
        )  # [N, C, H, W]
        characters = [
            "/".join(member.split("/")[1:3]) for members in members_of for member in members
        ]  # [N] Alphabet/characterNN
        keys = list(dict.fromkeys(characters))  # sorted: background keys, then evaluation keys
        label_of = {key: i for i, key in enumerate(keys)}
        labels = torch.tensor([label_of[c] for c in characters], dtype=torch.long)  # [N]
        num_background = len(set(characters[: len(members_of[0])]))
        return images, labels, keys, num_background

    def _corrupt(self, what: str, reason: str) -> ConfigError:
        return ConfigError(
            f"dataset.root={self.root}: {what} is truncated or corrupt ({reason}), so delete it "
            f"and download it again (dataset.download=true) or {FETCH_HINT}."
        )


def _vinyals_characters(name: str) -> list[str]:
    """The characters of Vinyals' split `name` from the package copy, in Snell's file order."""
    text = (resources.files("metarun.datasets") / "splits" / "vinyals" / f"{name}.txt").read_text()
    return text.split()
