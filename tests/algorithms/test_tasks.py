"""map_tasks: the loop and vmap give the same meta-learning, and chunks the same gradient.

For every algorithm config (derived from conf/algorithm/), on small Omniglot episodes and on
sinusoids, in float64: the meta-loss, the meta-gradient and the predictions are the same
whether the tasks run in the Python loop or under `torch.func.vmap`, and the meta-gradient
accumulated over chunks of the meta-batch (`module.backward_in_chunks`) equals the
unchunked one. Learners that cannot run under vmap refuse it with one sentence. A learner
rebuilt from its state_dict and its optimiser's takes the same next step (resume).

``METARUN_TEST_DEVICE=cuda`` runs the same comparisons on a GPU (scripts/gpu_check.sh).
"""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path

import pytest
import torch
from omegaconf import open_dict

from metarun.algorithms.tasks import map_tasks
from metarun.build import build
from metarun.episodes import VAL, EpisodeBatch, collate_episodes
from metarun.errors import ConfigError
from metarun.module import backward_in_chunks
from metarun.runner import train
from tests.conftest import NEEDS, TINY, algorithms, compose_config, data_dir

pytestmark = pytest.mark.usefixtures("one_thread")

META_BATCH = 3  # chunks of 2 + 1: unequal shares
# test-time adaptation kept short: predictions are compared, not scored
SHORT_EVAL = {"test_inner_steps": 2, "finetune_steps": 5}
# transductive batch norm: the norm every learner can run under vmap
SMALL_OMNIGLOT = [
    "dataset=omniglot",
    "model.hidden=8",
    "sampler.ways=3",
    "sampler.queries=2",
    "model.norm=transductive",
]


def configs() -> dict[str, list[str]]:
    """Every classification learner on Omniglot; on sinusoids the learners that solve only
    regression, and MAML (the quick tier's case): the others' sinusoid runs would repeat
    their Omniglot ones on a smaller model."""
    image = algorithms("classification")
    out = {
        f"{a}_sinusoid": [f"algorithm={a}", *NEEDS.get((a, "regression"), [])]
        for a in algorithms("regression")
        if a not in image or a == "maml"
    }
    for a in algorithms("classification"):
        out[f"{a}_omniglot"] = [f"algorithm={a}", *SMALL_OMNIGLOT, *NEEDS.get((a, "classification"), [])]
    return {name: [*TINY, *overrides, f"sampler.meta_batch_size={META_BATCH}"] for name, overrides in out.items()}


QUICK_CONFIG = "maml_sinusoid"  # the quick tier's case; every config runs in the slow tier


def every_config() -> list:
    return [pytest.param(name, marks=() if name == QUICK_CONFIG else pytest.mark.slow) for name in sorted(configs())]


def float64_setup(name: str, tmp_path: Path) -> tuple:
    """The algorithm of config ``name`` in float64, its training meta-batch of step 0, and the
    batch it predicts: the same, or 3 validation episodes for a learner trained on plain
    mini-batches (which predicts on episodes only)."""
    if name.endswith("_omniglot") and data_dir() is None:
        pytest.skip("METARUN_DATA_DIR with omniglot/ is not set (.ci/run sets it)")
    cfg = compose_config(configs()[name], tmp_path)
    with open_dict(cfg):
        for key, value in SHORT_EVAL.items():
            if key in cfg.algorithm:
                cfg.algorithm[key] = value
    objects = build(cfg)
    device = torch.device(os.environ.get("METARUN_TEST_DEVICE", "cpu"))
    algorithm = objects["algorithm"].double().to(device)
    data = objects["datamodule"]
    batch = to_float64(data.train_batch(0), device)
    if algorithm.episodic:
        return algorithm, batch, batch
    episodes = collate_episodes([objects["sampler"].eval_episode(data.splits["val"], VAL, i) for i in range(3)])
    return algorithm, batch, to_float64(episodes, device)


