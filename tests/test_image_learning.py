"""Each new image path learns: 84x84 RGB class folders whose classes truly differ (a shape and
a colour per class, `tests.datasets.standins.class_image`), meta-trained a few dozen steps
through the composed config; test accuracy on unseen classes rises above chance (20%)
and above the untrained learner's, on the same fixed test episodes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from metarun.build import build
from tests.algorithms.learning import assert_learns
from tests.conftest import compose_config
from tests.datasets.standins import image_folder

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    return image_folder(tmp_path_factory.mktemp("shapes"), classes=40, per_class=10, size=84, grey_every=0)


# The backbones at a quarter of the pixels (42x42); the augmentation at the benchmarks' 84x84.
# Outer steps per path: Conv4 measured after 25 steps at 0.79-0.81 accuracy, gain 0.17-0.22
# (seeds 0-2); ResNet-12 needs 40 (a gain of 0.10 after 20 steps on one seed).
PATHS = {
    "conv4_transform_standard": (25, ["model.hidden=32", "transform=standard", "dataset.image_size=84"]),
    "resnet12": (40, ["model=resnet12", "model.widths=[16,24,32,32]", "dataset.image_size=42"]),
    "timm": (40, ["model=timm", "model.name=test_efficientnet_gn", "dataset.image_size=42"]),
}


@pytest.mark.parametrize("path", sorted(PATHS))
def test_protonet_learns_unseen_image_classes(shapes: Path, tmp_path: Path, path: str) -> None:
    cfg = compose_config(
        [
            "dataset=image_folder",
            f"dataset.root={shapes}",
            "dataset.split_ratio=[0.5,0.25,0.25]",
            "algorithm=protonet",
            "sampler.shots=1",
            "sampler.queries=5",
            "sampler.meta_batch_size=2",
            "logger=none",
            f"paths.cache_dir={tmp_path / 'cache'}",
            *PATHS[path][1],
        ],
        tmp_path,
    )
    objects = build(cfg)
    alg, sampler, data = objects["algorithm"], objects["sampler"], objects["datamodule"]
    opt = torch.optim.Adam(alg.parameters(), lr=1e-3)

    def fit() -> None:
        alg.train()
        for step in range(PATHS[path][0]):
            loss = alg.meta_loss(data.train_batch(step)).loss
            opt.zero_grad()
            loss.backward()
            opt.step()

    assert_learns(alg, sampler, data.splits["test"], fit, at_least=0.7, gain=0.1, episodes=60)
