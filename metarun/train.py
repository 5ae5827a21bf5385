"""Meta-train, validate and test one composed configuration.

`train(cfg)` does the work and returns ``(results, objects)``; `main` is the thin
``@hydra.main`` entry point behind the ``metarun`` command.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.errors import InstantiationException
from hydra.utils import get_class, instantiate
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from omegaconf import DictConfig, OmegaConf

from metarun.checkpoints import RunCheckpoints, RunDirectory, SignalFlag, resolve_resume
from metarun.cli import config_error, exit_on_config_error, run_command
from metarun.datamodule import EpisodicDataModule
from metarun.episodes import TEST, EvalEpisodes
from metarun.errors import ConfigError, NonFiniteLoss
from metarun.module import MetaLearningModule
from metarun.plots import plot_learning_curves, plot_regression_tasks, plot_test_episode
from metarun.tracking import ProgressLog, ResumableCSVLogger, RunPictures, finish, log_pictures, log_test_table

log = logging.getLogger(__name__)
_PACKAGE = Path(__file__).resolve().parent
# The config groups: inside an installed package (metarun/conf), else the repository's conf/.
CONFIG_DIR = str(_PACKAGE / "conf" if (_PACKAGE / "conf").is_dir() else _PACKAGE.parent / "conf")


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


def instantiate_checked(node: Any, **kwargs: Any) -> Any:
    """`instantiate`, re-raising a constructor's `ConfigError` as itself, not Hydra's wrapper."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as err:
        found = config_error(err)
        if found is None:
            raise
        raise found from None


def positive_number(key: str, value: Any, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        allowed = "a positive number or null" if allow_none else "a positive number"
        raise ConfigError(f"{key}={value!r} is not allowed: it must be {allowed}.")


def check_settings(cfg: DictConfig) -> None:
    """The top-level settings every run reads, checked before anything is built."""
    seed = cfg.get("seed")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise ConfigError(f"seed={seed!r} is not allowed: it must be an integer from 0 to 2**63 - 1.")
    lr = OmegaConf.select(cfg, "optimizer.lr")
    if lr is not None:
        positive_number("optimizer.lr", lr)
    positive_number("grad_clip", cfg.get("grad_clip"), allow_none=True)
    direction = cfg.get("objective_direction", "maximize")
    if direction not in ("maximize", "minimize"):
        raise ConfigError(
            f"objective_direction={direction!r} is not allowed: choose maximize or "
            f"minimize (the direction a sweeper optimises the validation metric in)."
        )
    chunk = cfg.get("task_chunk")
    if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk <= 0):
        raise ConfigError(
            f"task_chunk={chunk!r} is not allowed: it must be a positive integer "
            f"(tasks per backward pass) or null for the whole meta-batch."
        )


def build(cfg: DictConfig) -> dict[str, Any]:
    """Instantiate every configured object; stops early (`ConfigError`) on an impossible setting.

    Everything that needs no data (sampler, model, algorithm, optimiser) is built and
    checked first (`build_learner`), so a bad setting is reported before a dataset is decoded.
    """
    return build_data(cfg, build_learner(cfg))


def check_image_groups(cfg: DictConfig, regression: bool) -> None:
    """The groups that only image datasets take (transform, test_dataset), checked before any data."""
    dataset = cfg.dataset._target_.rsplit(".", 1)[-1]
    for group, what in (("transform", "augments images"), ("test_dataset", "meta-tests on another image dataset")):
        if regression and cfg.get(group):
            raise ConfigError(
                f"{group}={cfg[group]._target_.rsplit('.', 1)[-1]} is not allowed with dataset={dataset}: it "
                f"{what}, and {dataset} has no images, so drop the {group} override."
            )
    if cfg.get("test_dataset"):
        for key in ("image_size", "channels"):
            train_value, test_value = cfg.dataset.get(key), cfg.test_dataset.get(key)
            if train_value != test_value:
                raise ConfigError(
                    f"test_dataset.{key}={test_value} is not allowed with dataset.{key}={train_value}: the "
                    f"model meta-tests on the images it was trained on, so leave test_dataset.{key} unset."
                )


