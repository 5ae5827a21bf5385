"""BSCD-FSL's four target sets (Guo et al. 2020, "A Broader Study of Cross-Domain Few-Shot
Learning"): CropDiseases, EuroSAT, ISIC 2018 and ChestX-ray8, each read from the layout the
benchmark's own loaders read, as a meta-test set (``test_dataset=bscd_fsl``)."""

from __future__ import annotations

import csv
import os
import shutil
import tarfile
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

from metarun.datasets.images import (
    CORRUPT,
    DEFAULT_MAX_PIXELS,
    ImageDataset,
    Item,
    file_fingerprint,
    folder_fingerprint,
    image_files,
)
from metarun.errors import ConfigError

# EuroSAT (Helber et al. 2019; MIT licence) and ChestX-ray8 (Wang et al. 2017; "the usage of the
# data set is unrestricted", NIH's FAQ) are fetched when missing, md5-checked, then extracted:
# EuroSAT from the archive torchvision.datasets.EuroSAT downloads, ChestX from NIH's 12 archives.
# ISIC's and CropDiseases' terms are accepted by each user on their sites: placed by hand.
EUROSAT_URL = (
    "https://huggingface.co/datasets/torchgeo/eurosat/resolve/c877bcd43f099cd0196738f714544e355477f3fd/EuroSAT.zip"
)
EUROSAT_MD5 = "c8fa014336c82ac7804f0398fcb19387"
EUROSAT_ZIP = "EuroSAT.zip"
# ChestX-ray8's images: archive -> (its link in NIH's batch_download_zips.py, its md5 in NIH's
# FAQ_CHESTXRAY.pdf, question 7), both on https://nihcc.app.box.com/v/ChestXray-NIHCC. Together
# 42 GB, 112,120 PNGs under images/. Data_Entry_2017.csv has no direct link: it is placed by hand.
NIH = "https://nihcc.box.com/shared/static/"
CHESTX_ARCHIVES = {
    "images_001.tar.gz": (NIH + "vfk49d74nhbxq3nqjg0900w5nvkorp5c.gz", "fe8ed0a6961412fddcbb3603c11b3698"),
    "images_002.tar.gz": (NIH + "i28rlmbvmfjbl8p2n3ril0pptcmcu9d1.gz", "ab07a2d7cbe6f65ddd97b4ed7bde10bf"),
    "images_003.tar.gz": (NIH + "f1t00wrtdk94satdfb9olcolqx20z2jp.gz", "2301d03bde4c246388bad3876965d574"),
    "images_004.tar.gz": (NIH + "0aowwzs5lhjrceb3qp67ahp0rd1l1etg.gz", "9f1b7f5aae01b13f4bc8e2c44a4b8ef6"),
    "images_005.tar.gz": (NIH + "v5e3goj22zr6h8tzualxfsqlqaygfbsn.gz", "1861f3cd0ef7734df8104f2b0309023b"),
    "images_006.tar.gz": (NIH + "asi7ikud9jwnkrnkj99jnpfkjdes7l6l.gz", "456b53a8b351afd92a35bc41444c58c8"),
    "images_007.tar.gz": (NIH + "jn1b4mw4n6lnh74ovmcjb8y48h8xj07n.gz", "1075121ea20a137b87f290d6a4a5965e"),
    "images_008.tar.gz": (NIH + "tvpxmn7qyrgl0w8wfh9kqfjskv6nmm1j.gz", "b61f34cec3aa69f295fbb593cbd9d443"),
    "images_009.tar.gz": (NIH + "upyy3ml7qdumlgk2rfcvlb9k6gvqq2pj.gz", "442a3caa61ae9b64e61c561294d1e183"),
    "images_010.tar.gz": (NIH + "l6nilvfa9cg3s28tqv1qc1olm3gnz54p.gz", "09ec81c4c31e32858ad8cf965c494b74"),
    "images_011.tar.gz": (NIH + "hhq8fkdgvcari67vfhs7ppg2w6ni4jze.gz", "499aefc67207a5a97692424cf5dbeed5"),
    "images_012.tar.gz": (NIH + "ioqwiy20ihqwyr8pf4c24eazhh281pbu.gz", "dc9fda1757c2de0032b63347a7d2895c"),
}
# Each domain: where its files are under dataset.root, and the classes the benchmark uses.
LAYOUTS = {
    "crop_diseases": "dataset/train/<class>/<image> (the Kaggle download of plant-disease)",
    "eurosat": f"2750/<class>/<image> (extracted from {EUROSAT_ZIP}, RGB)",
    "isic": (
        "ISIC2018_Task3_Training_Input/<image id>.jpg and ISIC2018_Task3_Training_GroundTruth/"
        "ISIC2018_Task3_Training_GroundTruth.csv"
    ),
    "chestx": (
        "Data_Entry_2017.csv and images/<Image Index> (ChestX-ray8: the images/ folders of "
        "images_001.tar.gz ... images_012.tar.gz in one)"
    ),
}
EUROSAT = [
    "AnnualCrop",
    "Forest",
    "HerbaceousVegetation",
    "Highway",
    "Industrial",
    "Pasture",
    "PermanentCrop",
    "Residential",
    "River",
    "SeaLake",
]
CROP_DISEASES = 38  # PlantVillage's crop-disease pairs
ISIC = ["MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC"]  # the ground truth's one-hot columns
# The single-finding images of these seven findings (the benchmark leaves out Pneumonia).
CHESTX = ["Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumothorax"]


