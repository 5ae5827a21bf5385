"""A learner and a dataset added from outside the repository (a temporary package and a config
folder on METARUN_CONFIG_PATH), with no file of metarun edited: the suite's lists, training,
metarun-predict and the results table all pick them up."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from metarun.catalog import ENV, classes, learners_for
from tests.conftest import COMMAND_ENV, METARUN, PREDICT, ROOT, TINY

LEARNER = '''"""A throw-away learner: Prototypical Networks under another name."""
from metarun.algorithms.protonet import ProtoNet


class Toy(ProtoNet):
    """ProtoNet, as a learner that metarun has never heard of."""
'''

DATASET = '''"""A throw-away dataset: grey 16-px images, one brightness level per class."""
import torch

from metarun.datasets import images
from metarun.datasets.base import ClassImages, Dataset


class Bright(Dataset):
    """Class c is images of brightness about 20 * c, with noise from a fixed generator."""

    def __init__(self, image_size: int = 16, channels: int = 1, classes: int = 12) -> None:
        self.image_size, self.channels, self.classes = image_size, channels, classes

    def split(self, name):
        g = torch.Generator().manual_seed(["train", "val", "test"].index(name))
        labels = torch.arange(self.classes).repeat_interleave(4)  # [C*4]
        noise = torch.randint(0, 10, (len(labels), self.channels, self.image_size, self.image_size), generator=g)
        pixels = (labels.view(-1, 1, 1, 1) * 20 + noise).clamp(0, 255).to(torch.uint8)
        return ClassImages(pixels, labels, f"bright/{name}")

    @staticmethod
    def prepare_image(image, size, channels):
        return images.prepare_image(image, size, channels)
'''


@pytest.fixture
def outside(tmp_path, monkeypatch):
    """The package (toy_ext) and its config folder, and the environment that finds them."""
    package = tmp_path / "site" / "toy_ext"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "toy.py").write_text(LEARNER)
    (package / "bright.py").write_text(DATASET)
    conf = tmp_path / "conf"
    for path, text in {
        "algorithm/toy.yaml": "_target_: toy_ext.toy.Toy\n",
        "dataset/bright.yaml": "_target_: toy_ext.bright.Bright\nimage_size: 16\nchannels: 1\n",
        "experiment/dataset/bright.yaml": (
            "# @package _global_\ndefaults:\n  - /model: conv4\nsampler:\n  ways: 3\n  shots: 1\n  queries: 2\n"
        ),
    }.items():
        (conf / path).parent.mkdir(parents=True, exist_ok=True)
        (conf / path).write_text(text)
    monkeypatch.setenv(ENV, str(conf))
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    env = {
        **COMMAND_ENV,
        ENV: str(conf),
        "PYTHONPATH": os.pathsep.join([str(tmp_path / "site"), COMMAND_ENV.get("PYTHONPATH", "")]).rstrip(os.pathsep),
    }
    return env


def command(env: dict[str, str], *argv: str) -> None:
    """An installed metarun command in ``env``; it must succeed."""
    done = subprocess.run(list(argv), cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def test_a_learner_and_a_dataset_from_outside_are_picked_up_everywhere(outside, tmp_path):
    # the suite's lists (tests/conftest.py's algorithms() is learners_for)
    assert "toy" in learners_for("classification") and "toy" not in learners_for("regression")
    assert "bright" in classes("dataset")
    # training through the command
    run = tmp_path / "run"
    command(outside, METARUN, "dataset=bright", "algorithm=toy", *TINY, f"hydra.run.dir={run}")
    results = json.loads((run / "results.json").read_text())
    assert results["experiment"]["algorithm"] == "Toy" and results["experiment"]["dataset"] == "Bright"
    assert results["config"]["model"]["out_features"] is None  # the learner says it has no head
    # metarun-predict on images of 4 classes (a head-free learner takes any number of ways)
    from PIL import Image

    for part, count in (("support", 1), ("query", 2)):
        for c in range(4):
            for i in range(count):
                path = tmp_path / part / f"level_{c}" / f"{i}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.new("L", (16, 16), 20 * c + i).save(path)
    command(
        outside,
        PREDICT,
        f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}",
        f"support={tmp_path / 'support'}",
        f"query={tmp_path / 'query'}",
        f"hydra.run.dir={tmp_path / 'predict'}",
    )
    report = json.loads((tmp_path / "predict" / "predict.json").read_text())
    assert report["queries"] == 8 and len(report["support"]) == 4
    # the results table's rows (scripts/bench_grid.py) are read from conf/ at import
    spec = importlib.util.spec_from_file_location("bench_grid_outside", ROOT / "scripts" / "bench_grid.py")
    grid = importlib.util.module_from_spec(spec)
    sys.modules.pop("bench_grid_outside", None)
    spec.loader.exec_module(grid)
    assert grid.OMNIGLOT["toy"] == ("toy", "toy", [])
