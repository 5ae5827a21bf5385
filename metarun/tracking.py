"""Experiment trackers that never stop training when tracking fails."""

from __future__ import annotations

import logging
import os
import socket

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
        logger = WandbLogger(project=project, entity=entity, name=name, tags=tags,
                             save_dir=save_dir, offline=mode == "offline")
        _ = logger.experiment  # start the run now, so a failure falls back here
        return logger
    except Exception as err:  # tracking must never stop training
        log.warning("W&B could not start (%s); logging to CSV in %s instead.", err, save_dir)
        return CSVLogger(save_dir=save_dir, name="csv")
