"""The real training step of a composed config against a plain-PyTorch reference, as JSON.

    python scripts/benchmark.py experiment=maml_omniglot_5w1s [overrides...] [bench.steps=10]
    python scripts/benchmark.py A-overrides... -- B-overrides...   # side by side, one process

Builds the run exactly as `metarun` does and times ``bench.steps`` outer steps after
``bench.warmup`` of the real Lightning training step (`MetaLearningModule.training_step`:
meta-loss, chunked backward, clipping, optimiser and schedule, precision plugin), on the
configured accelerator. In the same process it times a plain-PyTorch reference that
computes the same meta-gradient with no framework (a dozen lines below: the same backbone,
`functional_call`, `torch.autograd.grad`, the same optimiser) on the same meta-batches from
the same initial weights, half of its steps before metarun's and half after (so a drift of
the machine's speed does not favour either), and
prints both, their ratio (metarun / reference: below 1 is faster) and the relative
difference ‖g − g_ref‖ / ‖g_ref‖ of the two meta-gradients on the first meta-batch. The reference
exists for MAML/FOMAML and ProtoNet; other learners are timed alone.

With configs separated by ``--`` each is measured in turn in the same process (``bench.*``
settings apply to all), and a last line gives ``speedup``: the first config's seconds per
step over each other's (the fast CPU path: the fp32 config first, then the fast one).

``peak_memory_mb``: the peak CUDA allocation of the metarun steps on a GPU, else the growth
of the process's peak RSS over the metarun steps (run one config per process to compare).
"""

from __future__ import annotations

import copy
import json
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import open_dict
from torch import Tensor
from torch.func import functional_call
from torch.utils.data import DataLoader

from metarun.algorithms.maml import MAML
from metarun.algorithms.protonet import ProtoNet
from metarun.build import build
from metarun.catalog import CONFIG_DIR
from metarun.episodes import EpisodeBatch

ROOT = Path(__file__).resolve().parents[1]
AUTOCAST = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}


def rss_mb() -> float:
    """The process's resident memory now (Linux)."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * resource.getpagesize() / 2**20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ----------------------------------------------------------------- the plain-PyTorch reference


def maml_reference_loss(
    model: torch.nn.Module, batch: EpisodeBatch, inner_lr: float, steps: int, first_order: bool
) -> Tensor:
    """MAML's meta-loss written out: a loop over tasks, SGD steps on the support set."""
    loss_fn = F.mse_loss if batch.query_y.is_floating_point() else F.cross_entropy
    theta = dict(model.named_parameters())
    losses = []
    for sx, sy, qx, qy in zip(batch.support_x, batch.support_y, batch.query_x, batch.query_y):
        params = theta
        for _ in range(steps):
            loss = loss_fn(functional_call(model, params, (sx,)), sy)
            grads = torch.autograd.grad(loss, list(params.values()), create_graph=not first_order)
            params = {k: p - inner_lr * g for (k, p), g in zip(params.items(), grads)}
        losses.append(loss_fn(functional_call(model, params, (qx,)), qy))
    return torch.stack(losses).mean()


def protonet_reference_loss(model: torch.nn.Module, batch: EpisodeBatch) -> Tensor:
    """Prototypical Networks' loss written out: class means, squared distances, softmax."""
    losses = []
    ways = int(batch.support_y.max()) + 1
    for sx, sy, qx, qy in zip(batch.support_x, batch.support_y, batch.query_x, batch.query_y):
        z = model(torch.cat([sx, qx]))  # [NK+NQ, D]
        support, query = z[: len(sx)], z[len(sx) :]
        protos = torch.stack([support[sy == c].mean(0) for c in range(ways)])  # [N, D]
        losses.append(F.cross_entropy(-torch.cdist(query, protos).pow(2), qy))
    return torch.stack(losses).mean()


def reference_loss(algorithm: torch.nn.Module) -> Callable[[EpisodeBatch], Tensor] | None:
    """The reference meta-loss of ``algorithm``'s computation, or None where there is none."""
    if type(algorithm) is MAML:
        return lambda batch: maml_reference_loss(
            algorithm.model, batch, algorithm.inner_lr, algorithm.inner_steps, algorithm.first_order
        )
    if type(algorithm) is ProtoNet:
        return lambda batch: protonet_reference_loss(algorithm.model, batch)
    return None


# ----------------------------------------------------------------- timing


class StepTimer(L.Callback):
    """Wall time of every training step (synchronised on CUDA); peak memory after warm-up."""

    def __init__(self, warmup: int, cuda: bool) -> None:
        self.warmup, self.cuda = warmup, cuda
        self.times: list[float] = []
        self.rss_before = 0.0

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._sync()
        if batch_idx == self.warmup and self.cuda:
            torch.cuda.reset_peak_memory_stats()
        self._started = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._sync()
        self.times.append(time.perf_counter() - self._started)


def to_device(batch: EpisodeBatch, device: torch.device) -> EpisodeBatch:
    return EpisodeBatch(**{k: (v.to(device) if torch.is_tensor(v) else v) for k, v in vars(batch).items()})


