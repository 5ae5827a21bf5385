"""``test_dataset=bscd_fsl``: BSCD-FSL's four target domains (Guo et al. 2020), each read from
the layout the benchmark's loaders read, on stand-ins built here in those layouts."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import tarfile
import zipfile
from pathlib import Path

import pytest

from metarun.datasets import bscd_fsl
from metarun.datasets.bscd_fsl import BSCDFSL, CHESTX, CROP_DISEASES, EUROSAT, ISIC
from metarun.errors import ConfigError
from metarun.runner import train
from tests.conftest import COMMAND_ENV, EVAL, ROOT, TINY, compose_config
from tests.datasets import standins
from tests.datasets.standins import bscd_folders, chestx_layout

PER_CLASS = 4


def folders(base: Path, classes: list[str]) -> None:
    bscd_folders(base, classes, PER_CLASS)


@pytest.fixture(scope="module")
def layouts(tmp_path_factory) -> Path:
    """Each domain's stand-in under <root>/<domain>, in its published layout."""
    return standins.bscd_fsl(tmp_path_factory.mktemp("bscd_fsl"), PER_CLASS)


@pytest.mark.parametrize(
    "domain, classes",
    [("eurosat", EUROSAT), ("crop_diseases", None), ("isic", ISIC), ("chestx", CHESTX)],
)
def test_each_domain_reads_its_published_layout(domain, classes, layouts, tmp_path):
    data = BSCDFSL(root=str(layouts), cache_dir=str(tmp_path), domain=domain, image_size=16)
    test = data.split("test")
    count = len(classes) if classes else CROP_DISEASES
    assert test.num_classes == count and len(test) == count * PER_CLASS
    assert test.counts.tolist() == [PER_CLASS] * count
    if classes:
        assert data.classes("test") == classes
    assert tuple(test.images.shape[1:]) == (3, 16, 16)
    with pytest.raises(ConfigError, match=rf"BSCD-FSL's {domain} is a meta-test set only"):
        data.split("train")


def test_layout_mistakes_are_one_sentence(layouts, tmp_path):
    with pytest.raises(ConfigError, match=r"dataset.domain='plants' is not allowed: choose one of crop_diseases"):
        BSCDFSL(root=str(layouts), cache_dir=str(tmp_path), domain="plants")
    empty = tmp_path / "empty"
    (empty / "eurosat").mkdir(parents=True)
    with pytest.raises(ConfigError, match=r"has no eurosat/2750 folder \(BSCD-FSL's eurosat: 2750/<class>/<image>"):
        BSCDFSL(root=str(empty), cache_dir=str(tmp_path), domain="eurosat", download=False).split("test")
    wrong = tmp_path / "wrong"
    folders(wrong / "eurosat" / "2750", EUROSAT[:9])
    with pytest.raises(
        ConfigError, match=r"eurosat/2750 holds 9 class folders .* but BSCD-FSL's eurosat has AnnualCrop"
    ):
        BSCDFSL(root=str(wrong), cache_dir=str(tmp_path), domain="eurosat").split("test")
    with pytest.raises(ConfigError, match=r"has no chestx/Data_Entry_2017.csv"):
        BSCDFSL(root=str(empty), cache_dir=str(tmp_path), domain="chestx").split("test")


def test_train_on_omniglot_and_meta_test_on_a_bscd_domain(omniglot_available, layouts, tmp_path):
    overrides = [
        *TINY,
        "dataset=omniglot",
        "algorithm=protonet",
        "model.hidden=8",
        "test_dataset=bscd_fsl",
        "test_dataset.domain=isic",
        f"test_dataset.root={layouts}",
        "sampler.queries=2",
    ]
    results, _ = train(compose_config(overrides, tmp_path))
    assert results["experiment"]["test_dataset"] == "BSCDFSL"
    assert results["test"]["accuracy"]["episodes"] == 4


