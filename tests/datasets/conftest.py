"""Shared by the dataset tests: the published split files in METARUN_DATA_DIR, and the
generic checks every image dataset passes on its stand-in."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from metarun.datasets import images

REPO = Path(__file__).parents[2]


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """METARUN_DATA_DIR (CI: the data folder beside the checkout): the real Omniglot and the published split files."""
    value = os.environ.get("METARUN_DATA_DIR")
    if not value:
        pytest.skip("METARUN_DATA_DIR is not set; set it to the data folder to test against the real data files")
    path = Path(value)
    return path if path.is_absolute() else REPO / path


def check_splits(dataset, counts: tuple[int, int, int]) -> None:
    """Class counts per split exactly as published, no class in two splits, episodes with
    labels 0..N-1 whose ``classes`` point at the split's classes."""
    names = {}
    for split, count in zip(images.SPLITS, counts):
        data = dataset.split(split)
        assert data.num_classes == count == len(dataset.classes(split)), split
        assert data.images.dtype == torch.uint8 and data.images.shape[1:] == (
            dataset.channels,
            dataset.image_size,
            dataset.image_size,
        )
        names[split] = set(dataset.classes(split))
        episode = data.episode(torch.Generator().manual_seed(1), 5, 1, 1)
        assert episode.support_y.tolist() == list(range(5)) and sorted(episode.query_y.tolist()) == list(range(5))
        assert episode.classes is not None and len(set(episode.classes.tolist())) == 5
    assert not names["train"] & names["val"] and not names["train"] & names["test"] and not names["val"] & names["test"]


def check_cache_reused(make, monkeypatch: pytest.MonkeyPatch) -> None:
    """A second construction reads every split from the cache: nothing is decoded."""
    first = make()
    pixels = {split: first.split(split).images.clone() for split in images.SPLITS}

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded although the cache was valid")

    monkeypatch.setattr(images, "decode", no_decoding)
    second = make()
    for split in images.SPLITS:
        assert torch.equal(second.split(split).images, pixels[split])
    monkeypatch.undo()
