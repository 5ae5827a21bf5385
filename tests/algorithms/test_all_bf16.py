"""Every algorithm trains and tests a few steps under hardware=bf16 through the real runner."""

from __future__ import annotations

import math

import pytest

from metarun.train import train

IMAGE = ["anil", "fomaml", "finetune", "lstm_optimizer", "maml", "maml_plus_plus", "matching_net",
         "meta_sgd", "protonet", "relation_net", "reptile"]
REGRESSION = ["cnp", "maml", "np", "reptile"]
SMALL_OMNIGLOT = ["dataset=omniglot", "model.hidden=8", "sampler.ways=3", "sampler.queries=2",
                  "sampler.meta_batch_size=2"]


def check(results: dict) -> None:
    assert results["environment"]["precision"] == "bf16-mixed"
    assert results["train"]["steps"] == 3
    for value in results["test"].values():
        assert math.isfinite(value["mean"]) and value["episodes"] == 4


@pytest.mark.parametrize("algorithm", IMAGE)
def test_image_algorithms_under_bf16(algorithm, make_config, omniglot_available):
    extra = ["algorithm.num_train_classes=4112"] if algorithm == "finetune" else []
    check(train(make_config("hardware=bf16", f"algorithm={algorithm}", *SMALL_OMNIGLOT, *extra))[0])


@pytest.mark.parametrize("algorithm", REGRESSION)
def test_regression_algorithms_under_bf16(algorithm, make_config):
    check(train(make_config("hardware=bf16", f"algorithm={algorithm}"))[0])
