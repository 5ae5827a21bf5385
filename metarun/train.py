"""Meta-train, validate and test one composed configuration.

`train(cfg)` does the work and returns ``(results, objects)``; `main` is the thin
``@hydra.main`` entry point behind the ``metarun`` command.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from omegaconf import DictConfig, OmegaConf

from metarun.cli import config_error, exit_on_config_error
from metarun.datamodule import EpisodicDataModule
from metarun.episodes import TEST, EvalEpisodes
from metarun.errors import ConfigError
from metarun.module import MetaLearningModule
from metarun.plots import plot_regression_tasks
from metarun.tracking import finish, log_test_table

log = logging.getLogger(__name__)
CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "conf")


class ConfigInCheckpoint(Callback):
    """Stores the resolved run config in every checkpoint, for `metarun-eval`."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        checkpoint["metarun_config"] = self.config


class StartStep(Callback):
    """Records the outer step training starts from (non-zero on resume), for throughput."""

    step = 0

    def on_train_start(self, trainer, pl_module) -> None:
        self.step = trainer.global_step


def instantiate_checked(node: Any, **kwargs: Any) -> Any:
    """`instantiate`, re-raising a constructor's `ConfigError` as itself, not Hydra's wrapper."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as err:
        found = config_error(err)
        if found is None:
            raise
        raise found from None


def build(cfg: DictConfig) -> dict[str, Any]:
    """Instantiate every configured object; stops early (`ConfigError`) on an impossible setting."""
    dataset = instantiate_checked(cfg.dataset)
    sampler = instantiate_checked(cfg.sampler)
    datamodule = EpisodicDataModule(dataset, sampler)
    datamodule.prepare()
    with torch.random.fork_rng(devices=[]):  # seeded initialisation, global RNG untouched
        torch.manual_seed(cfg.seed)
        model = instantiate_checked(cfg.model)
        algorithm = instantiate_checked(cfg.algorithm, model=model)  # and its own parameters
    algorithm.check_episode_shape(sampler.train_ways, sampler.ways)
    kind = "regression" if getattr(dataset, "is_regression", False) else "classification"
    if kind not in algorithm.tasks:
        raise ConfigError(
            f"algorithm={type(algorithm).__name__} is not allowed with "
            f"dataset={type(dataset).__name__}: it solves {' and '.join(algorithm.tasks)} tasks "
            f"only, so choose a {algorithm.tasks[0]} dataset or another algorithm.")
    regression = bool(getattr(dataset, "is_regression", False))
    module = MetaLearningModule(algorithm, optimizer=instantiate(cfg.optimizer),
                                scheduler=instantiate(cfg.scheduler) if cfg.scheduler else None,
                                grad_clip=cfg.grad_clip, regression=regression)
    return {"dataset": dataset, "sampler": sampler, "datamodule": datamodule,
            "algorithm": algorithm, "module": module, "regression": regression}


def resolve_ckpt_path(ckpt_path: str | None, output_dir: Path, log_dir: Path) -> str | None:
    """``last`` means this run dir's last.ckpt, else the newest last.ckpt under ``log_dir``."""
    if ckpt_path in (None, ""):
        return None
    if ckpt_path == "last":
        own = output_dir / "checkpoints" / "last.ckpt"
        found = [own] if own.exists() else sorted(log_dir.rglob("last.ckpt"),
                                                   key=lambda p: p.stat().st_mtime)
        if not found:
            raise ConfigError(f"ckpt_path=last is not allowed here: no last.ckpt exists under "
                              f"{log_dir}, so give the checkpoint's path instead.")
        log.info("Resuming from %s", found[-1])
        return str(found[-1])
    if not Path(ckpt_path).is_file():
        raise ConfigError(f"ckpt_path={ckpt_path} is not allowed: no such file; give an existing "
                          f".ckpt file or 'last'.")
    return ckpt_path


def check_hardware(trainer_cfg: DictConfig) -> None:
    """Stop before building anything when the hardware profile cannot run on this machine.

    Lightning would otherwise fail deep inside the Trainer ("No supported gpu backend
    found!") or, with ``accelerator=cpu``, silently switch float16 to bfloat16.
    """
    precision = str(trainer_cfg.get("precision"))
    accelerator = str(trainer_cfg.get("accelerator"))
    cuda = torch.cuda.is_available()
    if precision in ("16-mixed", "16") and (accelerator == "cpu" or not cuda):
        where = ("trainer.accelerator=cpu" if accelerator == "cpu"
                 else "this machine, where torch.cuda.is_available() is False")
        raise ConfigError(
            f"trainer.precision={precision} (hardware=fp16) is not allowed on {where}: float16 "
            f"mixed precision needs a CUDA GPU, so use hardware=bf16 or hardware=cpu instead.")
    if accelerator in ("gpu", "cuda") and not (cuda or torch.backends.mps.is_available()):
        raise ConfigError(
            f"trainer.accelerator={accelerator} (hardware=gpu) is not allowed on this machine: no "
            f"GPU is visible (torch.cuda.is_available() is False), so use hardware=cpu or "
            f"hardware=bf16 instead.")


def environment(trainer: L.Trainer) -> dict[str, Any]:
    return {"torch": torch.__version__, "device": str(trainer.strategy.root_device),
            "accelerator": type(trainer.accelerator).__name__, "world_size": trainer.world_size,
            "precision": str(trainer.precision)}


