"""CUB-200-2011 on a stand-in of its official folder layout, with Chen et al.'s split."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from metarun.datasets.cub import CUB
from metarun.errors import ConfigError
from tests.datasets.conftest import check_cache_reused, check_splits
from tests.datasets.standins import cub_folder


def _load(root: Path, cache: Path, **kwargs) -> CUB:
    return CUB(str(root), str(cache), **{"image_size": 16, **kwargs})


def test_splits_as_published(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = cub_folder(tmp_path / "cub")
    check_splits(_load(root, tmp_path / "cache"), (100, 50, 50))
    check_cache_reused(lambda: _load(root, tmp_path / "cache"), monkeypatch)
    assert _load(root / "CUB_200_2011", tmp_path / "cache").split("val").num_classes == 50  # root = the folder itself


def test_crop_to_box_crops_before_resizing(tmp_path: Path) -> None:
    root = cub_folder(tmp_path / "cub", per_class=1, size=24)
    full = _load(root, tmp_path / "cache", image_size=24, mean=None, std=None)
    boxed = _load(root, tmp_path / "cache", image_size=24, mean=None, std=None, crop_to_box=True)
    assert not torch.equal(full.split("test").images, boxed.split("test").images)  # its own cache
    image = full.split("test").images[0].numpy().transpose(1, 2, 0)  # [24, 24, 3]
    from PIL import Image

    expected = np.asarray(Image.fromarray(image).crop((2, 3, 20, 19)).resize((24, 24), Image.Resampling.LANCZOS))
    assert np.array_equal(boxed.split("test").images[0].numpy().transpose(1, 2, 0), expected)


def test_crop_to_box_needs_the_box_files(tmp_path: Path) -> None:
    root = cub_folder(tmp_path / "cub", per_class=1)
    (root / "CUB_200_2011" / "bounding_boxes.txt").unlink()
    with pytest.raises(ConfigError, match="dataset.crop_to_box=true is not allowed.*bounding_boxes.txt"):
        _load(root, tmp_path / "cache", crop_to_box=True).split("train")


def test_packaged_lists_match_the_published_ones(shared_data: Path, tmp_path: Path) -> None:
    root = cub_folder(tmp_path / "cub", per_class=1)
    data = _load(root, tmp_path / "cache")
    for split in ("train", "val", "test"):
        published = json.loads((shared_data / "splits" / "cub" / f"{split}.json").read_text())
        assert data.classes(split) == published


def test_missing_folder_says_where_to_get_it(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="CUB_200_2011.tgz"):
        _load(tmp_path / "nothing", tmp_path / "cache").split("train")
