"""hardware=ddp: the meta-batch is split across processes and the outer update is unchanged.

Two CPU processes over gloo, launched by the installed `metarun` command as a user's would
be (``strategy=ddp``). Rank r of W draws tasks r*B/W .. (r+1)*B/W - 1 of each step
and DDP averages the per-rank mean gradients, so with plain SGD (update = -lr * grad) the
parameters after a few steps must equal a 1-process run over the whole meta-batch.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from metarun.build import build
from metarun.cli import exit_on_config_error
from metarun.episodes import TEST, collate_episodes
from metarun.errors import ConfigError
from metarun.module import per_task_metric
from metarun.runner import train
from metarun.stats import mean_ci95
from tests.conftest import COMMAND_ENV, DDP, ROOT, TINY, compose_config, data_dir, finish, run_metarun

STEPS, META_BATCH, TEST_EPISODES = 3, 4, 5  # 5 test episodes: DistributedSampler pads rank 1
RUN = [
    *TINY,
    f"trainer.max_steps={STEPS}",
    f"trainer.val_check_interval={STEPS}",
    f"sampler.meta_batch_size={META_BATCH}",
    f"sampler.test_episodes={TEST_EPISODES}",
    "sampler.val_episodes=3",
    "sampler.queries=10",
    "algorithm.test_inner_steps=2",
    "optimizer._target_=torch.optim.SGD",
    "optimizer.lr=0.01",
]
# float32: the 2-process gradient is a mean of two half-batch means, all-reduced; it differs
# from the 1-process mean only by rounding (~1e-7 relative), times lr = 0.01 per step.
ATOL = 1e-6


# The tests that share the module fixture (the launches) run on one xdist worker (tests/conftest.py).
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


TWO_NODES = ["hardware=ddp", "trainer.accelerator=cpu", "trainer.devices=1", "trainer.num_nodes=2"]


def run_two_nodes(run_dir: Path, *overrides: str) -> dict:
    """`python -m metarun.train` under two `torchrun --nnodes 2 --node-rank r` launchers on
    localhost; node 0's results.json."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    if data_dir() is not None:
        overrides = (f"paths.data_dir={data_dir()}", *overrides)
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes",
                "2",
                "--nproc-per-node",
                "1",
                "--node-rank",
                str(rank),
                "--master-addr",
                "127.0.0.1",
                "--master-port",
                str(port),
                "-m",
                "metarun.train",
                *overrides,
                f"hydra.run.dir={run_dir}",
            ],
            cwd=ROOT,
            env=COMMAND_ENV,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in (0, 1)
    ]
    for proc in procs:
        done = finish(proc)
        assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((run_dir / "results.json").read_text())


def state(ckpt: Path) -> dict[str, torch.Tensor]:
    return torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same seeded run on 2 processes (the `metarun` command), on 1 process, and on two
    "nodes" with the chunked backward (one launch covers both: each is checked against the
    1-process update)."""
    out = {}
    for name, hardware in (
        ("ddp", DDP),
        ("single", ["hardware=cpu"]),
        ("two_nodes", [*TWO_NODES, "task_chunk=1"]),
    ):
        directory = tmp_path_factory.mktemp(name)
        cfg = compose_config([*RUN, *hardware], directory)
        if name == "single":
            results = train(cfg)[0]
        elif name == "two_nodes":
            results = run_two_nodes(directory, *RUN, *hardware)
        else:
            results = run_metarun(directory, *RUN, *hardware)
        out[name] = {"results": results, "dir": directory, "cfg": cfg}
    return out


def test_two_nodes_with_chunked_backward_give_the_one_process_update(runs):
    """trainer.num_nodes=2: two `torchrun --nnodes 2` launches (one per "node", gloo), as
    srun starts one per node on a cluster, each with task_chunk=1 (each rank backpropagates
    its 2 tasks one at a time and only the last backward all-reduces); the update equals
    one process's."""
    nodes = state(runs["two_nodes"]["dir"] / "checkpoints" / "last.ckpt")
    single = state(runs["single"]["dir"] / "checkpoints" / "last.ckpt")
    assert nodes.keys() == single.keys()
    for name in single:
        torch.testing.assert_close(nodes[name], single[name], rtol=0, atol=ATOL, msg=name)
    assert runs["two_nodes"]["results"]["environment"]["world_size"] == 2
    assert runs["two_nodes"]["cfg"].task_chunk == 1


