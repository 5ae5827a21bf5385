"""The shared image layer: memory-mapped caches (reused, rebuilt when stale, shared between
processes), decoding (pool = in-process, damaged images named), safe pickles, conversion."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from metarun.datasets import images
from metarun.datasets.images import cached, decode, load_pickle, prepare_image
from metarun.errors import ConfigError
from tests.datasets.standins import class_image

REPO = Path(__file__).parents[2]


def _build(n: int = 10, value: int = 7, into_file: bool = True):
    """A build() that decodes into the cache file (``allocate``) or returns its own tensor."""

    def build(allocate):
        out = allocate((n, 3, 4, 4)) if into_file else np.empty((n, 3, 4, 4), np.uint8)
        out[:] = value
        return torch.from_numpy(out), torch.arange(n) % 2, {"classes": ["a", "b"]}

    return build


def _refuse(allocate):
    raise AssertionError("built although the cache was valid")


@pytest.mark.parametrize("into_file", [True, False])
def test_cache_is_memory_mapped_reused_and_rebuilt_when_stale(tmp_path: Path, into_file: bool) -> None:
    images_, labels, meta = cached(tmp_path / "set", ["v1"], _build(into_file=into_file), "test")
    assert {p.name for p in tmp_path.iterdir()} == {"set.npy", "set.pt"}
    assert images_.shape == (10, 3, 4, 4) and meta == {"classes": ["a", "b"]}
    again, labels_again, _ = cached(tmp_path / "set", ["v1"], _refuse, "test")  # reused, not rebuilt
    assert torch.equal(again, images_) and torch.equal(labels_again, labels)
    again[0] += 1  # copy-on-write: the file is untouched
    assert cached(tmp_path / "set", ["v1"], _refuse, "test")[0][0].eq(7).all()
    stale, _, _ = cached(tmp_path / "set", ["v2"], _build(value=9), "test")  # other sources: rebuilt
    assert stale.eq(9).all()


@pytest.mark.parametrize("damage", ["array", "meta"])
def test_unreadable_cache_is_rebuilt(tmp_path: Path, damage: str) -> None:
    cached(tmp_path / "set", ["v1"], _build(), "test")
    (tmp_path / f"set.{'npy' if damage == 'array' else 'pt'}").write_bytes(b"not a cache")
    rebuilt, _, _ = cached(tmp_path / "set", ["v1"], _build(value=5), "test")
    assert rebuilt.eq(5).all()
    assert cached(tmp_path / "set", ["v1"], _refuse, "test")[0].eq(5).all()


# A second process maps the cache and reads every image: its anonymous (private, copied)
# memory must not grow by the images' size, as it would with torch.load or np.load.
RSS_PROBE = """
import json, sys, torch
from pathlib import Path
from metarun.datasets.images import cached

def anonymous_kb():
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        if line.startswith("Anonymous:"):
            return int(line.split()[1])

def refuse(allocate):
    raise AssertionError("rebuilt")

