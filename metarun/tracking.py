"""Experiment trackers that never stop training when tracking fails."""

from __future__ import annotations

import logging
import os
import socket
from typing import Any

from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger

log = logging.getLogger(__name__)


def _wandb_reachable(host: str = "api.wandb.ai", port: int = 443, timeout: float = 2.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def wandb_logger(project: str, save_dir: str, mode: str = "auto", entity: str | None = None,
                 name: str | None = None, tags: list[str] | None = None) -> Logger:
    """A Weights & Biases logger (Lightning's `WandbLogger`), offline when it must be.

    ``mode="auto"`` logs online only when ``WANDB_API_KEY`` is set and the W&B server
    answers, otherwise offline into ``save_dir/wandb`` (sync later with ``wandb sync``).
    If W&B cannot start at all, the run continues with a CSV logger and a warning.

    Args:
        project, entity, name, tags: the W&B run's identity.
        save_dir: the run directory.
        mode: "auto", "online" or "offline".
    """
    if mode not in ("auto", "online", "offline"):
        from metarun.errors import ConfigError
        raise ConfigError(f"logger.mode={mode!r} is not allowed: choose auto, online or offline.")
    if mode == "auto":
        mode = "online" if os.environ.get("WANDB_API_KEY") and _wandb_reachable() else "offline"
    try:
        import wandb

        if wandb.run is not None:  # an earlier run in this process (a sweep's previous job)
            wandb.finish()  # would otherwise be reused by WandbLogger and get this run's logs
        # mode goes to wandb.init: WandbLogger(offline=True) would set os.environ["WANDB_MODE"]
        # for the whole process, so a later run in the same process could not go online.
        logger = WandbLogger(project=project, entity=entity, name=name, tags=tags,
                             save_dir=save_dir, mode=mode)
        _ = logger.experiment  # start the run now, so a failure falls back here
        return logger
    except Exception as err:  # tracking must never stop training
        log.warning("W&B could not start (%s); logging to CSV in %s instead.", err, save_dir)
        return CSVLogger(save_dir=save_dir, name="csv")


def log_test_table(logger: Logger | bool | None, test: dict[str, dict[str, Any]],
                   step: int | None = None) -> None:
    """Log the ``test`` block of results.json as a W&B table (a no-op for other loggers)."""
    if not isinstance(logger, WandbLogger):
        return
    try:
        logger.log_table(key="test", columns=["metric", "mean", "ci95", "episodes"],
                         data=[[k, v["mean"], v["ci95"], v["episodes"]] for k, v in test.items()],
                         step=step)
    except Exception as err:  # results.json is written already; tracking must not fail the run
        log.warning("W&B could not log the test table (%s).", err)


def finish(logger: Logger | bool | None) -> None:
    """End this run's W&B run, so that the next run in this process starts its own."""
    if isinstance(logger, WandbLogger) and logger._experiment is not None:
        logger.experiment.finish()