def to_float64(batch: EpisodeBatch, device: torch.device) -> EpisodeBatch:
    fields = {k: (v.double() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in vars(batch).items()}
    return EpisodeBatch(**{k: (v.to(device) if torch.is_tensor(v) else v) for k, v in fields.items()})


def loss_and_gradient(algorithm, batch: EpisodeBatch) -> tuple[torch.Tensor, list[torch.Tensor]]:
    algorithm.train()
    params = [p for p in algorithm.parameters() if p.requires_grad]
    loss = algorithm.meta_loss(batch).loss
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return loss.detach(), [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


@pytest.mark.parametrize("name", every_config())
def test_loop_vmap_and_chunks_give_the_same_meta_learning(name, tmp_path):
    """One build per config (the suite's time): loop against vmap, then chunks against the
    whole meta-batch."""
    algorithm, batch, episodes = float64_setup(name, tmp_path)
    check_loop_and_vmap_agree(algorithm, batch, episodes)
    algorithm.task_batching = "loop"
    check_chunks_give_the_whole_meta_gradient(algorithm, batch)
    check_state_dicts_resume_the_next_step(algorithm, batch, lambda: float64_setup(name, tmp_path)[0])


def check_state_dicts_resume_the_next_step(algorithm, batch: EpisodeBatch, rebuild) -> None:
    """All of a learner's training state is in its state_dict and its optimiser's, which is
    what a checkpoint holds: a freshly built learner given those two after an outer step takes
    the same next step as the learner that never stopped (a resume at the learner's level)."""

    def step(learner, optimizer) -> None:
        learner.train()
        optimizer.zero_grad()
        learner.meta_loss(batch).loss.backward()
        optimizer.step()
        learner.end_outer_step()

    algorithm.task_batching = "loop"
    optimizer = torch.optim.Adam(algorithm.parameters(), lr=1e-3)
    step(algorithm, optimizer)
    saved = copy.deepcopy((algorithm.state_dict(), optimizer.state_dict()))
    step(algorithm, optimizer)
    fresh = rebuild()
    fresh.task_batching = "loop"
    fresh.load_state_dict(saved[0])
    fresh_optimizer = torch.optim.Adam(fresh.parameters(), lr=1e-3)
    fresh_optimizer.load_state_dict(saved[1])
    step(fresh, fresh_optimizer)
    for (key, a), b in zip(algorithm.state_dict().items(), fresh.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=key)


def check_loop_and_vmap_agree(algorithm, batch: EpisodeBatch, episodes: EpisodeBatch) -> None:
    """The same meta-loss, meta-gradient and predictions looped and vmapped (or a clear
    refusal), and no state changed by `meta_loss`."""
    state = {k: v.clone() for k, v in algorithm.state_dict().items()}
    algorithm.task_batching = "loop"
    loss, grads = loss_and_gradient(algorithm, batch)
    algorithm.eval()
    predicted = algorithm.predict(episodes)
    algorithm.task_batching = "vmap"
    if algorithm.vmap_refusal() is not None:
        with pytest.raises(ConfigError, match="task_batching=vmap is not allowed"):
            algorithm.check_task_batching()
        return
    vloss, vgrads = loss_and_gradient(algorithm, batch)
    torch.testing.assert_close(vloss, loss, rtol=1e-10, atol=1e-12)
    assert any(g.abs().sum() > 0 for g in grads)
    for g, v in zip(grads, vgrads):
        torch.testing.assert_close(v, g, rtol=1e-8, atol=1e-10)
    algorithm.eval()
    vpredicted = algorithm.predict(episodes)
    torch.testing.assert_close(vpredicted.query_logits, predicted.query_logits, rtol=1e-8, atol=1e-10)
    # meta_loss keeps no state: per-step counters move in end_outer_step only
    for k, v in algorithm.state_dict().items():
        assert torch.equal(v, state[k]), k


def check_chunks_give_the_whole_meta_gradient(algorithm, batch: EpisodeBatch) -> None:
    """Chunks of 2 + 1 tasks, each weighted by its share: the whole batch's gradient."""
    algorithm.train()
    params = [p for p in algorithm.parameters() if p.requires_grad]
    whole = None
    for chunk in (None, 2):
        algorithm.zero_grad()
        metric = "mse" if batch.query_y.is_floating_point() else "accuracy"
        out = backward_in_chunks(algorithm, batch, chunk, lambda loss: loss.backward(), metric=metric)
        grads = [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in params]
        if whole is None:
            whole = (out.loss, out.task_metric, grads)
            continue
        torch.testing.assert_close(out.loss, whole[0], rtol=1e-12, atol=1e-12)
        assert out.task_metric.shape == whole[1].shape == (len(batch),)
        for a, b in zip(grads, whole[2]):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_map_tasks_stacks_tuples_and_matches_vmap():
    x = torch.randn(3, 4, 2, dtype=torch.float64)
    w = torch.randn(2, dtype=torch.float64)

    def fn(xi):
        return xi @ w, (xi**2).sum()

    loop = map_tasks(fn, x)
    vmapped = map_tasks(fn, x, vmap=True)
    assert loop[0].shape == (3, 4) and loop[1].shape == (3,)
    for a, b in zip(loop, vmapped):
        torch.testing.assert_close(a, b)


def test_the_per_task_loop_is_written_once():
    """Only algorithms/tasks.py loops over the tasks of a batch; everything else maps."""
    root = Path(__file__).resolve().parents[2] / "metarun"
    loop = re.compile(r"for \w+ in range\((len\(batch\)|b|B)\)|batch\.task\(|\(\w+\) for \w+ in images\]")
    offenders = [
        str(p.relative_to(root)) for p in root.rglob("*.py") if p.name != "tasks.py" and loop.search(p.read_text())
    ]
    assert offenders == []


@pytest.mark.parametrize(
    "algorithm, counter", [("maml_plus_plus", "outer_step"), ("reptile", "updates"), ("np", "updates")]
)
def test_per_step_state_advances_once_per_outer_step_however_many_chunks(algorithm, counter, tmp_path):
    """Three outer steps of the real module with chunks of one task: the counter reads 3."""
    overrides = [
        *TINY,
        f"algorithm={algorithm}",
        *NEEDS.get((algorithm, "regression"), []),
        "sampler.meta_batch_size=4",
        "task_chunk=1",
    ]
    train(compose_config(overrides, tmp_path))
    state = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    assert int(state[f"algorithm.{counter}"]) == 3
