"""Omniglot: 1623 handwritten characters from 50 alphabets, 20 drawings each.

The two official archives are decoded once (PNG -> 'L' -> LANCZOS resize) into one uint8
tensor and cached with `torch.save`, so later runs load it in well under a second.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import io
import logging
import multiprocessing
import os
import pickle
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
import zlib
from concurrent.futures import ProcessPoolExecutor
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from metarun.datasets.base import ClassImages
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
SPLITS = ("train", "val", "test")
LAKE_VAL_ALPHABETS = 5  # the last 5 background alphabets (sorted) validate Lake's split
CACHE_FORMAT = 1
DOWNLOAD_TIMEOUT_S = 60.0
MIN_IMAGES_PER_WORKER = 4000  # below this a process pool costs more than it saves
CHUNK = 2000  # images per decoding task
# Errors of a truncated or corrupt archive: zip structure, deflate stream, PNG decoding
# (PIL raises OSError/UnidentifiedImageError, or SyntaxError for a broken chunk).
CORRUPT = (zipfile.BadZipFile, zlib.error, EOFError, OSError, SyntaxError)
FETCH_HINT = (
    "put the official images_background.zip and images_evaluation.zip from "
    "github.com/brendenlake/omniglot there or set METARUN_DATA_DIR to a folder with omniglot/"
)


def prepare_image(image: Image.Image, size: int) -> np.ndarray:
    """One image as Omniglot is decoded for training: grey ('L'), LANCZOS-resized to
    ``size``: uint8 ``[1, size, size]``. `metarun-predict` prepares a user's images with it."""
    return np.asarray(image.convert("L").resize((size, size), Image.Resampling.LANCZOS))[None]