before = anonymous_kb()
images, labels, _ = cached(Path(sys.argv[1]), ["v1"], refuse, "probe")
total = int(images.sum(dtype=torch.int64))  # touches every page
after = anonymous_kb()
print(json.dumps({"growth_kb": after - before, "total": total}))
"""


@pytest.mark.skipif(not Path("/proc/self/smaps_rollup").exists(), reason="needs Linux /proc smaps_rollup")
def test_a_second_process_shares_the_mapped_cache(tmp_path: Path) -> None:
    n = 2048  # 2048 x 3 x 84 x 84 uint8 = 43 MB

    def build(allocate):
        out = allocate((n, 3, 84, 84))
        out[:] = 1
        return torch.from_numpy(out), torch.zeros(n, dtype=torch.long), {}

    cached(tmp_path / "big", ["v1"], build, "test")
    size_kb = n * 3 * 84 * 84 // 1024
    done = subprocess.run(
        [sys.executable, "-c", RSS_PROBE, str(tmp_path / "big")], capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    probe = json.loads(done.stdout.strip().splitlines()[-1])
    assert probe["total"] == n * 3 * 84 * 84  # read every image
    assert probe["growth_kb"] < 0.1 * size_kb, (probe, size_kb)


def test_process_pool_matches_in_process(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    files = []
    for i in range(12):
        path = tmp_path / f"{i}.png"
        class_image(i % 3, i, 20).save(path)
        files.append(("", str(path), None))
    corrupt = lambda what, reason: ConfigError(what)  # noqa: E731
    in_process = decode(files, 12, 3, corrupt)
    monkeypatch.setattr(images, "MIN_IMAGES_PER_WORKER", 1)
    monkeypatch.setattr(images, "CHUNK", 5)
    assert torch.equal(decode(files, 12, 3, corrupt), in_process)
    assert in_process.shape == (12, 3, 12, 12) and in_process.dtype == torch.uint8


def test_damaged_image_is_named(tmp_path: Path) -> None:
    good, bad = tmp_path / "good.png", tmp_path / "bad.png"
    class_image(0, 0, 8).save(good)
    bad.write_bytes(good.read_bytes()[:40])
    with pytest.raises(ConfigError, match="bad.png") as error:
        decode([("", str(good), None), ("", str(bad), None)], 8, 3, lambda what, why: ConfigError(f"{what}: {why}"))
    assert "good.png" not in str(error.value)


def test_prepare_image_converts_grey_and_rgb_and_crops() -> None:
    grey = class_image(1, 0, 16, grey=True)
    rgb = class_image(1, 0, 16)
    assert prepare_image(grey, 16, 3).shape == (3, 16, 16)
    out = prepare_image(grey, 16, 3)
    assert (out[0] == out[1]).all() and (out[1] == out[2]).all()  # grey in each of R, G, B
    assert prepare_image(rgb, 8, 1).shape == (1, 8, 8)
    assert np.array_equal(prepare_image(rgb, 16, 3), np.asarray(rgb).transpose(2, 0, 1))  # same size: unchanged
    cropped = prepare_image(rgb, 4, 3, box=(4, 4, 8, 8))
    assert np.array_equal(cropped, np.asarray(rgb)[4:8, 4:8].transpose(2, 0, 1))


class Evil:
    def __reduce__(self):
        return (print, ("this ran",))


def test_pickles_hold_arrays_only() -> None:
    data = {"image_data": np.zeros((2, 4, 4, 3), np.uint8), "class_dict": {"n0": [0, 1]}}
    loaded = load_pickle(pickle.dumps(data, protocol=4))
    assert np.array_equal(loaded["image_data"], data["image_data"]) and loaded["class_dict"] == {"n0": [0, 1]}
    assert load_pickle(pickle.dumps(data, protocol=2))["class_dict"] == {"n0": [0, 1]}
    with pytest.raises(pickle.UnpicklingError, match="only arrays and containers"):
        load_pickle(pickle.dumps({"x": Evil()}))


@pytest.mark.parametrize(
    "kwargs, key",
    [
        ({"image_size": 0}, "dataset.image_size"),
        ({"channels": 2}, "dataset.channels"),
        ({"mean": [0.5], "std": [0.2, 0.2, 0.2]}, "dataset.mean"),
        ({"mean": [0.5] * 3, "std": [0.2, 0.0, 0.2]}, "dataset.std"),
        ({"mean": [0.5] * 3}, "dataset.mean and dataset.std"),
    ],
)
def test_bad_image_arguments_name_the_key(tmp_path: Path, kwargs: dict, key: str) -> None:
    from metarun.datasets.mini_imagenet import MiniImageNet

    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        MiniImageNet(str(tmp_path), str(tmp_path / "cache"), **kwargs)


def test_normalisation_is_applied_to_episodes() -> None:
    from metarun.datasets.base import ClassImages

    pixels = torch.full((6, 3, 2, 2), 51, dtype=torch.uint8)  # 0.2
    split = ClassImages(pixels, torch.tensor([0, 0, 1, 1, 2, 2]), "t", mean=[0.1, 0.2, 0.3], std=[0.5, 0.5, 0.5])
    episode = split.episode(torch.Generator().manual_seed(0), 3, 1, 1)
    expected = torch.tensor([0.2, 0.0, -0.2]).view(1, 3, 1, 1).expand_as(episode.support_x)
    torch.testing.assert_close(episode.support_x, expected)


def test_a_failed_build_leaves_no_partial_cache(tmp_path: Path) -> None:
    def build(allocate):
        allocate((4, 3, 8, 8))[:2] = 1
        raise ConfigError("a damaged image")

    with pytest.raises(ConfigError, match="a damaged image"):
        cached(tmp_path / "set", ["v1"], build, "test")
    assert list(tmp_path.iterdir()) == []
    images_, _, _ = cached(tmp_path / "set", ["v1"], _build(n=4), "test")  # the next run builds it
    assert images_.shape == (4, 3, 4, 4) and {p.name for p in tmp_path.iterdir()} == {"set.npy", "set.pt"}
