"""The shared image layer: find or download a source, decode every image once, cache it
memory-mapped.

Every image dataset (Omniglot, mini-ImageNet, tiered-ImageNet, CIFAR-FS, FC100, CUB, a
user's folder) goes through the same steps, written once here:

1. `find_source` finds the archive or folder under ``dataset.root`` (or downloads it,
   md5-checked, where the licence allows) and says where to put it when it cannot.
2. `decode` turns a list of `Item`s (a file, a zip member, encoded bytes or a decoded
   array, with an optional crop box) into one uint8 tensor ``[N, C, H, W]``, with a small
   process pool for large sets; a damaged image becomes one sentence naming it.
3. `cached` stores that tensor as ``<stem>.npy`` plus its labels and metadata in
   ``<stem>.pt``, written atomically, and loads it back **memory-mapped**: every DDP rank
   and every process reading the same cache shares one copy of the pages (tiered-ImageNet
   at 84×84 is ~16 GB), and a second run starts without decoding.

`ImageDataset` is the base of the class-folder datasets: a subclass says how to list a
split's images (`_items`) and what identifies its sources (`_fingerprint`).
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import http.client
import io
import logging
import multiprocessing
import os
import pickle
import re
import signal
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
import warnings
import zipfile
import zlib
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from importlib import resources
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from metarun.checks import integer_at_least, positive_int
from metarun.datasets.base import SPLITS, ClassImages, Dataset
from metarun.errors import ConfigError
from metarun.run_directory import pid_alive

log = logging.getLogger(__name__)

CACHE_FORMAT = 2
DOWNLOAD_TIMEOUT_S = 60.0
MIN_IMAGES_PER_WORKER = 4000  # below this a process pool costs more than it saves
CHUNK = 2000  # images per decoding task
PR_SET_PDEATHSIG = 1  # prctl(2): the signal a process gets when its parent ends
# Errors of a truncated or corrupt archive or image: zip structure, deflate stream, image
# decoding (PIL raises OSError/UnidentifiedImageError, or SyntaxError for a broken chunk),
# a pickle cut short (EOFError, UnpicklingError).
CORRUPT = (
    zipfile.BadZipFile,
    tarfile.TarError,
    zlib.error,
    EOFError,
    OSError,
    SyntaxError,
    ValueError,
    pickle.UnpicklingError,
)

# The most pixels an image may have before it is refused as a possible decompression bomb:
# PIL's own default (about 9,459 x 9,459); dataset.max_image_pixels raises it.
DEFAULT_MAX_PIXELS = 89_478_485


class ImageTooLarge(ValueError):
    """An image with more pixels than allowed (``dataset.max_image_pixels``)."""

    def __init__(self, pixels: int, limit: int, size: tuple[int, int] | None = None) -> None:
        self.pixels, self.limit = pixels, limit
        shape = f"{size[0]}×{size[1]} = " if size else ""
        super().__init__(f"{shape}{pixels:,} pixels, more than {limit:,}")


@contextlib.contextmanager
def _pil_limit(max_pixels: int) -> Any:
    """PIL's decompression-bomb limit set to ``max_pixels`` while an image is opened (PIL has
    no per-call setting, so its module value is set and put back), its warning silenced:
    `open_image` makes the decision and names the file."""
    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def open_image(source: Any, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """``Image.open(source)`` (a path or a binary stream; nothing is decoded yet), or
    `ImageTooLarge` when it has more than ``max_pixels`` pixels."""
    with _pil_limit(max_pixels):
        try:
            image = Image.open(source)
        except Image.DecompressionBombError as error:  # more than twice the limit
            found = re.search(r"\((\d+) pixels\)", str(error))
            raise ImageTooLarge(int(found.group(1)) if found else 2 * max_pixels + 1, max_pixels) from None
    width, height = image.size
    if width * height > max_pixels:
        image.close()
        raise ImageTooLarge(width * height, max_pixels, (width, height))
    return image


def failure_reason(error: BaseException) -> str:
    """A decoding error as a reason for a sentence: its type and message, without the
    in-memory stream PIL names (``<_io.BytesIO object at 0x...>``)."""
    if isinstance(error, UnidentifiedImageError):
        return "it is not an image PIL can read (its contents are not PNG, JPEG or another image format)"
    text = re.sub(r"\s*<_io\.\w+ object at 0x[0-9a-f]+>", "", str(error)).strip()
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


# One image to decode: (zip archive path, or "" for a plain file / in-memory data;
# the member or file path, encoded bytes, or a decoded uint8 array [H, W] or [H, W, C];
# a crop box (left, upper, right, lower) in pixels, or None).
Item = tuple[str, Any, "tuple[float, float, float, float] | None"]


def check_image_args(image_size: Any, channels: Any) -> None:
    """One sentence for a bad ``dataset.image_size`` or ``dataset.channels``."""
    integer_at_least("dataset.image_size", image_size, 1)
    if channels not in (1, 3) or isinstance(channels, bool):
        raise ConfigError(f"dataset.channels={channels!r} is not allowed: use 1 (grey) or 3 (RGB).")


def prepare_image(
    image: Image.Image, size: int, channels: int = 3, box: tuple[float, float, float, float] | None = None
) -> np.ndarray:
    """One image as the image datasets decode it: converted to grey ('L', ``channels=1``) or
    RGB, cropped to ``box`` if given, LANCZOS-resized to ``size``: uint8 ``[C, size, size]``.
    `metarun-predict` prepares a user's images with the same function."""
    image = image.convert("L" if channels == 1 else "RGB")
    if box is not None:
        left, upper, right, lower = (int(round(v)) for v in box)
        image = image.crop((left, upper, right, lower))
    array = np.asarray(image.resize((size, size), Image.Resampling.LANCZOS))
    return array[None] if channels == 1 else array.transpose(2, 0, 1)


