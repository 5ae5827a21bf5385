"""BSCD-FSL's four target sets (Guo et al. 2020, "A Broader Study of Cross-Domain Few-Shot
Learning"): CropDiseases, EuroSAT, ISIC 2018 and ChestX-ray8, each read from the layout the
benchmark's own loaders read, as a meta-test set (``test_dataset=bscd_fsl``)."""

from __future__ import annotations

import csv
import os
import shutil
import tempfile
import zipfile
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

# EuroSAT (Helber et al. 2019; MIT licence) is the one domain fetched when it is missing: the
# archive torchvision.datasets.EuroSAT downloads, md5-checked, then its 2750/ folder extracted.
# The other three licences ask each user to accept their terms, so their files are placed by hand.
EUROSAT_URL = (
    "https://huggingface.co/datasets/torchgeo/eurosat/resolve/c877bcd43f099cd0196738f714544e355477f3fd/EuroSAT.zip"
)
EUROSAT_MD5 = "c8fa014336c82ac7804f0398fcb19387"
EUROSAT_ZIP = "EuroSAT.zip"
# Each domain: where its files are under dataset.root, and the classes the benchmark uses.
LAYOUTS = {
    "crop_diseases": "dataset/train/<class>/<image> (the Kaggle download of plant-disease)",
    "eurosat": f"2750/<class>/<image> (extracted from {EUROSAT_ZIP}, RGB)",
    "isic": (
        "ISIC2018_Task3_Training_Input/<image id>.jpg and ISIC2018_Task3_Training_GroundTruth/"
        "ISIC2018_Task3_Training_GroundTruth.csv"
    ),
    "chestx": "Data_Entry_2017.csv and images/<Image Index> (ChestX-ray8, every images_*/images folder in one)",
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
        download: EuroSAT only: without ``2750/``, extract ``EuroSAT.zip`` placed there, or
            first fetch it (`EUROSAT_URL`, md5-checked) when it is not.
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
        """Extract ``2750/`` from ``EuroSAT.zip`` (fetched first if absent and ``download``); a
        partial extraction never stands in for the folder."""
        archive = self.base / EUROSAT_ZIP
        if not archive.is_file():
            if not self.download:
                return  # the missing folder's sentence follows
            self._fetch(EUROSAT_URL, archive, EUROSAT_MD5, "EuroSAT")
        self.base.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=self.base, prefix=".2750.", suffix=".tmp"))
        try:
            with zipfile.ZipFile(archive) as z:
                members = [m for m in z.namelist() if m.startswith("2750/")]
                unsafe = next((m for m in members if ".." in Path(m).parts), None)
                if members and unsafe is None:
                    z.extractall(staging, members)
                    os.replace(staging / "2750", self.base / "2750")
        except CORRUPT as error:
            if (self.base / "2750").is_dir():  # another process extracted it first
                return
            raise self._corrupt(str(archive), f"{type(error).__name__}: {error}") from None
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        if not members or unsafe is not None:
            reason = f"its member {unsafe} leaves the folder" if unsafe else "it has no 2750/ folder"
            raise self._corrupt(str(archive), reason)

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
        rows = self._table("Data_Entry_2017.csv")
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