def build_learner(cfg: DictConfig) -> dict[str, Any]:
    """The sampler, the algorithm and its module: every setting that needs no data, checked."""
    check_settings(cfg)
    sampler = instantiate_checked(cfg.sampler)
    with torch.random.fork_rng(devices=[]):  # seeded initialisation, global RNG untouched
        torch.manual_seed(cfg.seed)
        model = instantiate_checked(cfg.model)
        algorithm = instantiate_checked(cfg.algorithm, model=model)  # and its own parameters
    algorithm.check_episode_shape(sampler.train_ways, sampler.ways)
    algorithm.check_task_batching()
    regression = bool(getattr(get_class(cfg.dataset._target_), "is_regression", False))
    kind = "regression" if regression else "classification"
    if kind not in algorithm.tasks:
        raise ConfigError(
            f"algorithm={type(algorithm).__name__} is not allowed with "
            f"dataset={cfg.dataset._target_.rsplit('.', 1)[-1]}: it solves "
            f"{' and '.join(algorithm.tasks)} tasks only, so choose a {algorithm.tasks[0]} "
            f"dataset or another algorithm."
        )
    check_image_groups(cfg, regression)
    optimizer = instantiate(cfg.optimizer)
    try:  # the optimiser's own checks (e.g. Adam's betas), on a throwaway instance
        optimizer(params=algorithm.parameters())
    except (ValueError, TypeError) as error:
        raise ConfigError(
            f"optimizer={cfg.optimizer._target_} is not allowed with these "
            f"settings: {error}, so change the optimizer.* values."
        ) from None
    module = MetaLearningModule(
        algorithm,
        optimizer=optimizer,
        scheduler=instantiate(cfg.scheduler) if cfg.scheduler else None,
        grad_clip=cfg.grad_clip,
        regression=regression,
        task_chunk=cfg.get("task_chunk"),
    )
    augment = instantiate_checked(cfg.transform) if cfg.get("transform") else None  # checked before any data
    return {"sampler": sampler, "algorithm": algorithm, "module": module, "regression": regression, "augment": augment}


def build_data(cfg: DictConfig, learner: dict[str, Any]) -> dict[str, Any]:
    """``learner`` plus the dataset and its episode loaders (the episode shapes checked)."""
    dataset = instantiate_checked(cfg.dataset)
    test_dataset = build_test_dataset(cfg.test_dataset) if cfg.get("test_dataset") else None
    datamodule = EpisodicDataModule(dataset, learner["sampler"], learner["augment"], test_dataset)
    datamodule.prepare()
    return {**learner, "dataset": dataset, "datamodule": datamodule}


def experiment_block(cfg: DictConfig, sampler: Any) -> dict[str, Any]:
    """The ``experiment`` block of results.json (training and `metarun-eval`): what ran, on
    which dataset (and which meta-test dataset, cross-domain), with which episode shape."""
    block = {
        "algorithm": cfg.algorithm._target_.rsplit(".", 1)[-1],
        "dataset": cfg.dataset._target_.rsplit(".", 1)[-1],
        "ways": sampler.ways,
        "shots": sampler.shots,
        "queries": sampler.queries,
        "train_ways": sampler.train_ways,
        "train_shots": sampler.train_shots,
        "seed": cfg.seed,
    }
    if cfg.get("test_dataset"):
        block["test_dataset"] = cfg.test_dataset._target_.rsplit(".", 1)[-1]
    return block


def build_test_dataset(node: DictConfig) -> Any:
    """The cross-domain dataset with its test split loaded; its errors name ``test_dataset.*``
    (the dataset classes speak of ``dataset.*``, the group they usually sit in)."""
    try:
        dataset = instantiate_checked(node)
        dataset.split("test")
    except ConfigError as error:
        raise ConfigError(re.sub(r"\bdataset\.", "test_dataset.", str(error))) from None
    return dataset