def _open(member: Any, archive: zipfile.ZipFile | None, max_pixels: int) -> Image.Image:
    if isinstance(member, np.ndarray) and (member.ndim == 3 or (member.ndim == 2 and member.shape[1] > 1)):
        return Image.fromarray(member)  # decoded pixels [H, W] or [H, W, C]
    if isinstance(member, (bytes, np.ndarray)):  # encoded bytes (e.g. a PNG in a pickle)
        data = member.tobytes() if isinstance(member, np.ndarray) else member
    else:
        data = archive.read(member) if archive else Path(member).read_bytes()
    return open_image(io.BytesIO(data), max_pixels)


def _decode_chunk(items: list[Item], size: int, channels: int, max_pixels: int) -> np.ndarray:
    """`items` as uint8 ``[n, C, size, size]``; raises (index, error) as `_Failed`."""
    out = np.empty((len(items), channels, size, size), dtype=np.uint8)
    archives: dict[str, zipfile.ZipFile] = {}
    try:
        for i, (container, member, box) in enumerate(items):
            try:
                if container and container not in archives:
                    archives[container] = zipfile.ZipFile(container)
                with _open(member, archives.get(container), max_pixels) as image:
                    out[i] = prepare_image(image, size, channels, box)
            except ImageTooLarge as error:
                raise _Failed(i, str(error), too_large=True) from None
            except CORRUPT as error:
                raise _Failed(i, failure_reason(error)) from None
    finally:
        for archive in archives.values():
            archive.close()
    return out


class _Failed(Exception):
    """A worker's decoding error: the item's position in its chunk and the reason."""

    def __init__(self, index: int, reason: str, too_large: bool = False) -> None:
        super().__init__(index, reason, too_large)
        self.index, self.reason, self.too_large = index, reason, too_large


def describe(item: Item) -> str:
    container, member, _ = item
    if container:
        return f"{container}:{member}"
    return str(member) if isinstance(member, (str, Path)) else "an image stored in the source"


