"""A user's own class folders: seeded ratio or class-list splits, any format, grey or RGB;
and the one-sentence errors of damaged data, through the `metarun` command (exit 2)."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import pytest
import torch

from metarun.cli import exit_on_config_error
from metarun.datasets.image_folder import ImageFolder
from metarun.errors import ConfigError
from metarun.runner import train
from tests.conftest import compose_config, finish, launch
from tests.datasets.conftest import check_cache_reused
from tests.datasets.standins import cifar_archive, image_folder, mini_imagenet_csv


def _load(root: Path, cache: Path, **kwargs) -> ImageFolder:
    return ImageFolder(str(root), str(cache), **{"image_size": 16, **kwargs})


def test_ratio_split_is_seeded_and_disjoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = image_folder(tmp_path / "mine", classes=10)
    data = _load(root, tmp_path / "cache")
    names = {split: data.classes(split) for split in ("train", "val", "test")}
    assert [len(names[s]) for s in ("train", "val", "test")] == [6, 2, 2]
    assert sorted(sum(names.values(), [])) == sorted(p.name for p in root.iterdir())
    assert _load(root, tmp_path / "cache").assignment == data.assignment  # same seed, same split
    assert _load(root, tmp_path / "cache", split_seed=1).assignment != data.assignment
    assert data.split("train").num_classes == 6 and set(data.split("train").counts.tolist()) == {4}
    check_cache_reused(lambda: _load(root, tmp_path / "cache"), monkeypatch)


def test_grey_and_rgb_files_become_the_asked_channels(tmp_path: Path) -> None:
    root = image_folder(tmp_path / "mine", classes=6, grey_every=2)
    rgb = _load(root, tmp_path / "cache").split("train").images
    grey = _load(root, tmp_path / "cache", channels=1, mean=None, std=None).split("train").images
    assert rgb.shape[1] == 3 and grey.shape[1] == 1
    assert not torch.equal(rgb[:, 0], rgb[:, 1])  # the colour classes keep their colour


def test_split_files(tmp_path: Path) -> None:
    root = image_folder(tmp_path / "mine", classes=5)
    files = {}
    for split, classes in (("train", [0, 1, 2]), ("val", [3]), ("test", [4])):
        files[split] = str(tmp_path / f"{split}.txt")
        Path(files[split]).write_text("".join(f"class_{c:02d}\n" for c in classes))
    data = _load(root, tmp_path / "cache", split_files=files)
    assert data.classes("train") == ["class_00", "class_01", "class_02"] and data.classes("test") == ["class_04"]
    Path(files["val"]).write_text("class_03\nclass_00\n")
    with pytest.raises(ConfigError, match="class class_00 is also in the train split"):
        _load(root, tmp_path / "cache", split_files=files)
    Path(files["val"]).write_text("class_99\n")
    with pytest.raises(ConfigError, match="class_99 is not a class folder"):
        _load(root, tmp_path / "cache", split_files=files)
    with pytest.raises(ConfigError, match="dataset.split_files="):
        _load(root, tmp_path / "cache", split_files={"train": files["train"]})


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"split_ratio": [0.5, 0.5]}, "dataset.split_ratio=[0.5, 0.5] is not allowed"),
        ({"split_ratio": [0.8, 0.3, 0.1]}, "that sum to 1"),
        ({"split_ratio": [0.1, 0.45, 0.45]}, "it leaves no training class"),
        ({"split_seed": -1}, "dataset.split_seed=-1 is not allowed"),
    ],
)
def test_bad_split_settings(tmp_path: Path, kwargs: dict, message: str) -> None:
    root = image_folder(tmp_path / "mine", classes=4)
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        _load(root, tmp_path / "cache", **kwargs)


def test_too_few_classes_and_no_root(tmp_path: Path) -> None:
    root = image_folder(tmp_path / "mine", classes=2)
    with pytest.raises(ConfigError, match="has 2 class folders with images"):
        _load(root, tmp_path / "cache")
    with pytest.raises(ConfigError, match="dataset.root=null is not allowed"):
        ImageFolder(None, str(tmp_path / "cache"))  # type: ignore[arg-type]


def huge_png(path: Path, width: int, height: int) -> Path:
    """A PNG whose header says ``width`` x ``height`` grey pixels (a decompression bomb as far
    as any reader can tell before decoding), written in a few bytes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    )
    return path