def check_hardware(trainer_cfg: DictConfig) -> None:
    """Stop before building anything when the hardware profile cannot run on this machine.

    Lightning would otherwise fail deep inside the Trainer ("No supported gpu backend
    found!") or, with ``accelerator=cpu``, silently switch float16 to bfloat16.
    """
    precision = str(trainer_cfg.get("precision"))
    accelerator = str(trainer_cfg.get("accelerator"))
    cuda = torch.cuda.is_available()
    if precision in ("16-mixed", "16") and (accelerator == "cpu" or not cuda):
        where = (
            "trainer.accelerator=cpu"
            if accelerator == "cpu"
            else "this machine, where torch.cuda.is_available() is False"
        )
        raise ConfigError(
            f"trainer.precision={precision} (hardware=fp16) is not allowed on {where}: float16 "
            f"mixed precision needs a CUDA GPU, so use hardware=bf16 or hardware=cpu instead."
        )
    if accelerator in ("gpu", "cuda") and not (cuda or torch.backends.mps.is_available()):
        raise ConfigError(
            f"trainer.accelerator={accelerator} (hardware=gpu) is not allowed on this machine: no "
            f"GPU is visible (torch.cuda.is_available() is False), so use hardware=cpu or "
            f"hardware=bf16 instead."
        )


def environment(trainer: L.Trainer) -> dict[str, Any]:
    return {
        "torch": torch.__version__,
        "device": str(trainer.strategy.root_device),
        "accelerator": type(trainer.accelerator).__name__,
        "world_size": trainer.world_size,
        "precision": str(trainer.precision),
    }


def test_block(metrics: dict[str, float], metric: str) -> dict[str, Any]:
    """The ``test`` block of results.json: every logged ``test/<name>`` with its ``_ci95``.

    The main metric comes first, then its value before adaptation and any per-task extra
    (e.g. a Neural Process's ``log_likelihood``), each as ``{mean, ci95, episodes}``.
    """
    episodes = int(metrics["test/episodes"])
    names = [metric] + sorted(
        k[len("test/") : -len("_ci95")]
        for k in metrics
        if k.startswith("test/") and k.endswith("_ci95") and k != f"test/{metric}_ci95"
    )
    return {
        name: {"mean": metrics[f"test/{name}"], "ci95": metrics[f"test/{name}_ci95"], "episodes": episodes}
        for name in names
    }


def check_run_settings(cfg: DictConfig) -> None:
    """The trainer's step limit and the checkpoint cadence (before anything is built)."""
    steps = OmegaConf.select(cfg, "trainer.max_steps")
    if isinstance(steps, bool) or not isinstance(steps, int) or not (steps > 0 or steps == -1):
        raise ConfigError(
            f"trainer.max_steps={steps!r} is not allowed: it must be a positive "
            f"integer (or -1 for no limit, with trainer.max_time set)."
        )
    every = OmegaConf.select(cfg, "checkpoint.every_n_steps")
    if every is not None and (isinstance(every, bool) or not isinstance(every, int) or every < 1):
        raise ConfigError(f"checkpoint.every_n_steps={every!r} is not allowed: it must be a positive integer or null.")
    positive_number("checkpoint.every_minutes", OmegaConf.select(cfg, "checkpoint.every_minutes"), allow_none=True)


def launching_rank() -> bool:
    """Whether this process starts the run (global rank 0): DDP ranks started by Lightning,
    torchrun or srun share its run directory and must not claim it again."""
    for var in ("RANK", "SLURM_PROCID", "LOCAL_RANK"):
        if var in os.environ:
            return os.environ[var] == "0"
    return True


@contextlib.contextmanager
def restored_environment(*names: str) -> Iterator[None]:
    """Put environment variables back as they were. Lightning leaves ``MASTER_PORT`` set
    after a DDP launch; without this the next run in the same process (a sweep's next job)
    would rendezvous on the previous run's port instead of picking its own."""
    saved = {name: os.environ.get(name) for name in names}
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def write_results(output_dir: Path, results: dict[str, Any], name: str = "results.json") -> None:
    """``results`` as ``output_dir/name``, written atomically."""
    tmp = output_dir / f".{name}.tmp"
    tmp.write_text(json.dumps(results, indent=2))
    os.replace(tmp, output_dir / name)