def _die_with(parent: int) -> None:
    """A decode worker ends when the process that forked it does (Linux's PR_SET_PDEATHSIG):
    a run killed with SIGKILL (the out-of-memory killer, a lost node) leaves no orphans."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before the call above
        os._exit(1)


def decode(
    items: Sequence[Item],
    size: int,
    channels: int,
    corrupt: Callable[[str, str], ConfigError],
    out: np.ndarray | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Tensor:
    """Decode `items` in order into uint8 ``[N, C, size, size]``, with up to 2 processes.

    ``corrupt(what, reason)`` builds the one-sentence error for a damaged image. ``out``
    (e.g. the cache file, memory-mapped by `cached`'s ``allocate``) receives the images, so
    a large set is never held in memory whole; by default a new array. An image of more
    than ``max_pixels`` pixels is refused in one sentence naming it.
    """
    chunks = [list(items[i : i + CHUNK]) for i in range(0, len(items), CHUNK)]
    # Linux only: fork, as the workers run only zipfile and PIL and so skip re-importing
    # torch (~2 s each with spawn); on 2 cores this decodes ~1.6x faster than in-process.
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
    workers = min(2, cpus, len(items) // MIN_IMAGES_PER_WORKER)
    pool = (
        ProcessPoolExecutor(
            workers, mp_context=multiprocessing.get_context("fork"), initializer=_die_with, initargs=(os.getpid(),)
        )
        if workers > 1
        else None
    )
    if out is None:
        out = np.empty((len(items), channels, size, size), dtype=np.uint8)
    with pool or contextlib.nullcontext():
        n = len(chunks)
        results = (pool.map if pool else map)(_decode_chunk, chunks, [size] * n, [channels] * n, [max_pixels] * n)
        for start, chunk in zip(range(0, len(items), CHUNK), chunks):
            try:
                out[start : start + len(chunk)] = next(results)
            except _Failed as failed:
                what = describe(chunk[failed.index])
                if failed.too_large:
                    raise ConfigError(
                        f"{what} is not allowed: it has {failed.reason} (dataset.max_image_pixels, a guard "
                        f"against decompression bombs), so shrink or remove it, or raise dataset.max_image_pixels."
                    ) from None
                raise corrupt(what, failed.reason) from None
    return torch.from_numpy(out)


Allocate = Callable[[tuple[int, ...]], np.ndarray]


def cached(
    path: Path, fingerprint: Any, build: Callable[[Allocate], tuple[Tensor, Tensor, dict[str, Any]]], what: str
) -> tuple[Tensor, Tensor, dict[str, Any]]:
    """``(images, labels, meta)`` from the cache ``<path>.npy`` / ``<path>.pt``, built on a miss.

    ``build(allocate)`` decodes into ``allocate(shape)``: a uint8 array memory-mapped onto
    the new cache file (renamed into place once complete), so even tiered-ImageNet's 16 GB
    are written without being held in memory. The images come back memory-mapped
    (copy-on-write, so a stray in-place write never reaches the file): processes that read
    one cache share its pages. A stale (other ``fingerprint``) or unreadable cache is
    rebuilt; one that cannot be written is logged and the run goes on from memory.
    """
    array_path, meta_path = path.with_suffix(".npy"), path.with_suffix(".pt")
    loaded = _load_cache(array_path, meta_path, fingerprint, what)
    if loaded is not None:
        return loaded
    _remove_partial_caches(array_path, what)
    written: list[tuple[Path, np.memmap]] = []  # the temporary cache file build() decodes into

    def allocate(shape: tuple[int, ...]) -> np.ndarray:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{array_path.name}.{os.getpid()}.", suffix=".tmp")
            os.close(fd)
            array = np.lib.format.open_memmap(name, mode="w+", dtype=np.uint8, shape=shape)
        except OSError as error:
            log.warning("%s: cannot write cache %s (%s); decoding in memory", what, array_path, error)
            return np.empty(shape, dtype=np.uint8)
        written.append((Path(name), array))
        return array

    start = time.perf_counter()
    try:
        images, labels, meta = build(allocate)
        log.info("%s: decoded %d images in %.1f s", what, len(labels), time.perf_counter() - start)
        try:
            if written:
                tmp, array = written[-1]
                array.flush()
                os.replace(tmp, array_path)
            else:
                path.parent.mkdir(parents=True, exist_ok=True)
                _atomic(array_path, lambda f: np.save(f, images.numpy()))
            record = {"format": CACHE_FORMAT, "fingerprint": fingerprint, "shape": list(images.shape), "labels": labels}
            _atomic(meta_path, lambda f: torch.save({**record, "meta": meta}, f))
        except OSError as error:
            log.warning("%s: cannot write cache %s (%s); the next run decodes again", what, array_path, error)
            return images, labels, meta
    finally:
        for tmp, _ in written:
            tmp.unlink(missing_ok=True)  # a failed build leaves no partial cache
    return _load_cache(array_path, meta_path, fingerprint, what) or (images, labels, meta)


def _remove_partial_caches(array_path: Path, what: str) -> None:
    """Remove the temporary cache files of runs that ended while decoding (killed: nothing
    else leaves one), named ``.<cache>.<pid>.<random>.tmp``; a live process's is kept."""
    for tmp in array_path.parent.glob(f".{array_path.name}.*.tmp"):
        pid = tmp.name[len(array_path.name) + 2 :].split(".", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)):
            size = tmp.stat().st_size if tmp.exists() else 0
            tmp.unlink(missing_ok=True)
            log.warning(
                "%s: removed %s (%.1f MB), the partial cache of process %s, which ended while decoding",
                what,
                tmp.name,
                size / 1e6,
                pid,
            )


