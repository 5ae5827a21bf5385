"""FC100: CIFAR-100 split by superclass, from a stand-in of the official archive."""

from __future__ import annotations

import json
from pathlib import Path

from metarun.datasets.fc100 import FC100
from tests.datasets.conftest import check_splits
from tests.datasets.standins import cifar_archive, cifar_names


def test_superclass_splits_as_published(tmp_path: Path) -> None:
    data = FC100(str(cifar_archive(tmp_path / "cifar100")), str(tmp_path / "cache"), download=False)
    check_splits(data, (60, 20, 20))
    _, _, coarse_of = cifar_names()
    supers = {split: {coarse_of[c] for c in data.classes(split)} for split in ("train", "val", "test")}
    assert [len(supers[s]) for s in ("train", "val", "test")] == [12, 4, 4]
    assert not supers["train"] & supers["val"] and not supers["train"] & supers["test"]
    assert not supers["val"] & supers["test"]
    assert supers["val"] == set(data.superclasses("val"))


def test_packaged_lists_match_the_published_ones(shared_data: Path) -> None:
    data = FC100.__new__(FC100)
    for split in ("train", "val", "test"):
        published = json.loads((shared_data / "splits" / "fc100" / f"{split}.json").read_text())
        assert data.superclasses(split) == published