def test_ranks_draw_disjoint_slices_of_the_one_process_meta_batch(runs):
    cfg = runs["single"]["cfg"]
    sampler, source = instantiate(cfg.sampler), instantiate(cfg.dataset).split("train")
    for step in range(STEPS):
        full = sampler.train_batch(source, step)  # 1 process: all B tasks
        ranks = [sampler.train_batch(source, step, rank, 2) for rank in (0, 1)]
        ids = [set(r.index.tolist()) for r in ranks]
        assert ids[0].isdisjoint(ids[1])
        assert ids[0] | ids[1] == set(full.index.tolist()) == set(range(META_BATCH))
        for field in ("support_x", "support_y", "query_x", "query_y", "task_params", "index"):
            joined = torch.cat([getattr(r, field) for r in ranks])
            assert torch.equal(joined, getattr(full, field)), field
        assert not torch.equal(ranks[0].support_y, ranks[1].support_y)  # different tasks


def test_two_processes_give_the_one_process_update(runs):
    ddp_ckpt = torch.load(runs["ddp"]["dir"] / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    single_ckpt = torch.load(
        runs["single"]["dir"] / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False
    )
    assert ddp_ckpt["global_step"] == single_ckpt["global_step"] == STEPS
    init = build(runs["single"]["cfg"])["module"].state_dict()
    ddp, single = ddp_ckpt["state_dict"], single_ckpt["state_dict"]
    assert ddp.keys() == single.keys() == init.keys()
    moved = max((single[k] - init[k]).abs().max().item() for k in init)
    assert moved > 1000 * ATOL  # the comparison below is not trivially satisfied
    for name in single:
        torch.testing.assert_close(ddp[name], single[name], rtol=0, atol=ATOL, msg=name)


def test_ddp_results_json_counts_every_test_episode_once(runs):
    directory, results = runs["ddp"]["dir"], runs["ddp"]["results"]
    assert [p.name for p in directory.rglob("results.json")] == ["results.json"]
    written = json.loads((directory / "results.json").read_text())
    assert written["environment"]["world_size"] == 2
    assert written["environment"]["accelerator"] == "CPUAccelerator"
    assert written["train"]["steps"] == STEPS
    assert written["train"]["tasks"] == STEPS * META_BATCH
    for block in written["test"].values():
        assert block["episodes"] == TEST_EPISODES  # padding de-duplicated, nothing dropped
    assert written["test"] == results["test"]


def test_ddp_test_mean_equals_one_process_evaluation_of_its_checkpoint(runs):
    """Score the DDP run's best checkpoint episode by episode in this process."""
    results = runs["ddp"]["results"]
    objects = build(runs["single"]["cfg"])
    module, sampler = objects["module"], objects["sampler"]
    module.load_state_dict(state(Path(results["val"]["best_checkpoint"])))
    source = objects["datamodule"].splits["test"]
    after, before = [], []
    for index in range(TEST_EPISODES):
        batch = collate_episodes([sampler.eval_episode(source, TEST, index)])
        out = module.algorithm.predict(batch)
        after.append(per_task_metric(out.query_logits, batch.query_y, module.metric).item())
        before.append(per_task_metric(out.query_logits_before, batch.query_y, module.metric).item())
    for key, values in (("mse", after), ("mse_before_adaptation", before)):
        mean, ci = mean_ci95(values)
        assert results["test"][key]["mean"] == pytest.approx(mean, rel=0, abs=1e-6), key
        assert results["test"][key]["ci95"] == pytest.approx(ci, rel=0, abs=1e-6), key


def test_meta_batch_not_divisible_by_processes_stops_before_launch(tmp_path, capsys):
    cfg = compose_config([*RUN, *DDP, "sampler.meta_batch_size=3"], tmp_path)
    with pytest.raises(
        ConfigError,
        match=r"^sampler\.meta_batch_size=3 is not allowed with 2 "
        r"processes: it must be divisible",
    ):
        train(cfg)
    assert not list(tmp_path.rglob("*.ckpt"))  # nothing was launched or trained
    with pytest.raises(SystemExit) as exit_:  # the `metarun` command: one line, exit code 2
        exit_on_config_error(train)(cfg)
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("metarun: error: sampler.meta_batch_size=3 is not allowed")
    assert "Traceback" not in "\n".join(err)