def diverged(
    cfg: DictConfig,
    error: NonFiniteLoss,
    checkpoints: RunCheckpoints,
    output_dir: Path,
    experiment: dict[str, Any],
    resolved: dict[str, Any],
    owner: bool,
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
    rates = [
        f"{key} (now {OmegaConf.select(cfg, key)})"
        for key in ("optimizer.lr", "algorithm.inner_lr", "algorithm.init_inner_lr")
        if OmegaConf.select(cfg, key) is not None
    ]
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


def train(cfg: DictConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """Fit on training episodes, keep the best validation checkpoint, test it, write results.

    The resumable state is written to ``checkpoints/last.ckpt`` (see `RunCheckpoints`);
    ``ckpt_path`` resumes it (`metarun.checkpoints.resolve_resume`).
    """
    output_dir = Path(cfg.paths.output_dir)
    check_hardware(cfg.trainer)
    check_run_settings(cfg)
    learner = build_learner(cfg)  # every setting checked before the disk is touched
    resolved = OmegaConf.to_container(cfg, resolve=True)
    ckpt_path, _ = resolve_resume(
        cfg.get("ckpt_path"), output_dir, Path(cfg.paths.log_dir), resolved, OmegaConf.to_container(cfg, resolve=False)
    )
    if ckpt_path:
        log.info("Resuming from %s", ckpt_path)
    directory = (
        RunDirectory(output_dir, resuming=ckpt_path is not None) if launching_rank() else contextlib.nullcontext()
    )
    with SignalFlag() as signals, directory, restored_environment("MASTER_PORT"):
        return _train(cfg, build_data(cfg, learner), output_dir, resolved, ckpt_path, signals)


def _train(
    cfg: DictConfig,
    objects: dict[str, Any],
    output_dir: Path,
    resolved: dict[str, Any],
    ckpt_path: str | None,
    signals: SignalFlag,
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
    logger = instantiate_checked(cfg.logger) if cfg.get("logger") else False
    start = StartStep()
    history = RunPictures(metric, cfg.trainer.get("log_every_n_steps") or 50)
    callbacks: list[Callback] = [checkpoint, last, start, history]
    # Lightning's progress bar rewrites one line with carriage returns: fine on a terminal,
    # megabytes of updates in a log file. Elsewhere a plain line every log_every_n_steps.
    bar = bool(cfg.trainer.get("enable_progress_bar", True)) and sys.stdout.isatty()
    if cfg.trainer.get("enable_progress_bar", True) and not bar:
        callbacks.append(ProgressLog(cfg.trainer.get("log_every_n_steps") or 50))
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
        raise diverged(cfg, error, last, output_dir, experiment, resolved, owner=trainer.is_global_zero) from None
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
        "experiment": experiment,
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
    if trainer.is_global_zero:
        write_results(output_dir, results)
        pictures = {
            "learning_curves": plot_learning_curves(
                history.train, history.val, metric, output_dir / "learning_curves.png"
            )
        }
        test_split = objects["datamodule"].splits["test"]
        if objects["regression"] and hasattr(objects["dataset"], "curve"):
            episodes = EvalEpisodes(sampler, test_split, TEST, 4)
            pictures["test_tasks"] = plot_regression_tasks(module.algorithm, episodes, output_dir / "test_tasks.png")
            results["plot"] = str(pictures["test_tasks"])
        elif not objects["regression"]:
            pictures["test_episode"] = plot_test_episode(
                module.algorithm, sampler.eval_episode(test_split, TEST, 0), output_dir / "test_episode.png"
            )
        report(results, metric)
        log_test_table(logger, results["test"], step=steps)
        log_pictures(logger, pictures, step=steps)
    finish(logger)
    return results, {**objects, "trainer": trainer}


def report(results: dict[str, Any], metric: str) -> None:
    for name, value in results["test"].items():
        scale, unit = (100.0, "%") if metric == "accuracy" else (1.0, "")
        print(
            f"test {name}: {value['mean'] * scale:.4g}{unit} ± {value['ci95'] * scale:.2g}{unit} "
            f"(95% CI, {value['episodes']} episodes)"
        )
    print(f"results: {results['config']['paths']['output_dir']}/results.json")


def objective(results: dict[str, Any]) -> float:
    """What a run returns to a sweeper: its best validation metric (accuracy or MSE), or
    the test metric when it never validated."""
    metric = "mse" if "mse" in results["test"] else "accuracy"
    best = results["val"].get(f"best_{metric}")
    return float(best if best is not None else results["test"][metric]["mean"])


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
@exit_on_config_error
def hydra_main(cfg: DictConfig) -> float:
    return objective(train(cfg)[0])


def main() -> None:
    """The ``metarun`` command."""
    run_command(hydra_main)


if __name__ == "__main__":
    main()
