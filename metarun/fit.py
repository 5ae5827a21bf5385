"""The Lightning part of a run: fit, validate, test a built configuration, write the results
(`fit`, called by `metarun.runner.train` once every setting has been checked)."""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from omegaconf import DictConfig, OmegaConf

from metarun.algorithms.base import MetaAlgorithm
from metarun.build import instantiate_checked
from metarun.checkpoints import RunCheckpoints
from metarun.cli import one_line_per_log_record
from metarun.episodes import TEST, EvalEpisodes
from metarun.errors import ConfigError, NonFiniteLoss
from metarun.module import MetaLearningModule
from metarun.plots import plot_learning_curves, plot_regression_tasks, plot_sources, plot_test_episode
from metarun.results import (
    environment,
    experiment_block,
    report,
    source_table,
    test_block,
    with_test_time,
    write_results,
)
from metarun.run_directory import SignalFlag
from metarun.tracking import ProgressLog, ResumableCSVLogger, RunPictures, finish, log_pictures, log_test_table

log = logging.getLogger("metarun.runner")


class StartStep(Callback):
    """Records the outer step training starts from (non-zero on resume), for throughput,
    and drops the CSV rows of steps from there on: a resumed run logs them again, and the
    rows before it stay (a fresh run starts from an empty file)."""

    step = 0

    def on_train_start(self, trainer, pl_module) -> None:
        self.step = trainer.global_step
        for logger in trainer.loggers:
            if isinstance(logger, ResumableCSVLogger):
                logger.drop_rows_from(self.step)


def diverged(
    cfg: DictConfig,
    error: NonFiniteLoss,
    checkpoints: RunCheckpoints,
    output_dir: Path,
    experiment: dict[str, Any],
    resolved: dict[str, Any],
    owner: bool,
    learner: MetaAlgorithm,
) -> ConfigError:
    """results.json with ``status: diverged`` (written by the ``owner`` of the run's files,
    rank 0), and the sentence that names what to change."""
    found = checkpoints.good_checkpoint(error.step, restore=owner)
    good = None if found is None else str(found)
    if owner:
        write_results(
            output_dir,
            {
                "status": "diverged",
                "experiment": experiment,
                "train": {"diverged_at_step": error.step, "meta_loss": str(error.value), "last_good_checkpoint": good},
                "config": resolved,
            },
        )
    keys = ["optimizer.lr", *(f"algorithm.{key}" for key in learner.lr_keys)]  # the learner's own rates
    rates = [f"{key} (now {OmegaConf.select(cfg, key)})" for key in keys if OmegaConf.select(cfg, key) is not None]
    where = (
        f"the last good checkpoint is {good} (resume it with ckpt_path=last after the change)"
        if good
        else "no checkpoint was written before it"
    )
    return ConfigError(
        f"training diverged: {error}, so lower {' or '.join(rates)} or set "
        f"grad_clip (now {cfg.get('grad_clip') or 'null'}) to a maximum meta-gradient norm "
        f"such as 10; {where}."
    )


