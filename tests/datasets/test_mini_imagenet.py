"""mini-ImageNet on stand-ins of both on-disk formats, named after Ravi & Larochelle's lists."""

from __future__ import annotations

import csv
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from metarun.datasets.mini_imagenet import MiniImageNet
from metarun.errors import ConfigError
from tests.datasets.conftest import check_cache_reused, check_splits
from tests.datasets.standins import class_image, mini_imagenet_classes, mini_imagenet_csv, mini_imagenet_pickles


def _load(root: Path, cache: Path, **kwargs) -> MiniImageNet:
    return MiniImageNet(str(root), str(cache), image_size=16, **kwargs)


@pytest.mark.parametrize("layout", ["csv", "pickle"])
def test_splits_as_published(tmp_path: Path, layout: str, monkeypatch: pytest.MonkeyPatch) -> None:
    root = (mini_imagenet_csv if layout == "csv" else mini_imagenet_pickles)(tmp_path / "mini")
    check_splits(_load(root, tmp_path / "cache"), (64, 16, 20))
    check_cache_reused(lambda: _load(root, tmp_path / "cache"), monkeypatch)


def test_pickle_pixels_and_labels(tmp_path: Path) -> None:
    root = mini_imagenet_pickles(tmp_path / "mini", per_class=2)
    data = _load(root, tmp_path / "cache", mean=None, std=None)
    test = data.split("test")
    assert data.classes("test") == mini_imagenet_classes("test")
    first_test_label = 64 + 16  # the stand-in numbers classes across splits
    expected = np.array(class_image(first_test_label, 1, 16)).transpose(2, 0, 1)
    assert torch.equal(test.images[1], torch.from_numpy(expected)) and test.labels[:3].tolist() == [0, 0, 1]


def test_csv_layout_without_csvs_globs_the_split_classes(tmp_path: Path) -> None:
    root = mini_imagenet_csv(tmp_path / "mini", per_class=2)
    for split in ("train", "val", "test"):
        (root / f"{split}.csv").unlink()
    assert _load(root, tmp_path / "cache").split("val").num_classes == 16


def test_packaged_lists_match_the_published_csvs(shared_data: Path) -> None:
    for split, count in (("train", 64), ("val", 16), ("test", 20)):
        with (shared_data / "mini_imagenet_splits" / f"{split}.csv").open(newline="") as f:
            rows = list(csv.DictReader(f))
        published = list(dict.fromkeys(row["label"] for row in rows))
        assert mini_imagenet_classes(split) == published and len(published) == count
        assert len(rows) == 600 * count


def test_missing_images_say_where_to_put_them(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="ImageNet's terms do not allow") as error:
        _load(tmp_path / "nothing", tmp_path / "cache").split("train")
    assert str(error.value).startswith("dataset.root=") and "mini-imagenet-cache" in str(error.value)


def test_corrupt_image_and_pickle_are_one_sentence(tmp_path: Path) -> None:
    root = mini_imagenet_csv(tmp_path / "csv", per_class=2)
    victim = sorted((root / "images").iterdir())[5]
    victim.write_bytes(victim.read_bytes()[:30])
    with pytest.raises(ConfigError, match="is truncated or corrupt") as error:
        _load(root, tmp_path / "cache").split("train")
    assert victim.name in str(error.value) and "\n" not in str(error.value)
    root = mini_imagenet_pickles(tmp_path / "pkl", per_class=2)
    path = root / "mini-imagenet-cache-val.pkl"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ConfigError, match="is truncated or corrupt"):
        _load(root, tmp_path / "cache2").split("val")


def test_pickle_with_other_classes_is_refused(tmp_path: Path) -> None:
    root = mini_imagenet_pickles(tmp_path / "mini", per_class=2)
    path = root / "mini-imagenet-cache-test.pkl"
    data = pickle.loads(path.read_bytes())
    data["class_dict"]["n99999999"] = data["class_dict"].pop(mini_imagenet_classes("test")[0])
    path.write_bytes(pickle.dumps(data))
    with pytest.raises(ConfigError, match="not the 20 of Ravi & Larochelle's test split"):
        _load(root, tmp_path / "cache").split("test")
