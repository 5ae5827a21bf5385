"""mini-ImageNet: 100 ImageNet classes of 600 images at 84×84 (Vinyals et al. 2016), in the
64/16/20 class split of Ravi & Larochelle (2017)."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, ClassVar

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


class MiniImageNet(ImageDataset):
    """mini-ImageNet with Ravi & Larochelle's split (the class lists ship with the package).

    Reads either on-disk format under ``root``:

    - the split CSVs and images: ``{train,val,test}.csv`` (``filename,label``) and
      ``images/<filename>``; without a CSV, every ``images/<wnid>*`` file of the split's
      classes;
    - the widely shared pickles ``mini-imagenet-cache-{train,val,test}.pkl``, each a dict
      with ``image_data`` (uint8 ``[N, 84, 84, 3]``) and ``class_dict`` (wnid -> rows).

    ImageNet's terms do not allow downloading or redistributing the images: the error
    says where to put them. Arguments as `ImageDataset` (published setting: 84 px RGB).
    """

    name: ClassVar[str] = "mini_imagenet"
    hint: ClassVar[str] = (
        "put Ravi & Larochelle's images/ folder with train.csv, val.csv and test.csv, or the "
        "mini-imagenet-cache-{train,val,test}.pkl files, there (ImageNet's terms do not allow metarun to "
        "download them) or set METARUN_DATA_DIR to a folder with mini_imagenet/"
    )

    def _pickle(self, split: str) -> Path:
        return self.root / f"mini-imagenet-cache-{split}.pkl"

    def _fingerprint(self, split: str) -> Any:
        if self._pickle(split).is_file():
            return ["pickle", *file_fingerprint(self._pickle(split))]
        return ["csv", *folder_fingerprint([Path(path) for path, _ in self._listed(split)])]

    def _items(self, split: str) -> tuple[list[Item], list[int], list[str]]:
        classes = packaged_lines("mini_imagenet", f"{split}.txt")
        if self._pickle(split).is_file():
            try:
                data = load_pickle(self._pickle(split))
                images, rows = data["image_data"], data["class_dict"]
            except (*CORRUPT, KeyError, TypeError) as error:
                raise self._corrupt(str(self._pickle(split)), f"{type(error).__name__}: {error}") from None
            self._check_classes(split, set(rows), str(self._pickle(split)))
            items: list[Item] = [("", images[i], None) for wnid in classes for i in rows[wnid]]
            labels = [label for label, wnid in enumerate(classes) for _ in rows[wnid]]
            return items, labels, classes
        listed = self._listed(split)
        label_of = {wnid: i for i, wnid in enumerate(classes)}
        return [("", path, None) for path, _ in listed], [label_of[wnid] for _, wnid in listed], classes

    def _listed(self, split: str) -> list[tuple[str, str]]:
        """(image path, wnid) of every image of `split` in the CSV layout, in label order."""
        classes = packaged_lines("mini_imagenet", f"{split}.txt")
        folder, table = self.root / "images", self.root / f"{split}.csv"
        if not folder.is_dir():
            raise self._missing(f"mini-imagenet-cache-{split}.pkl nor images/ folder")
        if table.is_file():
            with table.open(newline="") as f:
                rows = [(row["filename"], row["label"]) for row in csv.DictReader(f)]
            self._check_classes(split, {wnid for _, wnid in rows}, str(table))
        else:
            wanted = set(classes)  # ImageNet ids are 9 characters: n01532829
            rows = [(p.name, p.name[:9]) for p in image_files(folder) if p.name[:9] in wanted]
        order = {wnid: i for i, wnid in enumerate(classes)}
        listed = sorted(((str(folder / name), wnid) for name, wnid in rows), key=lambda r: (order[r[1]], r[0]))
        missing = [path for path, _ in listed if not Path(path).is_file()]
        if missing or not listed:
            raise self._missing(f"image {missing[0]}" if missing else f"images of the {split} classes in images/")
        return listed

    def _check_classes(self, split: str, found: set[str], source: str) -> None:
        expected = set(packaged_lines("mini_imagenet", f"{split}.txt"))
        if found != expected:
            odd = sorted(found ^ expected)
            raise ConfigError(
                f"dataset.root={self.root}: {source} has {len(found)} classes, not the {len(expected)} of Ravi & "
                f"Larochelle's {split} split (e.g. {odd[0]} differs), so {self.hint}."
            )