def fit(
    cfg: DictConfig,
    objects: dict[str, Any],
    output_dir: Path,
    resolved: dict[str, Any],
    ckpt_path: str | None,
    signals: SignalFlag,
    logger_version: str | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    module: MetaLearningModule = objects["module"]
    sampler = objects["sampler"]
    metric = module.metric
    checkpoint = ModelCheckpoint(
        dirpath=output_dir / "checkpoints",
        filename="step_{step:06d}",
        auto_insert_metric_name=False,
        monitor=f"val/{metric}",
        mode="min" if metric == "mse" else "max",
    )
    last = RunCheckpoints(
        output_dir / "checkpoints", cfg.checkpoint.every_n_steps, cfg.checkpoint.every_minutes, resolved, signals
    )
    # a resumed run continues its tracker's run (W&B's run id; the CSV and TensorBoard folders)
    resume = {"version": logger_version} if logger_version else {}
    logger = instantiate_checked(cfg.logger, **resume) if cfg.get("logger") else False
    start = StartStep()
    history = RunPictures(metric, cfg.trainer.get("log_every_n_steps") or 50)
    callbacks: list[Callback] = [checkpoint, last, start, history]
    # Lightning's progress bar rewrites one line with carriage returns: fine on a terminal,
    # megabytes of updates in a log file. Elsewhere a plain line every log_every_n_steps.
    bar = bool(cfg.trainer.get("enable_progress_bar", True)) and sys.stdout.isatty()
    if cfg.trainer.get("enable_progress_bar", True) and not bar:
        callbacks.append(ProgressLog(cfg.trainer.get("log_every_n_steps") or 50))
    one_line_per_log_record()
    trainer: L.Trainer = instantiate(cfg.trainer, logger=logger, callbacks=callbacks, enable_progress_bar=bar)
    # Before any process is launched: under ddp_spawn a ConfigError raised in the workers'
    # datamodule.setup would reach the user as a traceback from torch.multiprocessing.
    sampler.shard(trainer.world_size)
    if logger:
        logger.log_hyperparams(resolved)
    experiment = experiment_block(cfg, sampler)
    started = time.perf_counter()
    try:
        trainer.fit(module, datamodule=objects["datamodule"], ckpt_path=ckpt_path, weights_only=True)
    except NonFiniteLoss as error:
        finish(logger)
        raise diverged(
            cfg, error, last, output_dir, experiment, resolved, owner=trainer.is_global_zero, learner=module.algorithm
        ) from None
    wall = time.perf_counter() - started
    best = checkpoint.best_model_path or None
    fit_metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}  # test() resets them
    tested = trainer.test(module, datamodule=objects["datamodule"], ckpt_path=best, verbose=False, weights_only=True)
    metrics = {k: float(v) for k, v in tested[0].items()}
    # ddp_spawn trains in child processes and hands back weights and callback_metrics but
    # not the loop state, so this process's trainer.global_step is 0 there.
    steps = trainer.global_step or int(fit_metrics.get("train/steps", 0))
    results = {
        "status": "completed",
        "experiment": with_test_time(experiment, module),
        "test": test_block(metrics, metric),
        "val": {
            f"best_{metric}": fit_metrics.get(f"val/best_{metric}"),
            "best_step": (int(fit_metrics["val/best_step"]) if "val/best_step" in fit_metrics else None),
            "best_checkpoint": best,
        },
        "train": {
            "steps": steps,
            "tasks": steps * sampler.meta_batch_size,
            "tasks_per_second": ((steps - start.step) * sampler.meta_batch_size / wall if wall else None),
            "wall_seconds": wall,
            "resumed_from": ckpt_path,
            "last_checkpoint": str(last.path),
        },
        "environment": environment(trainer),
        "config": resolved,
    }
    sources = source_table(fit_metrics, metrics, metric)
    if sources:  # dataset=multi: each source's validation and test
        results["sources"] = sources
    if module.lineage:  # where the backbone's starting weights came from (model.init_from)
        results["lineage"] = module.lineage
    if trainer.is_global_zero:
        write_results(output_dir, results)
        pictures = {
            "learning_curves": plot_learning_curves(
                history.train, history.val, metric, output_dir / "learning_curves.png"
            )
        }
        test_split = objects["datamodule"].splits["test"]
        if objects["dataset"].has_curve:
            episodes = EvalEpisodes(sampler, test_split, TEST, 4)
            pictures["test_tasks"] = plot_regression_tasks(module.algorithm, episodes, output_dir / "test_tasks.png")
            results["plot"] = str(pictures["test_tasks"])
        elif not objects["regression"]:
            pictures["test_episode"] = plot_test_episode(
                module.algorithm,
                sampler.eval_episode(test_split, TEST, 0),
                output_dir / "test_episode.png",
                normalization=None if test_split.mean is None else (test_split.mean, test_split.std),
            )
        if results.get("sources"):
            pictures["sources"] = plot_sources(results["sources"], metric, output_dir / "sources.png")
        report(results, metric)
        log_test_table(logger, results["test"], step=steps)
        log_pictures(logger, pictures, step=steps)
    finish(logger)
    return results, {**objects, "trainer": trainer}
