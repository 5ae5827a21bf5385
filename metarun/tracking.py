"""Experiment trackers that never stop training when tracking fails."""

from __future__ import annotations

import csv
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger, WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

from metarun.errors import ConfigError

log = logging.getLogger(__name__)
WANDB_DEFAULT_URL = "https://api.wandb.ai"
REACH_TIMEOUT_S = 3.0


class _KeepingWriter(ExperimentWriter):
    """Lightning's CSV writer, except that it keeps an existing metrics.csv (and its header)."""

    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as file:
                self.metrics_keys = list(csv.DictReader(file).fieldnames or [])

    def drop_rows_from(self, step: int) -> None:
        """Remove the rows logged at ``step`` or later (a resumed run logs them again)."""
        if not self._fs.isfile(self.metrics_file_path):
            return
        with self._fs.open(self.metrics_file_path, "r", newline="") as file:
            rows = [r for r in csv.DictReader(file) if r.get("step") and int(r["step"]) < step]
        if not rows:
            self._fs.rm_file(self.metrics_file_path)
            self.metrics_keys = []
            return
        with self._fs.open(self.metrics_file_path, "w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=self.metrics_keys)
            writer.writeheader()
            writer.writerows(rows)


class ResumableCSVLogger(CSVLogger):
    """Lightning's `CSVLogger` for a run that may be resumed: ``metrics.csv`` keeps the rows
    of earlier sessions of the run up to the step it resumes from (`drop_rows_from`),
    where Lightning's logger would delete the file.

    Args: as `lightning.pytorch.loggers.CSVLogger` (``save_dir``, ``name``, ``version``).
    """

    @property
    def experiment(self) -> _KeepingWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _KeepingWriter(log_dir=self.log_dir)
        return self._experiment

    def drop_rows_from(self, step: int) -> None:
        self.save()  # anything still buffered goes to the file first
        self.experiment.drop_rows_from(step)


def wandb_endpoint() -> tuple[str, int]:
    """Host and port of the configured W&B server (``WANDB_BASE_URL``, else W&B's cloud)."""
    url = urlsplit(os.environ.get("WANDB_BASE_URL") or WANDB_DEFAULT_URL)
    port = url.port or (80 if url.scheme == "http" else 443)
    return url.hostname or "api.wandb.ai", port


def _wandb_reachable(timeout: float = REACH_TIMEOUT_S) -> bool:
    """Whether the configured W&B server accepts a connection within ``timeout`` seconds."""
    try:
        with socket.create_connection(wandb_endpoint(), timeout=timeout):
            return True
    except OSError:
        return False


def sweep_group() -> str | None:
    """``<task>-<sweep folder>`` for a job of a Hydra multirun (its jobs share it), else None."""
    try:
        hydra = HydraConfig.get()
    except ValueError:  # not under Hydra
        return None
    if hydra.mode != RunMode.MULTIRUN:
        return None
    return f"{hydra.job.name}-{Path(hydra.sweep.dir).name}"


def wandb_logger(
    project: str,
    save_dir: str,
    mode: str = "auto",
    entity: str | None = None,
    name: str | None = None,
    tags: list[str] | None = None,
    group: str | None = None,
    log_checkpoint: bool = False,
    version: str | None = None,
) -> Logger:
    """A Weights & Biases logger (Lightning's `WandbLogger`), offline when it must be.

    ``mode="auto"`` logs online only when ``WANDB_API_KEY`` is set and the W&B server
    answers, otherwise offline into ``save_dir/wandb`` (sync later with ``wandb sync``).
    ``mode="online"`` with a server that does not answer within a few seconds also logs
    offline, with a warning (W&B itself would wait about 90 s). The server is the one in
    ``WANDB_BASE_URL`` (W&B's cloud by default). If W&B cannot start at all, the run
    continues with a CSV logger and a warning.

    The composed config is the run's W&B config. A resumed run continues its W&B run (the
    run id, ``version``, is stored in every checkpoint; ``resume="allow"``); the jobs of one
    multirun share a W&B group named after the sweep; ``log_checkpoint`` logs the best
    checkpoint as a W&B artifact at the end of training.

    Args:
        project, entity, name, tags: the W&B run's identity.
        save_dir: the run directory.
        mode: "auto", "online" or "offline".
        group: the W&B group; None: ``<task>-<sweep folder>`` in a multirun, none otherwise.
        log_checkpoint: log the best checkpoint as an artifact (opt-in: checkpoints are large).
        version: the W&B run id to continue (given by the runner on resume), or None for a new one.
    """
    if mode not in ("auto", "online", "offline"):
        raise ConfigError(f"logger.mode={mode!r} is not allowed: choose auto, online or offline.")
    if mode == "auto":
        mode = "online" if os.environ.get("WANDB_API_KEY") and _wandb_reachable() else "offline"
    elif mode == "online" and not _wandb_reachable():
        host, port = wandb_endpoint()
        log.warning(
            "W&B server %s:%d does not answer; logging offline into %s/wandb instead (upload later with `wandb sync`).",
            host,
            port,
            save_dir,
        )
        mode = "offline"
    try:
        import wandb

        if wandb.run is not None:  # an earlier run in this process (a sweep's previous job)
            wandb.finish()  # would otherwise be reused by WandbLogger and get this run's logs
        # mode goes to wandb.init: WandbLogger(offline=True) would set os.environ["WANDB_MODE"]
        # for the whole process, so a later run in the same process could not go online.
        logger = WandbLogger(
            project=project,
            entity=entity,
            name=name,
            tags=tags,
            save_dir=save_dir,
            mode=mode,
            group=group or sweep_group(),
            log_model=bool(log_checkpoint),
            version=version,
            resume="allow",
        )
        _ = logger.experiment  # start the run now, so a failure falls back here
        return logger
    except Exception as err:  # tracking must never stop training
        log.warning("W&B could not start (%s); logging to CSV in %s instead.", err, save_dir)
        return CSVLogger(save_dir=save_dir, name="csv")


def log_test_table(logger: Logger | bool | None, test: dict[str, dict[str, Any]], step: int | None = None) -> None:
    """Log the ``test`` block of results.json as a table: a W&B table, or TensorBoard text
    (a no-op for other loggers)."""
    rows = [[k, v["mean"], v["ci95"], v["episodes"]] for k, v in test.items()]
    try:
        if isinstance(logger, WandbLogger):
            logger.log_table(key="test", columns=["metric", "mean", "ci95", "episodes"], data=rows, step=step)
        elif isinstance(logger, TensorBoardLogger):
            table = ["| metric | mean | ci95 | episodes |", "|---|---|---|---|"]
            table += [f"| {m} | {mean:.6g} | {ci:.3g} | {n} |" for m, mean, ci, n in rows]
            logger.experiment.add_text("test", "\n".join(table), global_step=step or 0)
    except Exception as err:  # results.json is written already; tracking must not fail the run
        log.warning("The logger could not record the test table (%s).", err)


def log_pictures(logger: Logger | bool | None, pictures: dict[str, Any], step: int | None = None) -> None:
    """Send the run's pictures (name -> PNG path) to W&B or TensorBoard, as images."""
    if not isinstance(logger, (WandbLogger, TensorBoardLogger)) or not pictures:
        return
    try:
        import numpy as np
        from PIL import Image

        for name, path in pictures.items():
            if isinstance(logger, WandbLogger):
                logger.log_image(key=name, images=[str(path)], step=step)
            else:
                with Image.open(path) as image:
                    array = np.asarray(image.convert("RGB"))  # [H, W, 3]
                logger.experiment.add_image(name, array, global_step=step or 0, dataformats="HWC")
    except Exception as err:  # the PNG files are written already
        log.warning("The logger could not record the pictures (%s).", err)


def finish(logger: Logger | bool | None) -> None:
    """End this run's logging: what was logged after Lightning finished (the pictures, the
    test table) is written out before `train` returns (TensorBoard's writer otherwise
    flushes on a timer), and the W&B run ends, so that the next run in this process starts
    its own."""
    if isinstance(logger, WandbLogger) and logger._experiment is not None:
        logger.experiment.finish()
    elif isinstance(logger, TensorBoardLogger) and logger._experiment is not None:
        logger.experiment.flush()
        logger.experiment.close()


class ProgressLog(Callback):
    """One plain line every ``every_n_steps`` outer steps and one per validation, for a
    stdout that is not a terminal (a log file, a scheduler's output), where Lightning's
    progress bar would write a carriage-return update for every step.

    Example: ``step 500/4000 | train/loss 0.8123 | train/mse 0.8123 | 412 tasks/s (this step) | 61 s``
    (results.json's ``train.tasks_per_second`` is the mean over the run).

    Args:
        every_n_steps: outer steps between lines.
    """

    def __init__(self, every_n_steps: int) -> None:
        self.every_n_steps = max(1, int(every_n_steps))
        self.started = time.monotonic()

    def on_train_start(self, trainer, pl_module) -> None:
        self.started = time.monotonic()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        step = trainer.global_step
        if step % self.every_n_steps and step != trainer.max_steps:
            return
        metrics = trainer.callback_metrics
        parts = [
            f"{k} {float(metrics[k]):.4g}"
            for k in sorted(metrics)
            if k.startswith("train/") and k not in ("train/steps", "train/tasks_per_second")
        ]
        if "train/tasks_per_second" in metrics:
            parts.append(f"{float(metrics['train/tasks_per_second']):.4g} tasks/s (this step)")
        total = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else "?"
        log.info("step %d/%s | %s | %.0f s", step, total, " | ".join(parts), time.monotonic() - self.started)

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        metrics = trainer.callback_metrics
        parts = [
            f"{k} {float(metrics[k]):.4g}"
            for k in sorted(metrics)
            if k.startswith("val/") and not k.endswith(("_ci95", "episodes", "best_step"))
        ]
        log.info("validation at step %d | %s", trainer.global_step, " | ".join(parts))


class RunPictures(Callback):
    """Records the training loss (every ``every_n_steps`` outer steps) and each validation's
    metric for the run's learning curves. The history is saved in checkpoints, so a
    resumed run draws the whole run; once training ends it is kept, so the test that restores the
    best checkpoint (and with it that checkpoint's shorter history) still draws the whole run.

    Args:
        metric: the validation metric ("accuracy" or "mse").
        every_n_steps: outer steps between recorded training losses.
    """

    def __init__(self, metric: str, every_n_steps: int) -> None:
        self.metric, self.every_n_steps = metric, max(1, int(every_n_steps))
        self.train: list[list[float]] = []
        self.val: list[list[float]] = []
        self.fit_ended = False

    def on_fit_end(self, trainer, pl_module) -> None:
        self.fit_ended = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        step = trainer.global_step
        if step % self.every_n_steps == 0 and "train/loss" in trainer.callback_metrics:
            self.train.append([step, float(trainer.callback_metrics["train/loss"])])

    def on_validation_end(self, trainer, pl_module) -> None:
        key = f"val/{self.metric}"
        if not trainer.sanity_checking and key in trainer.callback_metrics:
            self.val.append([trainer.global_step, float(trainer.callback_metrics[key])])

    def state_dict(self) -> dict[str, Any]:
        return {"train": self.train, "val": self.val}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not self.fit_ended:  # a resume; after training, a restored checkpoint's history is older
            self.train, self.val = list(state.get("train", [])), list(state.get("val", []))
