"""The recipes of CONTRIBUTING.md, enforced: every learner, dataset and backbone config has its
module, its test file and its docs entry; groups own their keys; published numbers are written
once; the repository refers to nothing outside it; the suite's tests that share a module fixture
run on one worker."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hydra.utils import get_class

from metarun.algorithms.base import MetaAlgorithm
from metarun.datasets.base import Dataset
from metarun.published import published

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"


def own_target(path: Path) -> str | None:
    """The config's own ``_target_`` (None for a variant that only sets defaults of another)."""
    return (yaml.safe_load(path.read_text()) or {}).get("_target_")


def mentions(page: str, group: str, name: str) -> bool:
    """Whether docs/<page> names the option as `name` or `group=name`."""
    return re.search(rf"`({group}=)?{name}`", (ROOT / "docs" / page).read_text()) is not None


def configs(group: str) -> list[Path]:
    return sorted((CONF / group).glob("*.yaml"))


@pytest.mark.parametrize("path", configs("algorithm"), ids=lambda p: p.stem)
def test_a_learner_has_its_file_its_test_and_its_docs(path: Path) -> None:
    name, target = path.stem, own_target(path)
    if target is None:  # a variant (fomaml: maml with first_order) is tested with its parent
        parent = yaml.safe_load(path.read_text())["defaults"][0]
        assert (CONF / "algorithm" / f"{parent}.yaml").exists(), f"{path} names no _target_ and no parent"
        return
    assert target.startswith(f"metarun.algorithms.{name}."), (
        f"{path}: its class belongs in metarun/algorithms/{name}.py"
    )
    assert issubclass(get_class(target), MetaAlgorithm)
    assert (ROOT / "tests" / "algorithms" / f"test_{name}.py").exists(), f"tests/algorithms/test_{name}.py is missing"
    assert mentions("algorithms.md", "algorithm", name), f"docs/algorithms.md does not mention {name}"


@pytest.mark.parametrize("path", configs("dataset"), ids=lambda p: p.stem)
def test_a_dataset_has_its_file_its_test_its_companions_and_its_docs(path: Path) -> None:
    name, target = path.stem, own_target(path)
    assert target and target.startswith(f"metarun.datasets.{name}."), f"{path}: its class belongs in {name}.py"
    assert issubclass(get_class(target), Dataset), f"{target} does not keep the Dataset contract"
    assert (ROOT / "tests" / "datasets" / f"test_{name}.py").exists(), f"tests/datasets/test_{name}.py is missing"
    assert (CONF / "experiment" / "dataset" / f"{name}.yaml").exists(), f"experiment/dataset/{name}.yaml is missing"
    assert mentions("datasets.md", "dataset", name), f"docs/datasets.md does not mention {name}"


@pytest.mark.parametrize("path", configs("model"), ids=lambda p: p.stem)
def test_a_backbone_has_its_file_and_its_test_and_reads_the_dataset(path: Path) -> None:
    name, config = path.stem, yaml.safe_load(path.read_text())
    assert config["_target_"].startswith(f"metarun.models.{name}."), f"{path}: its class belongs in {name}.py"
    assert (ROOT / "tests" / "models" / f"test_{name}.py").exists(), f"tests/models/test_{name}.py is missing"
    if "in_channels" in config:  # an image backbone: the dataset's facts, the learner's head
        assert config["in_channels"] == "${dataset.channels}" and config["image_size"] == "${dataset.image_size}"
        assert config["out_features"] == "auto"


def test_groups_own_their_keys() -> None:
    for group in ("dataset", "algorithm", "model", "sampler", "transform", "logger"):
        for path in configs(group):
            assert "@package _global_" not in path.read_text(), f"{path} writes other groups' keys"
    assert not (CONF / "test_dataset").exists()  # the dataset group is mounted a second time


def test_published_numbers_are_written_once() -> None:
    """Numbers live in metarun/published.csv; presets and scripts name it, never a figure."""
    rows = published()
    presets = {p.stem for p in configs("experiment")}
    assert {r.preset for r in rows if r.preset} <= presets
    number = re.compile(r"\b\d{2}\.\d+ (\+- [\d.]+ )?%")
    for path in [*CONF.rglob("*.yaml"), *(ROOT / "scripts").glob("*.py")]:
        assert not number.search(path.read_text()), f"{path} types a published number"


def test_the_repository_refers_to_nothing_outside_it() -> None:
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    if not tracked:
        pytest.skip("not a git checkout")
    outside = re.compile(r"\.\./shared|shared/design\.md")
    for name in tracked:
        if (
            name == ".ci/run"
            or not (ROOT / name).exists()
            or not name.endswith((".py", ".md", ".yaml", ".yml", ".sh", ".toml", "Makefile"))
        ):
            continue  # .ci/run is where CI points the tests at its data
        text = (ROOT / name).read_text(errors="replace")
        assert not outside.search(text), f"{name} refers to a file outside the repository"


def test_readme_is_short() -> None:
    assert len((ROOT / "README.md").read_text().splitlines()) <= 200


SHARED_FIXTURE = """
import os
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def costly():
    with open(Path(__file__).parent / "built", "a") as f:
        f.write(f"{os.getpid()}\\n")


@pytest.mark.parametrize("i", range(6))
def test_uses_it(costly, i):
    pass


@pytest.mark.parametrize("i", range(4))
def test_does_not(i):
    pass
"""


def test_tests_sharing_a_module_fixture_build_it_once_over_two_workers(tmp_path: Path) -> None:
    """`make test`'s scheduling (tests/grouping.py under `--dist loadgroup`) really sends the
    tests that share a module fixture to one worker: with pytest 9.2 and xdist 3.8 the group
    was silently dropped and every worker built the fixture again."""
    (tmp_path / "conftest.py").write_text(
        f"import sys\n\nsys.path.insert(0, {str(ROOT)!r})\n"
        "from tests.grouping import pytest_collection_modifyitems  # noqa: E402, F401\n"
    )
    (tmp_path / "test_shared.py").write_text(SHARED_FIXTURE)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "COV_"))}
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-n", "2", "--dist", "loadgroup", "-p", "no:cacheprovider", "."],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "10 passed" in done.stdout
    assert len((tmp_path / "built").read_text().splitlines()) == 1  # built once, on one worker
