"""CIFAR-FS from a stand-in of the official cifar-100-python.tar.gz: splits, download, damage."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from metarun.datasets import cifar100
from metarun.datasets.cifar_fs import CIFARFS
from metarun.errors import ConfigError
from tests.datasets.conftest import check_cache_reused, check_splits
from tests.datasets.standins import cifar_archive


def _load(root: Path, cache: Path, **kwargs) -> CIFARFS:
    return CIFARFS(str(root), str(cache), **{"download": False, **kwargs})


def test_splits_as_published(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = cifar_archive(tmp_path / "cifar100")
    data = _load(root, tmp_path / "cache")
    check_splits(data, (64, 16, 20))
    assert set(data.split("train").counts.tolist()) == {3}  # the train and test parts pooled
    check_cache_reused(lambda: _load(root, tmp_path / "cache"), monkeypatch)


def test_packaged_lists_match_the_published_ones(shared_data: Path, tmp_path: Path) -> None:
    data = _load(cifar_archive(tmp_path / "cifar100"), tmp_path / "cache")
    for split in ("train", "val", "test"):
        published = json.loads((shared_data / "splits" / "cifar_fs" / f"{split}.json").read_text())
        assert data.fine_classes(split) == [fine for _, fine in published]


def test_download_checks_the_md5(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    served = cifar_archive(tmp_path / "served") / cifar100.ARCHIVE
    monkeypatch.setattr(cifar100, "URL", served.as_uri())
    monkeypatch.setattr(cifar100, "MD5", hashlib.md5(served.read_bytes()).hexdigest())
    data = _load(tmp_path / "cifar100", tmp_path / "cache", download=True)
    assert data.split("val").num_classes == 16 and (tmp_path / "cifar100" / cifar100.ARCHIVE).is_file()
    monkeypatch.setattr(cifar100, "MD5", "0" * 32)
    with pytest.raises(ConfigError, match="has md5"):
        _load(tmp_path / "other", tmp_path / "cache2", download=True).split("val")
    assert not (tmp_path / "other" / cifar100.ARCHIVE).exists()


def test_offline_error_says_where_to_put_the_archive(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cifar100, "URL", (tmp_path / "nowhere.tar.gz").as_uri())
    for download in (False, True):
        with pytest.raises(ConfigError, match="eb9058c3a382ffc7106e4002c42a8d85") as error:
            _load(tmp_path / "empty", tmp_path / "cache", download=download).split("train")
        assert str(error.value).startswith("dataset.root=") and "\n" not in str(error.value)


def test_truncated_archive_is_one_sentence(tmp_path: Path) -> None:
    root = cifar_archive(tmp_path / "cifar100")
    archive = root / cifar100.ARCHIVE
    archive.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    with pytest.raises(ConfigError, match="is truncated or corrupt"):
        _load(root, tmp_path / "cache").split("train")
