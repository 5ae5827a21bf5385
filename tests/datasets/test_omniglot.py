"""Omniglot: real-archive counts, rotations and cache; fake archives for download and errors."""

from __future__ import annotations

import hashlib
import io
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from metarun.datasets import images, omniglot
from metarun.datasets.omniglot import Omniglot
from metarun.errors import ConfigError

REPO = Path(__file__).parents[2]
PACKAGE_SPLITS = REPO / "metarun" / "datasets" / "splits" / "vinyals"
FAKE_ALPHABETS = {"images_background": ("Alpha", "Beta"), "images_evaluation": ("Delta", "Gamma")}
FAKE_CLASSES = 2 * 2 * 4  # evaluation alphabets x characters x rotations: Lake's test split


# ---------------------------------------------------------------- real data (METARUN_DATA_DIR)


@pytest.fixture(scope="session")
def real_root(shared_data: Path) -> Path:
    return shared_data / "omniglot"


@pytest.fixture(scope="session")
def real_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("omniglot_cache")


@pytest.fixture(scope="session")
def vinyals(real_root: Path, real_cache: Path) -> Omniglot:
    return Omniglot(str(real_root), str(real_cache), download=False)  # decodes once per session


def test_vinyals_split_counts(vinyals: Omniglot) -> None:
    assert vinyals.images.shape == (32460, 1, 28, 28) and len(vinyals.keys) == 1623
    for name, characters in (("train", 1028), ("val", 172), ("test", 423)):
        split = vinyals.split(name)
        assert split.name == f"omniglot/vinyals/{name}"
        assert split.num_classes == 4 * characters and len(split) == 20 * 4 * characters
        assert split.counts.eq(20).all()
        assert vinyals.split(name) is split  # built once
        # the alphabets are the superclasses of sampler=variable's hierarchy, each character's
        # four rotations in its alphabet
        alphabets = [c.split("/")[0] for c in vinyals.classes(name)]
        assert split.groups is not None and len(set(split.groups.tolist())) == len(set(alphabets))
        rotations = split.groups.view(-1, 4)  # [characters, 4 rotations]
        assert (rotations == rotations[:, :1]).all()


def test_training_on_train_and_val_characters(vinyals: Omniglot, real_root: Path, real_cache: Path) -> None:
    """dataset.train_on=train+val (Snell et al. 2017): training holds the validation classes
    too, after the training ones; validation and test are unchanged."""
    both = Omniglot(str(real_root), str(real_cache), train_on="train+val", download=False)
    train, val = vinyals.split("train"), vinyals.split("val")
    merged = both.split("train")
    assert merged.name == "omniglot/vinyals/train+val"
    assert merged.num_classes == 4 * (1028 + 172) and len(merged) == len(train) + len(val)
    assert both.classes("train") == vinyals.classes("train") + vinyals.classes("val")
    assert torch.equal(merged.images, torch.cat([train.images, val.images]))
    for name in ("val", "test"):
        assert both.classes(name) == vinyals.classes(name)
    with pytest.raises(ConfigError, match=r"^dataset.train_on='val' is not allowed: use one of train, train\+val"):
        Omniglot(str(real_root), str(real_cache), train_on="val", download=False)


def test_lake_split_counts(vinyals: Omniglot, real_root: Path, real_cache: Path) -> None:
    lake = Omniglot(str(real_root), str(real_cache), split_scheme="lake", download=False)
    alphabets = {name: sorted({c.split("/")[0] for c in lake.classes(name)}) for name in ("train", "val", "test")}
    background = sorted(alphabets["train"] + alphabets["val"])
    assert len(alphabets["train"]) == 25 and alphabets["val"] == background[-5:]
    assert len(alphabets["test"]) == 20 and not set(alphabets["test"]) & set(background)
    assert lake.split("train").num_classes + lake.split("val").num_classes == 964 * 4
    assert lake.split("test").num_classes == 659 * 4 and len(lake.split("test")) == 659 * 4 * 20
    plain = Omniglot(str(real_root), str(real_cache), split_scheme="lake", rotations=False, download=False)
    assert plain.split("test").num_classes == 659
    assert plain.split("train").num_classes + plain.split("val").num_classes == 964


