"""Writing a run's resumable state: when, where and how (`RunCheckpoints`).

``<run dir>/checkpoints/last.ckpt`` is written every ``every_n_steps`` outer steps or
``every_minutes`` minutes, whichever comes first, at the end of training, and when SIGTERM
or SIGINT arrives (then training stops with `Interrupted`). Writes are atomic, always at a
step boundary, and never of non-finite weights. Reading is in `metarun.checkpoint_files`,
resume resolution in `metarun.resume`, the directory lock and signals in
`metarun.run_directory`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from metarun.checkpoint_files import FORMAT, LAST
from metarun.errors import ConfigError, Interrupted
from metarun.run_directory import SignalFlag, os_reason

log = logging.getLogger(__name__)

PREVIOUS = "previous.ckpt"  # the write before last.ckpt: where a divergence rolls back to


class RunCheckpoints(Callback):
    """Writes the resumable state to ``dirpath/last.ckpt``: every ``every_n_steps`` outer
    steps or ``every_minutes`` minutes (whichever comes first; null turns one off), when
    training starts and ends, and when SIGTERM or SIGINT arrives, after which training
    stops with `Interrupted`. A killed run loses at most the steps since the last write.

    Every write happens when an outer step is complete: after its update, or after its
    validation on a step that validates (the two states Lightning resumes exactly, so a
    resumed run ends with the metrics of an uninterrupted one). A write goes to a
    temporary file renamed over ``last.ckpt`` (a crash never leaves a partial file), first
    flushes the loggers (their rows up to the step are on disk), keeps the write before it
    as ``previous.ckpt``, and is skipped while any weight is non-finite. After a divergence
    ``last.ckpt`` is rolled back to a state from before the diverging step
    (`good_checkpoint`). Each checkpoint also carries
    the run's resolved config (for `metarun-eval`, resume checks and `load_checkpoint`).

    Args:
        dirpath: the checkpoint folder.
        every_n_steps: outer steps between writes, or None.
        every_minutes: minutes between writes, or None.
        config: the resolved run config stored in every checkpoint.
        signals: the run's `SignalFlag`.
    """

    def __init__(
        self,
        dirpath: Path,
        every_n_steps: int | None,
        every_minutes: float | None,
        config: dict[str, Any],
        signals: SignalFlag,
    ) -> None:
        self.dirpath, self.config, self.signals = dirpath, config, signals
        self.every_n_steps, self.every_minutes = every_n_steps, every_minutes
        self.saved_step = 0
        self.saved_at = time.monotonic()
        self.pending = False  # due on a step that validates: written after its validation
        self.stopping = False  # saved for a signal: stop once Lightning has logged the step

    @property
    def path(self) -> Path:
        return self.dirpath / LAST

    def good_checkpoint(self, diverged_at: int, restore: bool = True) -> Path | None:
        """After the loss of step ``diverged_at`` was not finite: ``last.ckpt`` when it is from
        an earlier step, else (it holds the weights that diverged) ``previous.ckpt`` moved
        back over it (by the process that owns the files, ``restore``); None when neither is
        from before that step."""
        for path in (self.path, self.dirpath / PREVIOUS):
            if path.is_file() and torch.load(path, map_location="cpu", weights_only=True)["global_step"] < diverged_at:
                if path != self.path and restore:
                    os.replace(path, self.path)
                return self.path
        return None

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        checkpoint["metarun_config"] = self.config
        checkpoint["metarun_format"] = FORMAT
        if trainer.logger is not None and trainer.logger.version not in (None, ""):  # which tracker run to continue
            checkpoint["metarun_logger_version"] = str(trainer.logger.version)

    def on_train_start(self, trainer, pl_module) -> None:
        self.signals.take()  # over Lightning's SIGTERM handler, which would stop mid-validation
        self.saved_at, self.saved_step = time.monotonic(), trainer.global_step
        if trainer.global_step == 0:
            self.save(trainer, force=True)  # proves, with a real checkpoint, that the folder takes one

    def _decide(self, trainer) -> tuple[bool, bool]:
        """(stop, due) at this step, the same on every process (any rank's signal, rank 0's clock)."""
        step = trainer.global_step
        stop = self.signals.signum is not None
        due = self.pending or (
            self.saved_step != step
            and (
                (self.every_n_steps is not None and step - self.saved_step >= self.every_n_steps)
                or (self.every_minutes is not None and time.monotonic() - self.saved_at >= 60 * self.every_minutes)
            )
        )
        if trainer.world_size > 1:
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
            due = trainer.strategy.broadcast(due)
        return stop, due

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        stop, due = self._decide(trainer)
        if not (stop or due):
            return
        loop = trainer.fit_loop.epoch_loop
        if loop._should_check_val_fx(trainer.fit_loop._data_fetcher):
            self.pending = True  # this step validates: write (and stop) after its validation
            return
        self.save(trainer)
        self.stopping = stop  # Lightning logs this step's metrics after this hook

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if self.stopping:
            self.stop(trainer)

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        stop, due = self._decide(trainer)
        if stop or due:
            self.save(trainer)
        if stop:
            self.stop(trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        self.save(trainer)
        if self.stopping or self.signals.signum is not None:
            self.stop(trainer)

    def stop(self, trainer: L.Trainer) -> None:
        """End training after a signal: its state is saved at this step."""
        for logger in trainer.loggers:
            logger.save()
        raise Interrupted(self.signals.signum or signal.SIGTERM, self.saved_step, str(self.path))

    def on_test_start(self, trainer, pl_module) -> None:
        self.signals.take()

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        if self.signals.signum is not None:  # training is over and saved: stop testing
            raise Interrupted(self.signals.signum, trainer.global_step, str(self.path))

    def save(self, trainer: L.Trainer, force: bool = False) -> None:
        """Write ``last.ckpt`` atomically, unless this step is written already or a weight is
        non-finite."""
        self.pending = False
        if self.saved_step == trainer.global_step and not force:
            return
        module = trainer.lightning_module
        if not all(torch.isfinite(p).all() for p in module.parameters()):
            log.warning("Not saving step %d: some weights are not finite.", trainer.global_step)
            return
        for logger in trainer.loggers:  # rows up to this step reach the disk with the checkpoint
            logger.save()
        tmp = self.dirpath / f".{LAST}.tmp"
        try:
            trainer.save_checkpoint(tmp, weights_only=False)  # the full resumable state
            if trainer.is_global_zero:
                if self.path.exists():
                    os.replace(self.path, self.dirpath / PREVIOUS)
                os.replace(tmp, self.path)
        except OSError as error:
            with contextlib.suppress(OSError):
                tmp.unlink()
            last = f"the last good one is {self.path}" if self.path.exists() else "none was written"
            raise ConfigError(
                f"the checkpoint folder {self.dirpath} is not allowed: writing step "
                f"{trainer.global_step} failed ({os_reason(error)}) and {last}, so "
                f"free space there and resume with ckpt_path=last."
            ) from None
        trainer.strategy.barrier("metarun.last_checkpoint")
        self.saved_step, self.saved_at = trainer.global_step, time.monotonic()
