"""Every algorithm trains and tests a few steps under hardware=bf16 (in this process) and
hardware=ddp (2 CPU processes over gloo, through the installed command) with the real runner."""

from __future__ import annotations

import math

import pytest

from metarun.runner import train
from tests.conftest import DDP, NEEDS, TINY, algorithms, run_metarun

pytestmark = pytest.mark.slow  # launches processes or runs every algorithm

IMAGE = algorithms("classification")  # derived from conf/algorithm/
REGRESSION = algorithms("regression")
SMALL_OMNIGLOT = [
    "dataset=omniglot",
    "model.hidden=8",
    "sampler.ways=3",
    "sampler.queries=2",
    "sampler.meta_batch_size=2",
]


def check(results: dict, precision: str = "bf16-mixed", world_size: int = 1) -> None:
    assert results["environment"]["precision"] == precision
    assert results["environment"]["world_size"] == world_size
    assert results["train"]["steps"] == 3
    for value in results["test"].values():
        assert math.isfinite(value["mean"]) and value["episodes"] == 4


@pytest.mark.parametrize("algorithm", IMAGE)
def test_image_algorithms_under_bf16(algorithm, make_config, omniglot_available):
    extra = NEEDS.get((algorithm, "classification"), [])
    check(train(make_config("hardware=bf16", f"algorithm={algorithm}", *SMALL_OMNIGLOT, *extra))[0])


@pytest.mark.parametrize("algorithm", REGRESSION)
def test_regression_algorithms_under_bf16(algorithm, make_config):
    extra = NEEDS.get((algorithm, "regression"), [])
    check(train(make_config("hardware=bf16", f"algorithm={algorithm}", *extra))[0])


# Every learner's 2-process meta-gradient equals its 1-process one (test_ddp_gradients.py);
# through the command, under Lightning's DDP, one learner of each kind runs end to end: an
# embedding learner, an inner loop with a head, plain whole-class batches, a surrogate outer
# update, and (regression) an inner loop and a learner with per-task extras.
DDP_IMAGE = [a for a in ("protonet", "maml", "pretrain", "reptile") if a in IMAGE]
DDP_REGRESSION = [a for a in ("maml", "np") if a in REGRESSION]


@pytest.mark.parametrize("algorithm", DDP_IMAGE)
def test_image_algorithms_under_ddp(algorithm, tmp_path, omniglot_available):
    extra = NEEDS.get((algorithm, "classification"), [])
    results = run_metarun(tmp_path, *TINY, *DDP, f"algorithm={algorithm}", *SMALL_OMNIGLOT, *extra)
    check(results, precision="32-true", world_size=2)


@pytest.mark.parametrize("algorithm", DDP_REGRESSION)
def test_regression_algorithms_under_ddp(algorithm, tmp_path):
    extra = NEEDS.get((algorithm, "regression"), [])
    check(run_metarun(tmp_path, *TINY, *DDP, f"algorithm={algorithm}", *extra), precision="32-true", world_size=2)