def main(argv: list[str]) -> dict:
    extra = [a for a in argv if not a.startswith("bench.")]
    opts = dict(a.split("=", 1) for a in argv if a.startswith("bench."))
    steps, warmup = int(opts.get("bench.steps", 5)), int(opts.get("bench.warmup", 1))
    with initialize_config_dir(CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=extra)
    with open_dict(cfg):
        cfg.paths.root_dir = str(ROOT)
        cfg.paths.output_dir = str(ROOT / "outputs" / "benchmark")
    objects = build(cfg)
    module, sampler = objects["module"], objects["sampler"]
    algorithm = module.algorithm
    cuda = cfg.trainer.accelerator in ("gpu", "cuda") or (
        cfg.trainer.accelerator == "auto" and torch.cuda.is_available()
    )
    device = torch.device("cuda" if cuda else "cpu")
    precision = str(cfg.trainer.precision)
    source = objects["datamodule"].splits["train"]
    batches = [sampler.train_batch(source, i) for i in range(warmup + steps)]

    reference = reference_loss(algorithm)
    twin = copy.deepcopy(algorithm).to(device) if reference is not None else None
    bench_ref = None
    if reference is not None:  # half the reference's steps before metarun's, half after
        bench_ref = ReferenceRun(twin, reference_loss(twin), module, cfg, device, precision)
        bench_ref.compare_gradients(algorithm, to_device(batches[0], device))
        bench_ref.run(batches[: warmup + steps // 2], warmup)

    # metarun: the real Lightning training step
    timer = StepTimer(warmup, cuda)
    trainer = instantiate(
        cfg.trainer,
        logger=False,
        callbacks=[timer],
        enable_checkpointing=False,
        enable_progress_bar=False,
        limit_val_batches=0,
        max_time=None,
        max_steps=warmup + steps,
        val_check_interval=None,
        check_val_every_n_epoch=None,
    )
    rss_before = rss_mb()
    trainer.fit(module, train_dataloaders=DataLoader(batches, batch_size=None, collate_fn=lambda batch: batch))
    seconds = statistics.median(timer.times[warmup:])
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else max(peak_rss_mb() - rss_before, 0.0)
    result = {
        "overrides": extra,
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "precision": precision,
        "threads": torch.get_num_threads(),
        "algorithm": type(algorithm).__name__,
        "task_batching": "vmap" if algorithm.uses_vmap(device) else "loop",
        "task_chunk": module.task_chunk,
        "meta_batch_size": sampler.meta_batch_size,
        "steps": steps,
        "seconds_per_step": seconds,
        "tasks_per_second": sampler.meta_batch_size / seconds,
        "peak_memory_mb": round(peak, 1),
    }
    if bench_ref is not None:
        bench_ref.run(batches[warmup + steps // 2 :], 0)
        result |= bench_ref.summary()
        result["ratio"] = seconds / result["reference_seconds_per_step"]
    print(json.dumps(result))
    return result


class ReferenceRun:
    """The plain-PyTorch reference on its own copy of the learner, from the same initial
    weights, with the same optimiser, precision and meta-batches."""

    def __init__(self, algorithm, loss: Callable[[EpisodeBatch], Tensor], module, cfg, device, precision) -> None:
        self.algorithm, self.loss, self.device = algorithm.train(), loss, device
        self.params = [p for p in algorithm.parameters() if p.requires_grad]
        self.optimizer = module.optimizer_factory(params=self.params)
        self.grad_clip, self.dtype = cfg.grad_clip, AUTOCAST.get(precision)
        self.cuda = device.type == "cuda"
        self.times: list[float] = []
        self.difference = float("nan")
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()

    def compare_gradients(self, learner, batch: EpisodeBatch) -> None:
        """‖g − g_ref‖ / ‖g_ref‖ of metarun's and the reference's meta-gradients, same weights."""
        learner.to(self.device).train()
        mine = torch.autograd.grad(learner.meta_loss(batch).loss, [p for p in learner.parameters() if p.requires_grad])
        theirs = torch.autograd.grad(self.loss(batch), self.params)
        flat = [torch.cat([g.flatten().double() for g in grads]) for grads in (mine, theirs)]
        self.difference = ((flat[0] - flat[1]).norm() / flat[1].norm()).item()

    def run(self, batches: list[EpisodeBatch], warmup: int) -> None:
        for i, batch in enumerate(batches):
            batch = to_device(batch, self.device)
            if self.cuda:
                torch.cuda.synchronize()
            started = time.perf_counter()
            with torch.autocast(self.device.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None):
                loss = self.loss(batch)
            self.optimizer.zero_grad()
            loss.backward()
            if self.grad_clip:
                torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
            self.optimizer.step()
            if self.cuda:
                torch.cuda.synchronize()
            if i >= warmup:
                self.times.append(time.perf_counter() - started)

    def summary(self) -> dict:
        out = {
            "reference_seconds_per_step": statistics.median(self.times),
            "reference_grad_relative_difference": self.difference,
        }
        if self.cuda:
            out["reference_peak_memory_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        return out


def main_many(argv: list[str]) -> list[dict]:
    """`main` for each ``--``-separated config, then their speed-ups over the first."""
    from hydra.core.global_hydra import GlobalHydra

    shared = [a for a in argv if a.startswith("bench.")]
    groups, current = [], []
    for arg in [a for a in argv if not a.startswith("bench.")] + ["--"]:
        if arg == "--":
            groups.append(current)
            current = []
        else:
            current.append(arg)
    results = []
    for overrides in groups:
        GlobalHydra.instance().clear()
        results.append(main([*overrides, *shared]))
    if len(results) > 1:
        first = results[0]["seconds_per_step"]
        print(json.dumps({"speedup": [first / r["seconds_per_step"] for r in results[1:]], "configs": groups}))
    return results


if __name__ == "__main__":
    main_many(sys.argv[1:])