def test_one_eval_command_meta_tests_a_checkpoint_on_each_domain_and_shot(omniglot_available, layouts, tmp_path):
    """``metarun-eval -m`` on a run trained with test_dataset=bscd_fsl: one job per domain and
    shot, each on that domain's test episodes (the installed command, as users run it)."""
    overrides = [
        *TINY,
        "dataset=omniglot",
        "algorithm=protonet",
        "model.hidden=8",
        "test_dataset=bscd_fsl",
        f"test_dataset.root={layouts}",
        "sampler.queries=1",
    ]
    train(compose_config(overrides, tmp_path / "run"))
    sweep = tmp_path / "sweep"
    argv = [
        EVAL,
        "-m",
        f"ckpt_path={tmp_path / 'run' / 'checkpoints' / 'last.ckpt'}",
        "test_dataset.domain=isic,chestx",
        "sampler.shots=1,3",
        f"hydra.sweep.dir={sweep}",
    ]
    done = subprocess.run(argv, cwd=ROOT, env=COMMAND_ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    jobs = [json.loads(p.read_text()) for p in sorted(sweep.glob("*/results.json"))]
    seen = {(j["config"]["test_dataset"]["domain"], j["experiment"]["shots"]) for j in jobs}
    assert seen == {("isic", 1), ("isic", 3), ("chestx", 1), ("chestx", 3)}
    assert all(j["test"]["accuracy"]["episodes"] == 4 and j["experiment"]["test_dataset"] == "BSCDFSL" for j in jobs)


def eurosat_zip(path: Path, extra: dict[str, bytes] | None = None) -> str:
    """A stand-in of EuroSAT.zip (its 2750/<class>/ folders) at ``path``; its md5."""
    folders(path.parent / "src" / "2750", EUROSAT)
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as z:
        for file in sorted((path.parent / "src").rglob("*.jpg")):
            z.write(file, file.relative_to(path.parent / "src").as_posix())
        for name, data in (extra or {}).items():
            z.writestr(name, data)
    shutil.rmtree(path.parent / "src")
    return hashlib.md5(path.read_bytes(), usedforsecurity=False).hexdigest()


def test_eurosat_is_fetched_md5_checked_and_extracted(tmp_path, monkeypatch):
    """The one domain whose licence lets metarun fetch it: from its URL (here a local file),
    md5-checked, its 2750/ folder extracted; a placed archive is extracted without fetching;
    a wrong md5, a failed download and an archive that escapes its folder are one sentence."""
    served = tmp_path / "served" / "EuroSAT.zip"
    md5 = eurosat_zip(served)
    monkeypatch.setattr(bscd_fsl, "EUROSAT_URL", served.as_uri())
    monkeypatch.setattr(bscd_fsl, "EUROSAT_MD5", md5)
    fetched = tmp_path / "fetched"
    test = BSCDFSL(root=str(fetched), cache_dir=str(tmp_path / "c1"), domain="eurosat", image_size=16).split("test")
    assert test.num_classes == len(EUROSAT) and len(test) == len(EUROSAT) * PER_CLASS
    assert sorted(p.name for p in (fetched / "eurosat").iterdir()) == ["2750", "EuroSAT.zip"]  # nothing partial left

    placed = tmp_path / "placed"
    eurosat_zip(placed / "eurosat" / "EuroSAT.zip")
    monkeypatch.setattr(bscd_fsl, "EUROSAT_URL", (tmp_path / "nowhere.zip").as_uri())  # would fail if fetched
    data = BSCDFSL(root=str(placed), cache_dir=str(tmp_path / "c2"), domain="eurosat", image_size=16, download=False)
    assert data.classes("test") == EUROSAT

    with pytest.raises(ConfigError, match=r"has no eurosat/EuroSAT.zip; downloading .*nowhere.zip failed"):
        BSCDFSL(root=str(tmp_path / "offline"), cache_dir=str(tmp_path / "c3"), domain="eurosat").split("test")
    monkeypatch.setattr(bscd_fsl, "EUROSAT_URL", served.as_uri())
    monkeypatch.setattr(bscd_fsl, "EUROSAT_MD5", "0" * 32)
    with pytest.raises(ConfigError, match=rf"has md5 {md5} but the official EuroSAT.zip has md5 0{{32}}, so it was"):
        BSCDFSL(root=str(tmp_path / "tampered"), cache_dir=str(tmp_path / "c4"), domain="eurosat").split("test")
    assert not list((tmp_path / "tampered" / "eurosat").iterdir())  # the wrong download is deleted

    escaping = tmp_path / "escaping"
    eurosat_zip(escaping / "eurosat" / "EuroSAT.zip", {"2750/../../outside.txt": b"x"})
    with pytest.raises(
        ConfigError, match=r"EuroSAT.zip is truncated or corrupt \(its member 2750/../../outside.txt"
    ) as e:
        BSCDFSL(root=str(escaping), cache_dir=str(tmp_path / "c5"), domain="eurosat", download=False).split("test")
    assert str(e.value).count("truncated or corrupt") == 1  # one sentence, not wrapped twice
    assert sorted(p.name for p in (escaping / "eurosat").iterdir()) == ["EuroSAT.zip"]


def md5_of(path: Path) -> str:
    return hashlib.md5(path.read_bytes(), usedforsecurity=False).hexdigest()


def test_chestx_archives_are_fetched_md5_checked_and_extracted(tmp_path, monkeypatch):
    """Without images/, NIH's archives (here two stand-ins, one placed and one served from a
    local file) are md5-checked when fetched and their images/ extracted into one folder;
    Data_Entry_2017.csv, which cannot be fetched, is asked for before anything is downloaded; a
    missing archive without download, and a member leaving images/, are one sentence each."""
    source = tmp_path / "source" / "chestx"
    chestx_layout(source)
    pngs = sorted((source / "images").iterdir())
    served = tmp_path / "served"
    served.mkdir()
    archives = {}
    for part, members in (("images_001.tar.gz", pngs[::2]), ("images_002.tar.gz", pngs[1::2])):
        with tarfile.open(served / part, "w:gz") as tar:
            for png in members:
                tar.add(png, f"images/{png.name}")
        archives[part] = ((served / part).as_uri(), md5_of(served / part))
    monkeypatch.setattr(bscd_fsl, "CHESTX_ARCHIVES", archives)

    root = tmp_path / "root"
    (root / "chestx").mkdir(parents=True)
    with pytest.raises(ConfigError, match=r"has no chestx/Data_Entry_2017.csv"):  # asked for first
        BSCDFSL(root=str(root), cache_dir=str(tmp_path / "c0"), domain="chestx").split("test")
    assert not list((root / "chestx").iterdir())  # nothing was fetched
    shutil.copy(source / "Data_Entry_2017.csv", root / "chestx")
    with pytest.raises(
        ConfigError, match=r"has no chestx/images folder nor the archives images_001.tar.gz ... images_002.tar.gz"
    ):
        BSCDFSL(root=str(root), cache_dir=str(tmp_path / "c1"), domain="chestx", download=False).split("test")
    shutil.copy(served / "images_001.tar.gz", root / "chestx")  # placed by hand; the other is fetched
    data = BSCDFSL(root=str(root), cache_dir=str(tmp_path / "c2"), domain="chestx", image_size=16)
    test = data.split("test")
    assert data.classes("test") == CHESTX and len(test) == len(CHESTX) * PER_CLASS
    assert sorted(p.name for p in (root / "chestx" / "images").iterdir()) == [p.name for p in pngs]
    assert sorted(p.name for p in (root / "chestx").iterdir()) == [  # nothing partial left
        "Data_Entry_2017.csv",
        "images",
        "images_001.tar.gz",
        "images_002.tar.gz",
    ]

    escaping = tmp_path / "escaping" / "chestx"
    escaping.mkdir(parents=True)
    shutil.copy(source / "Data_Entry_2017.csv", escaping)
    shutil.copy(served / "images_001.tar.gz", escaping)
    with tarfile.open(escaping / "images_002.tar.gz", "w:gz") as tar:
        tar.add(pngs[1], "images/../../outside.png")
    with pytest.raises(
        ConfigError, match=r"images_002.tar.gz is truncated or corrupt \(its member images/../../outside.png leaves"
    ):
        BSCDFSL(root=str(escaping.parent), cache_dir=str(tmp_path / "c3"), domain="chestx").split("test")
    assert sorted(p.name for p in escaping.iterdir()) == ["Data_Entry_2017.csv", *archives]  # no images/, no staging
    assert not (tmp_path / "outside.png").exists()