def _load_cache(
    array_path: Path, meta_path: Path, fingerprint: Any, what: str
) -> tuple[Tensor, Tensor, dict[str, Any]] | None:
    if not (array_path.is_file() and meta_path.is_file()):
        return None
    try:
        record = torch.load(meta_path, weights_only=True)
        if record.get("format") != CACHE_FORMAT or record["fingerprint"] != fingerprint:
            log.info("%s: cache %s is stale, decoding again", what, array_path)
            return None
        array = np.load(array_path, mmap_mode="c")  # [N, C, H, W], pages shared between processes
        if list(array.shape) != record["shape"] or array.dtype != np.uint8:
            raise ValueError(f"shape {array.shape} {array.dtype} does not match {record['shape']}")
    except (OSError, RuntimeError, EOFError, KeyError, AttributeError, ValueError, pickle.UnpicklingError) as error:
        log.warning("%s: cannot read cache %s (%s), decoding again", what, array_path, error)
        return None
    log.info("%s: %d images memory-mapped from cache %s", what, len(record["labels"]), array_path)
    return torch.from_numpy(array), record["labels"], record["meta"]


def _atomic(target: Path, write: Callable[[str], None]) -> None:
    """Write through a temporary file and rename: concurrent runs never read a partial file."""
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        with open(tmp, "wb") as out:
            write(out)  # type: ignore[arg-type]  # np.save and torch.save take a file object
        os.replace(tmp, target)
    finally:
        Path(tmp).unlink(missing_ok=True)