def test_an_image_over_the_pixel_limit_is_refused_and_the_limit_can_be_raised(tmp_path: Path) -> None:
    from metarun.datasets.images import ImageTooLarge, open_image

    path = huge_png(tmp_path / "big.png", 12000, 12000)  # 144 M pixels: under PIL's own refusal
    with pytest.raises(ImageTooLarge, match="12000×12000 = 144,000,000 pixels, more than 89,478,485"):
        open_image(path)
    with open_image(path, 200_000_000) as image:  # raised: opened (its pixels are not read here)
        assert image.size == (12000, 12000)
    with pytest.raises(ImageTooLarge, match="400,000,000 pixels"):  # over twice the limit: PIL's refusal
        open_image(huge_png(tmp_path / "bigger.png", 20000, 20000))


@pytest.mark.slow
def test_damaged_data_is_one_sentence_through_the_command(tmp_path: Path) -> None:
    """Damaged images, archives and missing files, through the command: exit 2, one sentence."""
    mine = image_folder(tmp_path / "mine", classes=6)
    victim = sorted((mine / "class_03").iterdir())[0]
    victim.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(20))
    text = image_folder(tmp_path / "text", classes=6)  # a text file named like an image
    not_image = sorted((text / "class_02").iterdir())[0].with_suffix(".png")
    not_image.write_text("these are notes, not a picture\n")
    huge = image_folder(tmp_path / "huge", classes=6)
    huge_png(huge / "class_01" / "scan.png", 20000, 20000)
    data = tmp_path / "data"
    archive = cifar_archive(data / "cifar100") / "cifar-100-python.tar.gz"
    archive.write_bytes(archive.read_bytes()[:5000])
    mini = mini_imagenet_csv(data / "mini_imagenet", per_class=2)
    (mini / "images" / sorted(p.name for p in (mini / "images").iterdir())[0]).unlink()
    cut = data / "bscd_fsl" / "eurosat" / "EuroSAT.zip"  # a download cut short, placed by hand
    cut.parent.mkdir(parents=True)
    cut.write_bytes(b"PK\x03\x04" + bytes(100))
    (data / "bscd_fsl" / "chestx").mkdir()  # the label table placed, NIH's archives not
    (data / "bscd_fsl" / "chestx" / "Data_Entry_2017.csv").write_text("Image Index,Finding Labels\n")
    common = ["algorithm=protonet", f"paths.cache_dir={tmp_path / 'cache'}", f"paths.data_dir={data}"]
    runs = {
        "image": [*common, "dataset=image_folder", f"dataset.root={mine}", "dataset.image_size=16"],
        "not_image": [*common, "dataset=image_folder", f"dataset.root={text}", "dataset.image_size=16"],
        "huge": [*common, "dataset=image_folder", f"dataset.root={huge}", "dataset.image_size=16"],
        "archive": [*common, "dataset=cifar_fs", "dataset.download=false"],
        "missing": [*common, "dataset=mini_imagenet", "dataset.image_size=16"],
        "test_dataset_missing": [*common, "dataset=cifar_fs", "test_dataset=cub", "dataset.download=false"],
        "eurosat": [*common, "dataset=cifar_fs", "dataset.download=false", "test_dataset=bscd_fsl"],
        "chestx": [
            *common,
            "dataset=cifar_fs",
            "dataset.download=false",
            "test_dataset=bscd_fsl",
            "test_dataset.domain=chestx",
            "test_dataset.download=false",
        ],
    }
    expected = {
        "image": (f"dataset.root={mine}: {victim} is truncated or corrupt", "so replace it"),
        "not_image": (f"{not_image} is truncated or corrupt (it is not an image PIL can read",),
        "huge": (
            f"{huge / 'class_01' / 'scan.png'} is not allowed: it has 400,000,000 pixels, more than 89,478,485",
            "raise dataset.max_image_pixels",
        ),
        "archive": ("cifar-100-python.tar.gz is truncated or corrupt", "eb9058c3a382ffc7106e4002c42a8d85"),
        "missing": ("has no image", "ImageNet's terms do not allow metarun to download them"),
        "test_dataset_missing": (f"test_dataset.root={data / 'cub'} has no class folder", "CUB_200_2011.tgz"),
        "eurosat": (f"{cut} is truncated or corrupt", "so replace it"),
        "chestx": ("has no chestx/images folder nor the archives images_001.tar.gz ... images_012.tar.gz", "42 GB"),
    }
    procs = {key: launch(tmp_path / key, *overrides) for key, overrides in runs.items()}
    for key, proc in procs.items():
        done = finish(proc)
        lines = [line for line in done.stderr.splitlines() if line.startswith("metarun: error: ")]
        assert done.returncode == 2 and len(lines) == 1, (key, done.stderr[-2000:])
        assert all(part in lines[0] for part in expected[key]), (key, lines[0])
        assert lines[0].endswith(".") and "Traceback" not in done.stderr and "BytesIO" not in done.stderr, key


