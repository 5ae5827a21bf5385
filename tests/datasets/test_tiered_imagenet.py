"""tiered-ImageNet on stand-ins of both on-disk formats, named after Ren et al.'s lists."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch

from metarun.datasets.tiered_imagenet import TieredImageNet, split_classes
from metarun.errors import ConfigError
from tests.datasets.conftest import check_cache_reused, check_splits
from tests.datasets.standins import class_image, tiered_folders, tiered_pickles


def _load(root: Path, cache: Path, **kwargs) -> TieredImageNet:
    return TieredImageNet(str(root), str(cache), image_size=16, **kwargs)


@pytest.mark.parametrize("layout", ["folders", "pickles"])
def test_splits_as_published(tmp_path: Path, layout: str, monkeypatch: pytest.MonkeyPatch) -> None:
    root = (tiered_folders if layout == "folders" else tiered_pickles)(tmp_path / "tiered")
    data = _load(root, tmp_path / "cache")
    check_splits(data, (351, 97, 160))
    assert [len(set(data.categories(s))) for s in ("train", "val", "test")] == [20, 6, 8]
    # the categories are the superclasses of sampler=variable's hierarchy
    groups = data.split("val").groups
    assert groups is not None and len(set(groups.tolist())) == 6
    categories = data.categories("val")
    assert [int(g) for g in groups] == [sorted(set(categories), key=categories.index).index(c) for c in categories]
    check_cache_reused(lambda: _load(root, tmp_path / "cache"), monkeypatch)


def test_shuffled_pickles_are_grouped_by_class(tmp_path: Path) -> None:
    """The stand-in shuffles images across classes; each class's PNGs come back exactly."""
    data = _load(tiered_pickles(tmp_path / "tiered"), tmp_path / "cache", mean=None, std=None)
    val = data.split("val")
    assert data.classes("val") == [wnid for wnid, _ in split_classes("val")]
    for label in (0, 5, 96):
        ids = (val.labels == label).nonzero().flatten()
        expected = {np.array(class_image(351 + label, i, 16)).transpose(2, 0, 1).tobytes() for i in range(2)}
        assert {val.images[i].numpy().tobytes() for i in ids} == expected


def test_packaged_lists_match_the_published_ones(shared_data: Path) -> None:
    for split in ("train", "val", "test"):
        with (shared_data / "splits" / "tiered_imagenet" / f"{split}.csv").open(newline="") as f:
            published = [tuple(row) for row in csv.reader(f) if row]
        assert split_classes(split) == published


def test_missing_class_folder_is_named(tmp_path: Path) -> None:
    root = tiered_folders(tmp_path / "tiered", per_class=1)
    wnid = split_classes("test")[3][0]
    for path in (root / "train" / wnid).iterdir():
        path.unlink()
    (root / "train" / wnid).rmdir()
    with pytest.raises(ConfigError, match=wnid):
        _load(root, tmp_path / "cache").split("test")


def test_truncated_pickle_is_one_sentence(tmp_path: Path) -> None:
    root = tiered_pickles(tmp_path / "tiered")
    path = root / "val_images_png.pkl"
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(ConfigError, match="truncated or corrupt"):
        _load(root, tmp_path / "cache").split("val")
    assert not list((tmp_path / "cache").glob("*val*"))
    assert _load(root, tmp_path / "cache").split("train").num_classes == 351
    assert torch.is_tensor(_load(root, tmp_path / "cache").split("test").images)
