"""Every algorithm trains and tests a few steps under hardware=bf16 (in this process) and
hardware=ddp (2 CPU processes over gloo, through the installed command) with the real runner."""

from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F

from metarun.build import build
from metarun.runner import train
from tests.conftest import DDP, NEEDS, ROOT, TINY, algorithms, run_metarun

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


def stated_bf16_tolerances() -> dict[tuple[str, str], tuple[float, float]]:
    """(learner, kind) -> (max relative error, min cosine), read from the table in
    docs/algorithms.md ("bf16 tolerance of each learner"), where they are stated."""
    rows = re.findall(
        r"^\| `(\w+)` \| (images|sinusoids) \| [^|]+ \| [^|]+ \| < ([\d.]+), > ([\d.]+) \|$",
        (ROOT / "docs" / "algorithms.md").read_text(),
        flags=re.M,
    )
    kinds = {"images": "classification", "sinusoids": "regression"}
    return {(name, kinds[data]): (float(rel), float(cos)) for name, data, rel, cos in rows}


BF16_TOLERANCE = stated_bf16_tolerances()


def test_every_learner_states_a_bf16_tolerance():
    derived = {(a, "classification") for a in IMAGE} | {(a, "regression") for a in REGRESSION}
    assert derived - set(BF16_TOLERANCE) == set(), "add a row to docs/algorithms.md's bf16 table"
    assert set(BF16_TOLERANCE) - derived == set(), "the bf16 table names a learner that conf/ does not"


@pytest.mark.parametrize(
    "algorithm, kind", [(a, "classification") for a in IMAGE] + [(a, "regression") for a in REGRESSION]
)
def test_each_learners_bf16_meta_gradient_is_within_its_stated_tolerance(algorithm, kind, make_config, request):
    """The whole meta-loss and its backward pass under bf16 autocast (as Lightning's
    bf16-mixed runs them) against float32, on the first training meta-batch, seed 0."""
    if kind == "classification":
        request.getfixturevalue("omniglot_available")
    extra = NEEDS.get((algorithm, kind), [])
    cfg = make_config(f"algorithm={algorithm}", "seed=0", *(SMALL_OMNIGLOT if kind == "classification" else []), *extra)
    objects = build(cfg)
    learner, batch = objects["algorithm"].train(), objects["datamodule"].train_batch(0)
    grads = []
    for bf16 in (False, True):
        learner.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16, cache_enabled=False):
            learner.meta_loss(batch).loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in learner.parameters() if p.grad is not None]))
    exact, rounded = grads
    assert exact.dtype == rounded.dtype == torch.float32 and torch.isfinite(rounded).all()
    rel = ((rounded - exact).norm() / exact.norm()).item()
    cos = F.cosine_similarity(rounded, exact, dim=0).item()
    max_rel, min_cos = BF16_TOLERANCE[(algorithm, kind)]
    assert rel < max_rel and cos > min_cos, f"relative error {rel:.3f}, cosine {cos:.4f}"


# Every learner's 2-process meta-gradient equals its 1-process one (test_ddp_gradients.py);
# through the command, under Lightning's DDP, one learner of each kind runs end to end: an
# embedding learner, plain whole-class batches, a surrogate outer update, and (regression) a
# learner with per-task extras. The inner-loop learner, MAML, runs end to end under DDP on
# sinusoids in tests/test_ddp.py (its image meta-gradient is in test_ddp_gradients.py).
DDP_IMAGE = [a for a in ("protonet", "pretrain", "reptile") if a in IMAGE]
DDP_REGRESSION = [a for a in ("np",) if a in REGRESSION]


@pytest.mark.parametrize("algorithm", DDP_IMAGE)
def test_image_algorithms_under_ddp(algorithm, tmp_path, omniglot_available):
    extra = NEEDS.get((algorithm, "classification"), [])
    results = run_metarun(tmp_path, *TINY, *DDP, f"algorithm={algorithm}", *SMALL_OMNIGLOT, *extra)
    check(results, precision="32-true", world_size=2)


@pytest.mark.parametrize("algorithm", DDP_REGRESSION)
def test_regression_algorithms_under_ddp(algorithm, tmp_path):
    extra = NEEDS.get((algorithm, "regression"), [])
    check(run_metarun(tmp_path, *TINY, *DDP, f"algorithm={algorithm}", *extra), precision="32-true", world_size=2)