IMAGE_SETTINGS = {  # refused before any data is looked for: (overrides, parts of the sentence)
    "transform": (["transform=standard"], ("transform=Augment is not allowed with dataset=Sinusoid", "drop the")),
    "test_dataset": (
        ["algorithm=protonet", "dataset=mini_imagenet", "test_dataset=cub", "test_dataset.image_size=32"],
        ("test_dataset.image_size=32 is not allowed: a cross-domain test set takes dataset.image_size", "drop the"),
    ),
    "transform_value": (
        ["algorithm=protonet", "dataset=omniglot", "transform=standard", "transform.crop=zoom"],
        ("transform.crop='zoom' is not allowed: use one of none, pad, resized",),
    ),
    "timm_name": (
        ["algorithm=protonet", "dataset=cifar_fs", "model=timm", "model.name=resnet181"],
        ("model.name='resnet181' is not allowed: timm has no such model", "resnet18"),
    ),
    "resnet12": (
        ["algorithm=protonet", "dataset=cifar_fs", "model=resnet12", "model.drop_rate=1.5"],
        ("model.drop_rate=1.5 is not allowed: it must be a number in [0, 1)",),
    ),
    "split_ratio": (
        ["algorithm=protonet", "dataset=image_folder", "dataset.root={mine}", "dataset.split_ratio=[0.5,0.5]"],
        ("dataset.split_ratio=[0.5, 0.5] is not allowed", "sum to 1"),
    ),
}


@pytest.mark.parametrize("key", IMAGE_SETTINGS)
def test_image_group_settings_are_one_sentence(key, tmp_path: Path, capsys) -> None:
    """The image groups' settings (and image-only groups on sinusoids), through the command's
    own error wrapper: exit 2, one sentence, and no data looked for."""
    overrides, parts = IMAGE_SETTINGS[key]
    if any("{mine}" in o for o in overrides):  # a real folder, whose split is then refused
        mine = image_folder(tmp_path / "mine", classes=6)
        overrides = [o.format(mine=mine) for o in overrides]
    paths = [f"paths.cache_dir={tmp_path / 'cache'}", f"paths.data_dir={tmp_path / 'data'}"]
    with pytest.raises(SystemExit) as exited:
        exit_on_config_error(train)(compose_config([*overrides, *paths], tmp_path / "run"))
    err = capsys.readouterr().err
    assert exited.value.code == 2 and err.startswith("metarun: error: ") and err.count("\n") == 1, err
    assert all(part in err for part in parts) and err.rstrip().endswith("."), err
    assert not (tmp_path / "cache").exists()