class Omniglot:
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
        cache_dir: where the decoded tensor is cached as ``omniglot_<image_size>.pt``.
        image_size: side of the square images after the LANCZOS resize (originals: 105).
        split_scheme: "vinyals" or "lake".
        rotations: for "lake", whether each rotation of a character is its own class.
        download: fetch missing archives from github.com/brendenlake/omniglot (md5-checked).
    """

    channels = 1
    prepare_image = staticmethod(prepare_image)

    def __init__(
        self,
        root: str,
        cache_dir: str,
        image_size: int = 28,
        split_scheme: str = "vinyals",
        rotations: bool = True,
        download: bool = True,
    ) -> None:
        if not isinstance(image_size, int) or isinstance(image_size, bool) or image_size <= 0:
            raise ConfigError(f"dataset.image_size={image_size!r} is not allowed: it must be a positive integer.")
        if split_scheme not in SCHEMES:
            raise ConfigError(f"dataset.split_scheme={split_scheme!r} is not allowed: use one of {', '.join(SCHEMES)}.")
        self.root = Path(root).expanduser().resolve()
        self.cache_dir = Path(cache_dir).expanduser().resolve()
        self.image_size, self.split_scheme = image_size, split_scheme
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
        self._splits: dict[str, ClassImages] = {}

    def classes(self, name: str) -> list[str]:
        """Class names of split `name`, one per label: ``Alphabet/characterNN/rotDDD``."""
        return [f"{key}/rot{90 * turns:03d}" for key, turns in self._class_list(name)]

    def split(self, name: str) -> ClassImages:
        """The "train", "val" or "test" split: uint8 ``[N, 1, H, W]``, built once."""
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
            ]  # each [20, 1, H, W]
            sizes = torch.tensor([len(block) for block in blocks])  # [num_classes]
            labels = torch.repeat_interleave(torch.arange(len(classes)), sizes)  # [N]
            self._splits[name] = ClassImages(torch.cat(blocks), labels, f"omniglot/{self.split_scheme}/{name}")
        return self._splits[name]

    def _class_list(self, name: str) -> list[tuple[str, int]]:
        """(character key, quarter turns) of each class of split `name`, in label order."""
        if name not in SPLITS:
            raise ValueError(f"split {name!r} is not one of {SPLITS}")
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
            _download(url, archive, OFFICIAL["md5"][part])
        except (OSError, http.client.HTTPException) as error:
            reason = error.reason if isinstance(error, urllib.error.URLError) else error
            raise ConfigError(
                f"dataset.root={self.root} has no {archive.name}; downloading {url} failed ({reason}), so {FETCH_HINT}."
            ) from error
        return archive

    def _load(self, sources: list[Path]) -> tuple[Tensor, Tensor, list[str], int]:
        """images uint8 [N, 1, H, W], labels int64 [N], character keys, #background keys."""
        cache = self.cache_dir / f"omniglot_{self.image_size}.pt"
        fingerprint = [source.stat().st_size if source.is_file() else "folder" for source in sources]
        if cache.is_file():
            try:
                data = torch.load(cache, weights_only=True)
                if data.get("format") == CACHE_FORMAT and data["sources"] == fingerprint:
                    log.info("Omniglot: loaded %d images from cache %s", len(data["labels"]), cache)
                    return data["images"], data["labels"], data["keys"], data["num_background"]
                log.info("Omniglot: cache %s is stale, decoding again", cache)
            except (OSError, RuntimeError, EOFError, KeyError, AttributeError, pickle.UnpicklingError) as error:
                log.warning("Omniglot: cannot read cache %s (%s), decoding again", cache, error)
        start = time.perf_counter()
        images, labels, keys, num_background = self._decode(sources)
        log.info("Omniglot: decoded %d images in %.1f s", len(labels), time.perf_counter() - start)
        data = {
            "format": CACHE_FORMAT,
            "sources": fingerprint,
            "images": images,
            "labels": labels,
            "keys": keys,
            "num_background": num_background,
        }
        try:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.cache_dir, prefix=f".{cache.name}.", suffix=".tmp")
            os.close(fd)
            try:
                torch.save(data, tmp)
                os.replace(tmp, cache)  # atomic: concurrent runs never read a partial cache
            finally:
                Path(tmp).unlink(missing_ok=True)
        except OSError as error:
            log.warning("Omniglot: cannot write cache %s (%s); the next run decodes again", cache, error)
        return images, labels, keys, num_background

    def _decode(self, sources: list[Path]) -> tuple[Tensor, Tensor, list[str], int]:
        """Decode every PNG of both parts, in sorted order, with up to 2 processes."""
        tasks: list[tuple[Path, list[str]]] = []  # (source, its PNG members), one per part
        for part, source in zip(PARTS, sources):
            try:
                if source.is_file():
                    with zipfile.ZipFile(source) as archive:
                        names = archive.namelist()
                else:
                    names = [p.relative_to(source).as_posix() for p in (source / part).glob("*/*/*.png")]
            except CORRUPT as error:
                raise self._corrupt(source, error) from error
            members = sorted(n for n in names if n.endswith(".png") and n.split("/")[0] == part and n.count("/") == 3)
            if not members:
                raise ConfigError(
                    f"dataset.root={self.root}: {source} holds no {part}/<Alphabet>/<character>/*.png "
                    f"images, so delete it and {FETCH_HINT}."
                )
            tasks.append((source, members))
        chunks = [(source, members[i : i + CHUNK]) for source, members in tasks for i in range(0, len(members), CHUNK)]
        total = sum(len(members) for _, members in tasks)
        # Linux only: fork, as the workers run only zipfile and PIL and so skip re-importing
        # torch (~2 s each with spawn); on 2 cores this decodes ~1.6x faster than in-process.
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
        workers = min(2, cpus, total // MIN_IMAGES_PER_WORKER)
        pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) if workers > 1 else None
        with pool or contextlib.nullcontext():
            results = (pool.map if pool else map)(
                _decode_chunk, *zip(*chunks), [self.image_size] * len(chunks)
            )  # lazy, in order
            arrays = []
            for source, _ in chunks:
                try:
                    arrays.append(next(results))  # [n, H, W]
                except CORRUPT as error:
                    raise self._corrupt(source, error) from error
        images = torch.from_numpy(np.concatenate(arrays)).unsqueeze(1)  # [N, H, W] -> [N, 1, H, W]
        characters = [
            "/".join(member.split("/")[1:3]) for _, members in tasks for member in members
        ]  # [N] Alphabet/characterNN
        keys = list(dict.fromkeys(characters))  # sorted: background keys, then evaluation keys
        label_of = {key: i for i, key in enumerate(keys)}
        labels = torch.tensor([label_of[c] for c in characters], dtype=torch.long)  # [N]
        num_background = len(set(characters[: len(tasks[0][1])]))
        return images, labels, keys, num_background

    def _corrupt(self, source: Path, error: BaseException) -> ConfigError:
        return ConfigError(
            f"dataset.root={self.root}: {source} is truncated or corrupt ({type(error).__name__}: "
            f"{error}), so delete it and download it again (dataset.download=true) or {FETCH_HINT}."
        )


def _decode_chunk(source: Path, members: list[str], size: int) -> np.ndarray:
    """PNGs `members` of a zip (or of a folder) `source` as uint8 ``[n, size, size]``."""
    out = np.empty((len(members), size, size), dtype=np.uint8)
    archive = zipfile.ZipFile(source) if source.is_file() else None
    try:
        for i, member in enumerate(members):
            data = archive.read(member) if archive else (source / member).read_bytes()
            with Image.open(io.BytesIO(data)) as image:
                out[i] = prepare_image(image, size)[0]
    finally:
        if archive:
            archive.close()
    return out


def _vinyals_characters(name: str) -> list[str]:
    """The characters of Vinyals' split `name` from the package copy, in Snell's file order."""
    text = (resources.files("metarun.datasets") / "splits" / "vinyals" / f"{name}.txt").read_text()
    return text.split()


def _download(url: str, target: Path, md5: str) -> None:
    """Fetch `url` into `target` via a temporary file; a wrong md5 deletes it (ConfigError)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    digest = hashlib.md5(usedforsecurity=False)
    log.info("Omniglot: downloading %s", url)
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response:
            while block := response.read(1 << 20):
                digest.update(block)
                out.write(block)
        if digest.hexdigest() != md5:
            raise ConfigError(
                f"dataset.root={target.parent}: {url} has md5 {digest.hexdigest()} but the official "
                f"{target.name} has md5 {md5}, so it was deleted; retry, or put the official archive there."
            )
        os.replace(tmp, target)
    finally:
        Path(tmp).unlink(missing_ok=True)