def download(url: str, target: Path, md5: str, what: str) -> None:
    """Fetch `url` into `target` via a temporary file; a wrong md5 deletes it (ConfigError)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    digest = hashlib.md5(usedforsecurity=False)
    log.info("%s: downloading %s", what, url)
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


class _ArraysOnly(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays only: a pickle a user points at cannot
    run code (the shared mini-ImageNet, tiered-ImageNet and CIFAR files are such pickles)."""

    ALLOWED: ClassVar[set[tuple[str, str]]] = {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("_codecs", "encode"),
        ("collections", "OrderedDict"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"it holds a {module}.{name} object, and only arrays and containers are read")


def load_pickle(data: bytes | Path) -> Any:
    """A pickle of arrays and containers (Python 2 pickles too), refusing any other object.
    A file is read as a stream: only the unpickled objects are held, not its bytes too."""
    if isinstance(data, Path):
        with data.open("rb") as stream:
            return _ArraysOnly(stream, encoding="latin1").load()
    return _ArraysOnly(io.BytesIO(data), encoding="latin1").load()


def packaged_lines(*parts: str) -> list[str]:
    """The non-empty lines of a split file shipped in ``metarun/datasets/splits/``."""
    text = resources.files("metarun.datasets").joinpath("splits", *parts).read_text()
    return [line.strip() for line in text.splitlines() if line.strip()]


def check_normalization(mean: Sequence[float] | None, std: Sequence[float] | None, channels: int) -> None:
    for key, value in (("mean", mean), ("std", std)):
        if value is not None and (len(value) != channels or (key == "std" and min(value) <= 0)):
            rule = ("positive " if key == "std" else "") + ("number" if channels == 1 else "numbers")
            raise ConfigError(
                f"dataset.{key}={list(value)} is not allowed: it must be {channels} {rule} "
                f"(one per channel, dataset.channels={channels}) or null, so set dataset.mean and "
                f"dataset.std to {channels} value{'s' if channels > 1 else ''} each, or both to null."
            )
    if (mean is None) != (std is None):
        raise ConfigError("dataset.mean and dataset.std are not allowed one without the other: set both or neither.")


class ImageDataset(Dataset):
    """Base of the class-per-folder image datasets: train/val/test splits of labelled images,
    each decoded once into its own memory-mapped cache.

    A subclass sets ``name`` and ``hint`` (where to get the images), and implements
    ``_items(split) -> (items, labels, class names)`` and ``_fingerprint(split)``.

    Args:
        root: where the dataset's files are (relative paths: from the current directory).
        cache_dir: where the decoded splits are cached.
        image_size: side of the square images after the LANCZOS resize.
        channels: 3 (RGB) or 1 (grey); every image is converted.
        mean: per-channel mean of the [0, 1] pixels to normalise by, or null for none.
        std: per-channel standard deviation to normalise by (null with ``mean``).
        max_image_pixels: images with more pixels are refused (a decompression-bomb guard).
    """

    name: ClassVar[str] = "images"
    hint: ClassVar[str] = ""

    def __init__(
        self,
        root: str,
        cache_dir: str,
        image_size: int = 84,
        channels: int = 3,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        max_image_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> None:
        check_image_args(image_size, channels)
        self.max_image_pixels = int(positive_int("dataset.max_image_pixels", max_image_pixels) or 0)
        check_normalization(mean, std, channels)
        self.root = Path(root).expanduser().resolve()
        self.cache_dir = Path(cache_dir).expanduser().resolve()
        self.image_size, self.channels = image_size, channels
        self.mean = None if mean is None else [float(v) for v in mean]
        self.std = None if std is None else [float(v) for v in std]
        self._splits: dict[str, ClassImages] = {}
        self._classes: dict[str, list[str]] = {}

    @staticmethod
    def prepare_image(image: Image.Image, size: int, channels: int) -> np.ndarray:
        """A user's image prepared as this dataset's images are (for `metarun-predict`)."""
        return prepare_image(image, size, channels)

    def cache_stem(self, split: str) -> str:
        return f"{self.name}_{self.image_size}px_{self.channels}ch_{split}"

    def split(self, name: str) -> ClassImages:
        """The "train", "val" or "test" split, memory-mapped from its cache (built once)."""
        if name not in SPLITS:
            raise ValueError(f"split {name!r} is not one of {SPLITS}")
        if name not in self._splits:

            def build(allocate: Allocate) -> tuple[Tensor, Tensor, dict[str, Any]]:
                items, labels, classes = self._items(name)
                out = allocate((len(items), self.channels, self.image_size, self.image_size))
                images = decode(items, self.image_size, self.channels, self._corrupt, out, self.max_image_pixels)
                return images, torch.tensor(labels, dtype=torch.long), {"classes": classes}

            what = f"{self.name}/{name}"
            images, labels, meta = cached(self.cache_dir / self.cache_stem(name), self._fingerprint(name), build, what)
            self._classes[name] = list(meta["classes"])
            self._splits[name] = ClassImages(
                images, labels, what, self.mean, self.std, self._classes[name], self.superclasses(name)
            )
        return self._splits[name]

    def classes(self, name: str) -> list[str]:
        """Class names of split `name`, one per label."""
        self.split(name)
        return self._classes[name]

    def _items(self, split: str) -> tuple[list[Item], list[int], list[str]]:
        raise NotImplementedError

    def _fingerprint(self, split: str) -> Any:
        raise NotImplementedError

    def _corrupt(self, what: str, reason: str) -> ConfigError:
        return ConfigError(
            f"dataset.root={self.root}: {what} is truncated or corrupt ({reason}), so replace it; {self.hint}."
        )

    def _missing(self, what: str) -> ConfigError:
        return ConfigError(f"dataset.root={self.root} has no {what}, so {self.hint}.")

    def _fetch(self, url: str, target: Path, md5: str, what: str) -> None:
        """`download` ``url`` into ``target`` (md5-checked); a failed download is one sentence."""
        try:
            download(url, target, md5, what)
        except (OSError, http.client.HTTPException) as error:
            reason = error.reason if isinstance(error, urllib.error.URLError) else error
            raise ConfigError(
                f"dataset.root={self.root} has no {target.relative_to(self.root)}; downloading {url} failed "
                f"({reason}), so {self.hint}."
            ) from error


def folder_fingerprint(files: Sequence[Path]) -> list[Any]:
    """What identifies a list of image files for the cache: their count, total size, names."""
    digest = hashlib.sha1(usedforsecurity=False)
    total = 0
    for path in files:
        digest.update(str(path).encode())
        total += path.stat().st_size
    return [len(files), total, digest.hexdigest()]


def file_fingerprint(path: Path) -> list[Any]:
    stat = path.stat()
    return [path.name, stat.st_size, int(stat.st_mtime)]


# The image files metarun reads, in a dataset's folders and in a user's own (metarun-predict).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm")


def image_files(folder: Path) -> list[Path]:
    """The image files directly in `folder`, sorted (any format PIL reads, by suffix)."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