class BSCDFSL(ImageDataset):
    """One of BSCD-FSL's target domains, all its classes in the "test" split (the benchmark
    never trains on them: train on mini-ImageNet, meta-test here).

    Args (beyond `ImageDataset`'s):
        root: the folder holding one folder per domain (``root/<domain>/...``), so a checkpoint
            meta-tests on another domain by ``test_dataset.domain`` alone.
        domain: crop_diseases, eurosat, isic or chestx (`LAYOUTS` says where each one's files
            are, under ``root/<domain>``).
        download: EuroSAT and ChestX: without ``2750/`` (``images/``), extract ``EuroSAT.zip``
            (NIH's 12 archives, `CHESTX_ARCHIVES`) placed there, first fetching (md5-checked) any
            that is not; without it, only placed archives are extracted.
    """

    name: ClassVar[str] = "bscd_fsl"
    meta_test_only: ClassVar[bool] = True
    hint: ClassVar[str] = "lay out the domain's files as docs/domains.md describes"

    def __init__(
        self,
        root: str,
        cache_dir: str,
        domain: str = "eurosat",
        image_size: int = 84,
        channels: int = 3,
        mean: list[float] | None = None,
        std: list[float] | None = None,
        max_image_pixels: int = DEFAULT_MAX_PIXELS,
        download: bool = True,
    ) -> None:
        if domain not in LAYOUTS:
            raise ConfigError(f"dataset.domain={domain!r} is not allowed: choose one of {', '.join(LAYOUTS)}.")
        super().__init__(root, cache_dir, image_size, channels, mean, std, max_image_pixels)
        self.domain = domain
        self.base = self.root / domain  # this domain's files
        self.download = download

    def cache_stem(self, split: str) -> str:
        return f"bscd_{self.domain}_{self.image_size}px_{self.channels}ch_{split}"

    def _only_test(self, split: str) -> None:
        if split != "test":
            raise ConfigError(
                f"dataset=bscd_fsl is not allowed as the training dataset: BSCD-FSL's {self.domain} is a "
                f"meta-test set only, so train on another dataset and set test_dataset=bscd_fsl."
            )

    def _listed(self, split: str) -> tuple[list[Path], list[int], list[str]]:
        self._only_test(split)
        if self.domain in ("eurosat", "crop_diseases"):
            return self._folders()
        return self._isic() if self.domain == "isic" else self._chestx()

    def _folders(self) -> tuple[list[Path], list[int], list[str]]:
        base = self.base / ("2750" if self.domain == "eurosat" else "dataset/train")
        if self.domain == "eurosat" and not base.is_dir():
            self._eurosat()
        if not base.is_dir():
            raise self._missing(
                f"{base.relative_to(self.root)} folder (BSCD-FSL's {self.domain}: {LAYOUTS[self.domain]})"
            )
        classes = sorted(p.name for p in base.iterdir() if p.is_dir())
        expected = EUROSAT if self.domain == "eurosat" else None
        if (expected is not None and classes != expected) or (expected is None and len(classes) != CROP_DISEASES):
            wanted = ", ".join(expected) if expected else f"{CROP_DISEASES} class folders"
            raise ConfigError(
                f"dataset.root={self.root}: {base.relative_to(self.root)} holds {len(classes)} class folders "
                f"({', '.join(classes[:4])}{', ...' if len(classes) > 4 else ''}) but BSCD-FSL's {self.domain} has "
                f"{wanted}, so {self.hint}."
            )
        files: list[Path] = []
        labels: list[int] = []
        for label, name in enumerate(classes):
            found = image_files(base / name)
            if not found:
                raise self._missing(f"images in {base / name}")
            files += found
            labels += [label] * len(found)
        return files, labels, classes

    def _eurosat(self) -> None:
        """Extract ``2750/`` from ``EuroSAT.zip``, fetched first if absent and ``download``."""
        archive = self.base / EUROSAT_ZIP
        if not archive.is_file():
            if not self.download:
                return  # the missing folder's sentence follows
            self._fetch(EUROSAT_URL, archive, EUROSAT_MD5, "EuroSAT")
        self._extract([archive], "2750")

    def _chestx_images(self) -> None:
        """Extract ``images/`` from NIH's 12 archives, fetching the absent ones if ``download``."""
        archives = [self.base / name for name in CHESTX_ARCHIVES]
        absent = [a.name for a in archives if not a.is_file()]
        if absent and not self.download:
            names = ", ".join(absent) if len(absent) < len(archives) else f"{archives[0].name} ... {archives[-1].name}"
            raise self._missing(
                f"chestx/images folder nor the archives {names} to extract it from (NIH's ChestX-ray8 "
                f"download; or set test_dataset.download=true to fetch them, 42 GB)"
            )
        for name in absent:
            url, md5 = CHESTX_ARCHIVES[name]
            self._fetch(url, self.base / name, md5, f"ChestX-ray8 {name}")
        self._extract(archives, "images")

    def _extract(self, archives: list[Path], folder: str) -> None:
        """Extract the members under ``folder/`` of the `archives` (zip or tar) into
        ``base/folder`` through a staging folder, so a partial extraction never stands in for it;
        a member that would leave the folder is refused."""
        self.base.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=self.base, prefix=f".{folder}.", suffix=".tmp"))
        try:
            for archive in archives:
                found, unsafe = 0, None
                try:
                    for name, extract in _members(archive):
                        if name.startswith(f"{folder}/") and not name.endswith("/"):
                            if ".." in Path(name).parts:
                                unsafe = name
                                break
                            extract(staging)
                            found += 1
                except CORRUPT as error:
                    if (self.base / folder).is_dir():  # another process extracted it first
                        return
                    raise self._corrupt(str(archive), f"{type(error).__name__}: {error}") from None
                if unsafe is not None or not found:
                    reason = f"its member {unsafe} leaves the folder" if unsafe else f"it has no {folder}/ folder"
                    raise self._corrupt(str(archive), reason)
            os.replace(staging / folder, self.base / folder)
        except OSError:
            if not (self.base / folder).is_dir():  # not: another process finished first
                raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _table(self, relative: str) -> list[list[str]]:
        path = self.base / relative
        if not path.is_file():
            raise self._missing(f"{self.domain}/{relative} (BSCD-FSL's {self.domain}: {LAYOUTS[self.domain]})")
        with open(path, newline="") as f:
            return [row for row in csv.reader(f) if row]

    def _isic(self) -> tuple[list[Path], list[int], list[str]]:
        rows = self._table("ISIC2018_Task3_Training_GroundTruth/ISIC2018_Task3_Training_GroundTruth.csv")
        if [c.strip() for c in rows[0][1:]] != ISIC:
            raise ConfigError(
                f"dataset.root={self.root}: the ISIC ground truth's columns are {', '.join(rows[0])} but should be "
                f"image, {', '.join(ISIC)}, so {self.hint}."
            )
        images = self.base / "ISIC2018_Task3_Training_Input"
        files, labels = [], []
        for row in rows[1:]:
            values = [float(v) for v in row[1:]]
            files.append(images / f"{row[0]}.jpg")
            labels.append(max(range(len(values)), key=lambda i: values[i] != 0))  # the one-hot column
        return self._present(files), labels, list(ISIC)

    def _chestx(self) -> tuple[list[Path], list[int], list[str]]:
        rows = self._table("Data_Entry_2017.csv")  # first: it cannot be fetched, the images can
        if not (self.base / "images").is_dir():
            self._chestx_images()
        files, labels = [], []
        for row in rows[1:]:
            findings = row[1].split("|")
            if len(findings) == 1 and findings[0] in CHESTX:  # one finding, one of the seven
                files.append(self.base / "images" / row[0])
                labels.append(CHESTX.index(findings[0]))
        return self._present(files), labels, list(CHESTX)

    def _present(self, files: list[Path]) -> list[Path]:
        missing = next((f for f in files if not f.is_file()), None)
        if missing is not None:
            raise self._missing(f"image {missing.relative_to(self.root)}, which its table lists")
        return files

    def _fingerprint(self, split: str) -> Any:
        files, _, _ = self._listed(split)
        tables = {"isic": ["ISIC2018_Task3_Training_GroundTruth/ISIC2018_Task3_Training_GroundTruth.csv"]}
        tables["chestx"] = ["Data_Entry_2017.csv"]
        return [*folder_fingerprint(files), *(file_fingerprint(self.base / t) for t in tables.get(self.domain, []))]

    def _items(self, split: str) -> tuple[list[Item], list[int], list[str]]:
        files, labels, classes = self._listed(split)
        return [("", str(path), None) for path in files], labels, classes

    def class_count(self, name: str) -> int:
        self._only_test(name)
        return super().class_count(name)


def _members(archive: Path) -> Iterator[tuple[str, Any]]:
    """Each member's name and a function extracting it into a folder, in one pass over a zip or
    a (compressed) tar; tarfile's data filter refuses a tar's links out and its special files."""
    if archive.suffix == ".zip":
        with zipfile.ZipFile(archive) as z:
            for name in z.namelist():
                yield name, lambda folder, name=name: z.extract(name, folder)
        return
    with tarfile.open(archive) as tar:
        for member in tar:
            yield member.name, lambda folder, member=member: tar.extract(member, folder, filter="data")
