"""Throughput of the real training step of a composed config, as one JSON line.

    python scripts/benchmark.py experiment=maml_omniglot_5w1s [overrides...]

Builds the run exactly as `metarun` does, then times ``steps`` outer steps (meta-loss,
backward, optimiser step) after ``warmup`` steps, on the configured accelerator.
``peak_memory_mb`` is the peak CUDA allocation on a GPU, else the process's peak RSS.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from metarun.train import CONFIG_DIR, build

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str]) -> dict:
    extra = [a for a in argv if not a.startswith(("bench.steps=", "bench.warmup="))]
    opts = dict(a.split("=", 1) for a in argv if a.startswith("bench."))
    steps, warmup = int(opts.get("bench.steps", 5)), int(opts.get("bench.warmup", 1))
    with initialize_config_dir(CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=extra)
    with open_dict(cfg):
        cfg.paths.root_dir = str(ROOT)
        cfg.paths.output_dir = str(ROOT / "outputs" / "benchmark")
    objects = build(cfg)
    module, sampler = objects["module"], objects["sampler"]
    device = torch.device("cuda" if cfg.trainer.accelerator in ("gpu", "cuda")
                          or (cfg.trainer.accelerator == "auto" and torch.cuda.is_available())
                          else "cpu")
    algorithm = module.algorithm.to(device)
    optimizer = module.optimizer_factory(params=algorithm.parameters())
    source = objects["datamodule"].splits["train"]
    precision = str(cfg.trainer.precision)
    dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(precision)

    def step(i: int) -> None:
        batch = sampler.train_batch(source, i)
        batch = type(batch)(**{k: (v.to(device) if torch.is_tensor(v) else v)
                               for k, v in vars(batch).items()})
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = algorithm.meta_loss(batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    for i in range(warmup):
        step(i)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    for i in range(warmup, warmup + steps):
        step(i)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    peak = (torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    result = {"overrides": extra, "device": str(device), "precision": precision,
              "threads": torch.get_num_threads(), "meta_batch_size": sampler.meta_batch_size,
              "steps": steps, "seconds_per_step": seconds / steps,
              "tasks_per_second": steps * sampler.meta_batch_size / seconds,
              "peak_memory_mb": round(peak, 1)}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