def test_block(metrics: dict[str, float], metric: str) -> dict[str, Any]:
    """The ``test`` block of results.json: every logged ``test/<name>`` with its ``_ci95``.

    The main metric comes first, then its value before adaptation and any per-task extra
    (e.g. a Neural Process's ``log_likelihood``), each as ``{mean, ci95, episodes}``.
    """
    episodes = int(metrics["test/episodes"])
    names = [metric] + sorted(k[len("test/"):-len("_ci95")] for k in metrics
                              if k.startswith("test/") and k.endswith("_ci95")
                              and k != f"test/{metric}_ci95")
    return {name: {"mean": metrics[f"test/{name}"], "ci95": metrics[f"test/{name}_ci95"],
                   "episodes": episodes} for name in names}


def train(cfg: DictConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """Fit on training episodes, keep the best validation checkpoint, test it, write results."""
    output_dir = Path(cfg.paths.output_dir)
    check_hardware(cfg.trainer)
    output_dir.mkdir(parents=True, exist_ok=True)
    objects = build(cfg)
    module: MetaLearningModule = objects["module"]
    metric = module.metric
    checkpoint = ModelCheckpoint(dirpath=output_dir / "checkpoints", filename="step_{step:06d}",
                                 auto_insert_metric_name=False, monitor=f"val/{metric}",
                                 mode="min" if metric == "mse" else "max")
    # last.ckpt, the state to resume from, rewritten at every validation. (`save_last=True`
    # above rewrites it only when the best checkpoint changes, so a run whose last
    # validation did not improve would resume from an older step.)
    last = ModelCheckpoint(dirpath=output_dir / "checkpoints", filename="last",
                           enable_version_counter=False)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    logger = instantiate_checked(cfg.logger) if cfg.get("logger") else False
    start = StartStep()
    trainer: L.Trainer = instantiate(cfg.trainer, logger=logger,
                                     callbacks=[checkpoint, last, ConfigInCheckpoint(resolved),
                                                start])
    # Before any process is launched: under ddp_spawn a ConfigError raised in the workers'
    # datamodule.setup would reach the user as a traceback from torch.multiprocessing.
    objects["sampler"].shard(trainer.world_size)
    if logger:
        logger.log_hyperparams(resolved)
    ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path"), output_dir, Path(cfg.paths.log_dir))
    started = time.perf_counter()
    trainer.fit(module, datamodule=objects["datamodule"], ckpt_path=ckpt_path)
    wall = time.perf_counter() - started
    best = checkpoint.best_model_path or None
    fit_metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}  # test() resets them
    tested = trainer.test(module, datamodule=objects["datamodule"], ckpt_path=best, verbose=False)
    metrics = {k: float(v) for k, v in tested[0].items()}
    sampler = objects["sampler"]
    # ddp_spawn trains in child processes and hands back weights and callback_metrics but
    # not the loop state, so this process's trainer.global_step is 0 there.
    steps = trainer.global_step or int(fit_metrics.get("train/steps", 0))
    results = {
        "experiment": {"algorithm": cfg.algorithm._target_.rsplit(".", 1)[-1],
                       "dataset": cfg.dataset._target_.rsplit(".", 1)[-1],
                       "ways": sampler.ways, "shots": sampler.shots, "queries": sampler.queries,
                       "train_ways": sampler.train_ways, "train_shots": sampler.train_shots,
                       "seed": cfg.seed},
        "test": test_block(metrics, metric),
        "val": {f"best_{metric}": fit_metrics.get(f"val/best_{metric}"),
                "best_step": (int(fit_metrics["val/best_step"]) if "val/best_step" in fit_metrics
                              else None),
                "best_checkpoint": best},
        "train": {"steps": steps, "tasks": steps * sampler.meta_batch_size,
                  "tasks_per_second": ((steps - start.step) * sampler.meta_batch_size / wall
                                       if wall else None),
                  "wall_seconds": wall, "resumed_from": ckpt_path},
        "environment": environment(trainer),
        "config": resolved,
    }
    if trainer.is_global_zero:
        (output_dir / "results.json").write_text(json.dumps(results, indent=2))
        if objects["regression"] and hasattr(objects["dataset"], "curve"):
            episodes = EvalEpisodes(sampler, objects["datamodule"].splits["test"], TEST, 4)
            results["plot"] = str(plot_regression_tasks(
                module.algorithm, episodes, output_dir / "test_tasks.png"))
        report(results, metric)
        log_test_table(logger, results["test"], step=steps)
    finish(logger)
    return results, {**objects, "trainer": trainer}


def report(results: dict[str, Any], metric: str) -> None:
    for name, value in results["test"].items():
        scale, unit = (100.0, "%") if metric == "accuracy" else (1.0, "")
        print(f"test {name}: {value['mean'] * scale:.4g}{unit} ± {value['ci95'] * scale:.2g}{unit} "
              f"(95% CI, {value['episodes']} episodes)")
    print(f"results: {results['config']['paths']['output_dir']}/results.json")


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
@exit_on_config_error
def main(cfg: DictConfig) -> None:
    """The ``metarun`` command."""
    train(cfg)


if __name__ == "__main__":
    main()
