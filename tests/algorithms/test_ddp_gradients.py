"""Every algorithm gives the same meta-gradient on 1 process and on 2 gloo processes.

Under ``hardware=ddp`` rank r of W computes the meta-loss on tasks r·B/W … (r+1)·B/W − 1 of
the step's meta-batch and DDP averages the ranks' gradients. For that to be the 1-process
gradient of the whole meta-batch, an algorithm may keep no state that couples tasks or
depends on the rank (random draws, counters, batch statistics across tasks). Two real
processes are spawned once and compute, for every algorithm config, the all-reduced mean
gradient of their halves; the test compares it with the full meta-batch's gradient here.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from metarun.build import build
from metarun.module import backward_in_chunks
from tests.conftest import NEEDS, TINY, algorithms, compose_config, data_dir

# launches processes or runs every algorithm; the tests sharing the module's spawn run on one
# xdist worker (tests/conftest.py), so it runs once
pytestmark = [pytest.mark.slow]

META_BATCH = 4
SMALL_OMNIGLOT = ["dataset=omniglot", "model.hidden=8", "sampler.ways=3", "sampler.queries=2"]
IMAGE = algorithms("classification")  # derived from conf/algorithm/
REGRESSION = algorithms("regression")


def configs(omniglot: bool) -> dict[str, list[str]]:
    out = {f"{a}_sinusoid": [f"algorithm={a}", *NEEDS.get((a, "regression"), [])] for a in REGRESSION}
    if omniglot:
        for a in IMAGE:
            out[f"{a}_omniglot"] = [f"algorithm={a}", *SMALL_OMNIGLOT, *NEEDS.get((a, "classification"), [])]
        # training augmentation draws from each task's generator: the same on any number of ranks
        out["protonet_omniglot_transform_standard"] = ["algorithm=protonet", *SMALL_OMNIGLOT, "transform=standard"]
        out["maml_resnet12_omniglot_transform_resized"] = [
            "algorithm=maml",
            "dataset=omniglot",
            "model=resnet12",
            "model.widths=[4,4,4,4]",
            "sampler.ways=3",
            "sampler.queries=2",
            "transform=resized",
        ]
        # sampler=variable: ragged meta-batches, one backward per task, the same on any number of ranks
        out["protonet_omniglot_sampler_variable"] = [
            "algorithm=protonet",
            "dataset=omniglot",
            "model.hidden=8",
            "sampler=variable",
            "sampler.max_ways=8",
            "sampler.max_queries=2",
            "sampler.max_support=24",
        ]
    return {name: [*TINY, *overrides, f"sampler.meta_batch_size={META_BATCH}"] for name, overrides in out.items()}


def meta_gradient(overrides: list[str], output_dir: Path, rank: int = 0, world_size: int = 1) -> list[torch.Tensor]:
    """This rank's gradient of the meta-loss of training step 0 (zeros where unused), as the
    module back-propagates it."""
    objects = build(compose_config(overrides, output_dir))
    algorithm, batch = objects["algorithm"], objects["datamodule"].train_batch(0, rank, world_size)
    algorithm.train()
    params = [p for p in algorithm.parameters() if p.requires_grad]
    metric = "mse" if objects["regression"] else "accuracy"
    backward_in_chunks(algorithm, batch, None, lambda loss: loss.backward(), metric=metric)  # ragged: task by task
    return [torch.zeros_like(p) if p.grad is None else p.grad.detach() for p in params]


def worker(rank: int, world_size: int, port: int, jobs: dict[str, list[str]], out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        for name, overrides in jobs.items():
            grads = meta_gradient(overrides, Path(out) / f"{name}_{rank}", rank, world_size)
            for g in grads:
                dist.all_reduce(g)  # sum over ranks
                g /= world_size  # DDP's mean
            if rank == 0:
                torch.save(grads, Path(out) / f"{name}.pt")
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_process_gradients(tmp_path_factory):
    """{config name: (overrides, 2-process gradient)} for every algorithm config."""
    out = tmp_path_factory.mktemp("ddp_gradients")
    root = data_dir()
    jobs = configs(root is not None and (root / "omniglot" / "images_background.zip").exists())
    mp.spawn(worker, args=(2, free_port(), jobs, str(out)), nprocs=2, join=True)
    return {name: (overrides, torch.load(out / f"{name}.pt")) for name, overrides in jobs.items()}


@pytest.mark.parametrize("name", sorted(configs(omniglot=True)))
def test_same_meta_gradient_on_one_and_two_processes(name, two_process_gradients, tmp_path):
    if name not in two_process_gradients:
        pytest.skip("METARUN_DATA_DIR with omniglot/ is not set (.ci/run sets it)")
    overrides, two = two_process_gradients[name]
    one = meta_gradient(overrides, tmp_path)  # one thread, as every algorithm test
    assert len(one) == len(two)
    assert any(g.abs().sum() > 0 for g in one)
    for a, b in zip(one, two):
        # float32: a mean of two half-batch means vs one mean, ~1e-7 relative
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)