def test_images_are_uint8_with_ink_and_background(vinyals: Omniglot) -> None:
    images = vinyals.split("val").images
    assert images.dtype == torch.uint8 and images.shape == (688 * 20, 1, 28, 28)
    assert (images == 255).any() and (images <= 32).any()  # white background, dark ink
    assert 128 < images.float().mean() < 255


def test_rotated_classes_are_exact_rot90(vinyals: Omniglot) -> None:
    for name in ("train", "val", "test"):
        assert [c[-6:] for c in vinyals.classes(name)[:4]] == ["rot000", "rot090", "rot180", "rot270"]
        split = vinyals.split(name)
        per_char = split.images.view(-1, 4, 20, 1, 28, 28)  # [characters, rotations, 20, 1, H, W]
        for turns in (1, 2, 3):
            assert torch.equal(per_char[:, turns], torch.rot90(per_char[:, 0], turns, dims=(-2, -1)))


def test_second_construction_hits_cache(
    vinyals: Omniglot, real_root: Path, real_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert (real_cache / "omniglot_28.pt").is_file() and (real_cache / "omniglot_28.npy").is_file()

    def no_decoding(*args: object) -> None:
        raise AssertionError("decoded although the cache was valid")

    monkeypatch.setattr(Omniglot, "_decode", no_decoding)
    again = Omniglot(str(real_root), str(real_cache), download=False)
    assert torch.equal(again.images, vinyals.images) and again.keys == vinyals.keys


def test_episode_shapes(vinyals: Omniglot) -> None:
    episode = vinyals.split("test").episode(torch.Generator().manual_seed(0), 5, 1, 15)
    assert episode.support_x.shape == (5, 1, 28, 28) and episode.query_x.shape == (75, 1, 28, 28)
    assert episode.support_y.tolist() == list(range(5)) and episode.query_y.bincount().tolist() == [15] * 5
    assert episode.query_x.dtype == torch.float32 and 0 <= episode.query_x.min() < episode.query_x.max() <= 1


def test_packaged_split_files_match_shared(real_root: Path) -> None:
    for name in ("train", "val", "test"):
        packaged = PACKAGE_SPLITS / f"{name}.txt"
        assert packaged.stat().st_size < 100_000
        expanded = [f"{c}/rot{d:03d}" for c in packaged.read_text().split() for d in (0, 90, 180, 270)]
        assert expanded == (real_root / "splits" / "vinyals" / f"{name}.txt").read_text().split()


# ---------------------------------------------------------------- no data needed


def test_rot90_turns_like_pil_rotate() -> None:
    """Snell et al. rotate with PIL ``Image.rotate(deg)`` (counter-clockwise)."""
    image = np.random.default_rng(0).integers(0, 256, (7, 7), dtype=np.uint8)
    for turns in (1, 2, 3):
        pil = np.array(Image.fromarray(image).rotate(90 * turns))
        assert torch.equal(torch.rot90(torch.from_numpy(image), turns, dims=(-2, -1)), torch.from_numpy(pil))


@pytest.mark.parametrize(
    "key, value", [("split_scheme", "omniglot"), ("image_size", 0), ("image_size", 2.5), ("image_size", True)]
)
def test_bad_arguments_refused(tmp_path: Path, key: str, value: object) -> None:
    with pytest.raises(ConfigError, match=f"dataset.{key}=") as error:
        Omniglot(str(tmp_path), str(tmp_path), **{key: value})
    if key == "split_scheme":
        assert "vinyals, lake" in str(error.value)


# ---------------------------------------------------------------- fake archives


def _fake_png(seed: int) -> bytes:
    """A 105x105 1-bit drawing: an L-shaped stroke whose place depends on `seed`."""
    image = Image.new("1", (105, 105), 1)
    draw = ImageDraw.Draw(image)
    x, y = 10 + seed % 50, 10 + (seed * 7) % 50
    draw.rectangle((x, y, x + 8, y + 40), fill=0)
    draw.rectangle((x, y + 32, x + 30, y + 40), fill=0)
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


@pytest.fixture(scope="session")
def fake_zips(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Official layout: 2 alphabets x 2 characters x 20 drawings per archive."""
    folder = tmp_path_factory.mktemp("fake_omniglot")
    for part, alphabets in FAKE_ALPHABETS.items():
        with zipfile.ZipFile(folder / f"{part}.zip", "w", zipfile.ZIP_DEFLATED) as archive:
            for a, alphabet in enumerate(alphabets):
                for c in (1, 2):
                    for d in range(1, 21):
                        archive.writestr(
                            f"{part}/{alphabet}/character{c:02d}/{a:02d}{c:02d}_{d:02d}.png",
                            _fake_png(100 * a + 10 * c + d + len(part)),
                        )
    return folder


def _copy_zips(fake_zips: Path, root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for part in FAKE_ALPHABETS:
        (root / f"{part}.zip").write_bytes((fake_zips / f"{part}.zip").read_bytes())
    return root


def _lake(root: Path, cache: Path, **overrides: object) -> Omniglot:
    return Omniglot(str(root), str(cache), split_scheme="lake", **overrides)


def _one_sentence(message: str) -> bool:
    return message.endswith(".") and ". " not in message


def test_fake_zips_decode(fake_zips: Path, tmp_path: Path) -> None:
    data = _lake(fake_zips, tmp_path)
    assert data.images.shape == (160, 1, 28, 28) and data.num_background == 4
    split = data.split("test")
    assert split.name == "omniglot/lake/test" and split.num_classes == FAKE_CLASSES
    assert data.classes("test")[0] == "Delta/character01/rot000"


def test_extracted_folders_match_zips(fake_zips: Path, tmp_path: Path) -> None:
    for part in FAKE_ALPHABETS:
        with zipfile.ZipFile(fake_zips / f"{part}.zip") as archive:
            archive.extractall(tmp_path / "root")
    folders = _lake(tmp_path / "root", tmp_path / "cache_a")
    zips = _lake(fake_zips, tmp_path / "cache_b")
    assert torch.equal(folders.images, zips.images) and folders.keys == zips.keys


def test_process_pool_matches_in_process(fake_zips: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    in_process = _lake(fake_zips, tmp_path / "a")
    monkeypatch.setattr(images, "MIN_IMAGES_PER_WORKER", 1)
    monkeypatch.setattr(images, "CHUNK", 30)
    pooled = _lake(fake_zips, tmp_path / "b")
    assert torch.equal(pooled.images, in_process.images) and torch.equal(pooled.labels, in_process.labels)


def test_cache_is_keyed_by_image_size(fake_zips: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert _lake(fake_zips, tmp_path, image_size=28).images.shape[-1] == 28
    assert _lake(fake_zips, tmp_path, image_size=14).images.shape[-1] == 14
    assert {p.name for p in tmp_path.iterdir()} == {f"omniglot_{s}.{x}" for s in (28, 14) for x in ("npy", "pt")}

    def no_decoding(*args: object) -> None:
        raise AssertionError("decoded although the cache was valid")

    monkeypatch.setattr(Omniglot, "_decode", no_decoding)
    assert _lake(fake_zips, tmp_path, image_size=14).images.shape == (160, 1, 14, 14)
    monkeypatch.undo()
    (tmp_path / "omniglot_14.pt").write_bytes(b"not a cache")  # unreadable: decoded again
    assert _lake(fake_zips, tmp_path, image_size=14).images.shape == (160, 1, 14, 14)
    assert (tmp_path / "omniglot_14.pt").stat().st_size > 1000
    assert (tmp_path / "omniglot_14.npy").stat().st_size >= 160 * 14 * 14


def _serve(fake_zips: Path, monkeypatch: pytest.MonkeyPatch, md5: dict[str, str] | None = None) -> None:
    monkeypatch.setitem(omniglot.OFFICIAL, "base_url", fake_zips.as_uri())
    real = {part: hashlib.md5((fake_zips / f"{part}.zip").read_bytes()).hexdigest() for part in FAKE_ALPHABETS}
    monkeypatch.setitem(omniglot.OFFICIAL, "md5", md5 or real)


def test_download_from_url_with_md5(fake_zips: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _serve(fake_zips, monkeypatch)
    root = tmp_path / "new" / "omniglot"
    data = _lake(root, tmp_path / "cache")
    assert sorted(p.name for p in root.iterdir()) == ["images_background.zip", "images_evaluation.zip"]
    assert data.split("test").num_classes == FAKE_CLASSES


def test_download_with_wrong_md5_refused(fake_zips: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _serve(fake_zips, monkeypatch, md5={part: "0" * 32 for part in FAKE_ALPHABETS})
    with pytest.raises(ConfigError, match="has md5 .* but the official images_background.zip") as error:
        _lake(tmp_path / "omniglot", tmp_path / "cache")
    assert _one_sentence(str(error.value))
    assert list((tmp_path / "omniglot").iterdir()) == []  # neither the archive nor a temp file stays


@pytest.mark.parametrize("how", ["download=False", "unreachable"])
def test_missing_archives_explained(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str) -> None:
    monkeypatch.setitem(omniglot.OFFICIAL, "base_url", (tmp_path / "nowhere").as_uri())
    root = tmp_path / "omniglot"
    with pytest.raises(ConfigError) as error:
        _lake(root, tmp_path / "cache", download=how == "unreachable")
    message = str(error.value)
    assert message.startswith(f"dataset.root={root} has no images_background.zip") and _one_sentence(message)
    assert ("dataset.download=false" if how == "download=False" else "failed") in message
    assert "METARUN_DATA_DIR" in message and "github.com/brendenlake/omniglot" in message


@pytest.mark.parametrize("damage", ["truncated", "corrupt member"])
def test_damaged_archive_refused(fake_zips: Path, tmp_path: Path, damage: str) -> None:
    root = _copy_zips(fake_zips, tmp_path / "omniglot")
    archive = root / "images_evaluation.zip"
    data = bytearray(archive.read_bytes())
    if damage == "truncated":
        data = data[: len(data) // 2]
    else:
        data[len(data) // 3 : len(data) // 3 + 400] = bytes(400)  # inside some member's PNG data
    archive.write_bytes(bytes(data))
    with pytest.raises(ConfigError, match="is truncated or corrupt") as error:
        _lake(root, tmp_path / "cache")
    message = str(error.value)
    assert message.startswith("dataset.root=") and str(archive) in message and "delete it" in message
    assert (
        not (tmp_path / "cache" / "omniglot_28.pt").exists() and not (tmp_path / "cache" / "omniglot_28.npy").exists()
    )


def test_vinyals_needs_every_character(fake_zips: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="dataset.split_scheme=vinyals needs all 1623"):
        Omniglot(str(fake_zips), str(tmp_path))


def test_impossible_episodes_refused(fake_zips: Path, tmp_path: Path) -> None:
    split = _lake(fake_zips, tmp_path).split("test")
    split.check_episode(FAKE_CLASSES, 5, 15, "sampler.")
    with pytest.raises(ConfigError, match=f"sampler.ways={FAKE_CLASSES + 1} is not allowed"):
        split.check_episode(FAKE_CLASSES + 1, 1, 1, "sampler.")
    with pytest.raises(ConfigError, match=r"sampler.shots \+ sampler.queries = 5 \+ 16 = 21"):
        split.check_episode(5, 5, 16, "sampler.")
