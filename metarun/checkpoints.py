"""A run's resumable state: when it is written, how it is read back, and which run it belongs to.

- `RunCheckpoints` writes ``<run dir>/checkpoints/last.ckpt`` every ``every_n_steps`` outer
  steps or ``every_minutes`` minutes, whichever comes first, at the end of training, and
  when SIGTERM or SIGINT arrives (then training stops with `Interrupted`). Writes are
  atomic, always at a step boundary, and never of non-finite weights.
- `load_checkpoint` reads a user-supplied file with ``torch.load(weights_only=True)`` and
  turns every malformed file into one sentence.
- `resolve_resume` decides what ``ckpt_path`` means for this run (``last``, ``auto`` or a
  path) and refuses a checkpoint whose settings differ from the requested ones.
- `RunDirectory` refuses to start a second run in a directory that holds one, or that
  another metarun process is using, and checks that checkpoints can be written there.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import pickle
import signal
import threading
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from metarun.errors import ConfigError, Interrupted

log = logging.getLogger(__name__)

FORMAT = 2  # 1: before the format was recorded; 2: + metarun_format, written at step boundaries
LAST = "last.ckpt"
PREVIOUS = "previous.ckpt"  # the write before last.ckpt: where a divergence rolls back to
LOCK = ".metarun.lock"
SIGNALS = (signal.SIGTERM, signal.SIGINT)
# Settings that make a run what it is: `ckpt_path=last` takes another directory's checkpoint
# only when all of them agree. (Step limits, validation cadence, logging, paths and hardware
# other than precision may differ, so a run can be extended or moved to other machines.)
RUN_KEYS = (
    "dataset",
    "sampler",
    "algorithm",
    "model",
    "transform",
    "optimizer",
    "scheduler",
    "grad_clip",
    "seed",
    "trainer.precision",
)
# Settings that shape the saved state: resuming this run's own checkpoint (or a named file)
# needs them to agree; other changes (a lower optimizer.lr after a divergence) are allowed
# and logged.
STATE_KEYS = ("dataset._target_", "algorithm._target_", "model")


# ------------------------------------------------------------------ reading a checkpoint


def load_checkpoint(path: str | Path, key: str = "ckpt_path") -> dict[str, Any]:
    """The checkpoint at ``path``, loaded without executing code (``weights_only=True``).

    A directory, an empty, truncated, non-PyTorch or unsafe file, a checkpoint without a
    metarun config, or one written by a newer metarun raises `ConfigError` naming ``key``.
    """
    p = Path(path)
    where = f"{key}={path} is not allowed"
    if p.is_dir():
        raise ConfigError(
            f"{where}: it is a directory, so give a .ckpt file written by metarun "
            f"(such as <run dir>/checkpoints/{LAST})."
        )
    if not p.is_file():
        raise ConfigError(f"{where}: no such file, so give an existing .ckpt file written by metarun.")
    if p.stat().st_size == 0:
        raise ConfigError(f"{where}: the file is empty, so give a complete .ckpt file written by metarun.")
    with open(p, "rb") as f:
        header = f.read(4)
    if header[:2] != b"PK" and header[:1] != b"\x80":  # torch.save: a zip, or a legacy pickle
        raise ConfigError(
            f"{where}: it is not a PyTorch checkpoint (it starts with {header!r}, "
            f"not a zip or pickle header), so give a .ckpt file written by metarun."
        )
    try:
        checkpoint = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        text = str(error)
        if "Weights only load failed" in text:
            raise ConfigError(
                f"{where}: it holds Python objects that a safe load refuses "
                f"(metarun never runs code from a checkpoint), so it is not a "
                f"metarun checkpoint."
            ) from None
        raise ConfigError(f"{where}: it is truncated or corrupt ({_first_line(text)}).") from None
    except (
        RuntimeError,
        EOFError,
        OSError,
        ValueError,
        zipfile.BadZipFile,
        KeyError,
        AttributeError,
        IndexError,
        TypeError,
    ) as error:
        raise ConfigError(
            f"{where}: it is truncated or corrupt ({type(error).__name__}: {_first_line(str(error))})."
        ) from None
    if not isinstance(checkpoint, dict) or "metarun_config" not in checkpoint:
        raise ConfigError(f"{where}: it holds no metarun config, so it was not written by metarun training.")
    found = checkpoint.get("metarun_format", 1)
    if not isinstance(found, int) or found > FORMAT:
        raise ConfigError(
            f"{where}: it was written by a newer metarun (checkpoint format "
            f"{found}; this version reads up to {FORMAT}), so upgrade metarun."
        )
    return checkpoint


def load_weights(module: torch.nn.Module, checkpoint: dict[str, Any], where: str, fix: str) -> None:
    """The checkpoint's weights into ``module`` (built from its config, perhaps with
    overrides); weights that do not fit become one sentence: ``where (reason), so fix.``"""
    try:
        module.load_state_dict(checkpoint["state_dict"])
    except (RuntimeError, KeyError) as error:
        reason = str(error).strip().splitlines()[-1].strip()
        raise ConfigError(f"{where} ({reason}), so {fix}.") from None


def _first_line(text: str) -> str:
    line = text.strip().splitlines()[0] if text.strip() else "no details"
    return line[:200].rstrip(".")


# ------------------------------------------------------------------ which run it belongs to


def _leaves(node: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _leaves(value, f"{prefix}{key}.")
    else:
        yield prefix[:-1], node


def _select(config: dict[str, Any], dotted: str) -> Any:
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def config_differences(
    stored: dict[str, Any], requested: dict[str, Any], requested_raw: dict[str, Any], keys: tuple[str, ...] = RUN_KEYS
) -> list[str]:
    """``key=<stored> there, not <requested>`` for every setting under ``keys`` that differs.

    ``requested_raw`` is the requested config before interpolation: a value taken from
    ``paths.*`` or ``hydra:`` (a data folder, a cache) is where the run reads from, not
    what it computes, and may differ.
    """
    out = []
    for key in keys:
        theirs = dict(_leaves(_select(stored, key), f"{key}."))
        ours = dict(_leaves(_select(requested, key), f"{key}."))
        raw = dict(_leaves(_select(requested_raw, key), f"{key}."))
        for leaf in sorted(theirs.keys() | ours.keys()):
            text = raw.get(leaf)
            if isinstance(text, str) and ("${paths." in text or "${hydra:" in text):
                continue
            if theirs.get(leaf) != ours.get(leaf):
                out.append(f"{leaf}={theirs.get(leaf)!r} there, not {ours.get(leaf)!r}")
    return out


def _own_checkpoints(output_dir: Path) -> list[Path]:
    """This run directory's resumable checkpoints, newest first (Lightning's SLURM
    ``hpc_ckpt_N.ckpt`` included)."""
    found = [output_dir / "checkpoints" / LAST, *output_dir.glob("hpc_ckpt_*.ckpt")]
    return sorted((p for p in found if p.is_file()), key=lambda p: p.stat().st_mtime, reverse=True)


def resolve_resume(
    ckpt_path: str | None, output_dir: Path, log_dir: Path, requested: dict[str, Any], requested_raw: dict[str, Any]
) -> tuple[str | None, dict[str, Any] | None]:
    """(checkpoint file to resume from, its contents), or (None, None) for a fresh start.

    - ``last``: this run directory's newest checkpoint; else the newest ``last.ckpt`` under
      ``log_dir`` whose settings all match the requested ones (`RUN_KEYS`); else `ConfigError`.
    - ``auto``: this run directory's newest checkpoint, else a fresh start (a job that a
      scheduler requeues with the same command).
    - a path: that file.

    This directory's checkpoint and a named file must agree on `STATE_KEYS` (the dataset,
    the algorithm, the model); other changed settings are logged.
    """
    if not ckpt_path:  # None or ""
        return None, None
    if ckpt_path in ("last", "auto"):
        own = _own_checkpoints(output_dir)
        if own:
            checkpoint = load_checkpoint(own[0], "ckpt_path")
            _check_matches(str(own[0]), checkpoint, requested, requested_raw)
            return str(own[0]), checkpoint
        if ckpt_path == "auto":
            return None, None
        candidates = sorted(log_dir.rglob(LAST), key=lambda p: p.stat().st_mtime, reverse=True)
        closest: tuple[Path, list[str]] | None = None
        for path in candidates:
            try:
                checkpoint = load_checkpoint(path, "ckpt_path")
            except ConfigError:
                continue
            diff = config_differences(checkpoint["metarun_config"], requested, requested_raw)
            if not diff:
                log.info("Resuming from %s, the newest checkpoint with these settings", path)
                return str(path), checkpoint
            closest = closest or (path, diff)
        if closest is None:
            raise ConfigError(
                f"ckpt_path=last is not allowed here: the run directory {output_dir} "
                f"has no checkpoints/{LAST} and none exists under {log_dir}, so give "
                f"the run's directory as hydra.run.dir or the checkpoint's path."
            )
        path, diff = closest
        raise ConfigError(
            f"ckpt_path=last is not allowed here: the run directory {output_dir} has "
            f"no checkpoints/{LAST}, and the newest one under {log_dir} ({path}) is "
            f"another run's ({_listed(diff)}), so give this run's directory as "
            f"hydra.run.dir or the checkpoint's path."
        )
    checkpoint = load_checkpoint(ckpt_path, "ckpt_path")
    _check_matches(ckpt_path, checkpoint, requested, requested_raw)
    return ckpt_path, checkpoint


def _listed(diff: list[str]) -> str:
    more = f" and {len(diff) - 2} more" if len(diff) > 2 else ""
    return "; ".join(diff[:2]) + more


def _check_matches(
    path: str, checkpoint: dict[str, Any], requested: dict[str, Any], requested_raw: dict[str, Any]
) -> None:
    stored = checkpoint["metarun_config"]
    diff = config_differences(stored, requested, requested_raw, STATE_KEYS)
    if diff:
        raise ConfigError(
            f"ckpt_path={path} is not allowed: it holds another dataset, algorithm "
            f"or model ({_listed(diff)}), so resume it with its own settings or "
            f"start a new run."
        )
    changed = config_differences(stored, requested, requested_raw)
    if changed:
        log.warning("Resuming %s with changed settings: %s.", path, "; ".join(changed))


# ------------------------------------------------------------------ the run directory


class RunDirectory:
    """Holds a run directory for one metarun process (an advisory ``flock`` on ``.metarun.lock``).

    Refuses, with one sentence each: a directory another metarun process holds, a
    directory that already holds a run (checkpoints or results.json) unless this run
    resumes, and a checkpoint folder that cannot be written (read-only, full, not a folder).

    Args:
        output_dir: the run directory (``hydra.run.dir``).
        resuming: whether this run continues from a checkpoint.
    """

    def __init__(self, output_dir: Path, resuming: bool) -> None:
        self.output_dir, self.resuming = output_dir, resuming
        self._lock: Any = None

    def __enter__(self) -> RunDirectory:
        where = f"the run directory {self.output_dir} (hydra.run.dir)"
        try:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            self._lock = open(self.output_dir / LOCK, "a+")
        except OSError as error:
            raise ConfigError(
                f"{where} is not allowed: it cannot be written "
                f"({_os_reason(error)}), so choose a writable hydra.run.dir."
            ) from None
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._lock.seek(0)
            holder = self._lock.read().strip() or "unknown"
            self._lock.close()
            raise ConfigError(
                f"{where} is not allowed: another metarun process (pid {holder}) is "
                f"running there, so wait for it or choose another "
                f"hydra.run.dir."
            ) from None
        self._lock.seek(0)
        self._lock.truncate()
        self._lock.write(str(os.getpid()))
        self._lock.flush()
        held = [name for name in ("results.json", f"checkpoints/{LAST}") if (self.output_dir / name).exists()]
        if held and not self.resuming:
            self.__exit__()
            raise ConfigError(
                f"{where} is not allowed: it already holds a run ({held[0]}), so "
                f"resume it with ckpt_path=last or choose another hydra.run.dir."
            )
        self.check_writable()
        return self

    def check_writable(self) -> None:
        """Write and remove a probe file in ``checkpoints/``: a read-only, immutable or full
        folder is found before any data is loaded."""
        folder = self.output_dir / "checkpoints"
        probe = folder / f".probe-{os.getpid()}"
        try:
            folder.mkdir(exist_ok=True)
            with open(probe, "wb") as f:
                f.write(b"\0" * (1 << 16))
                f.flush()
                os.fsync(f.fileno())
        except OSError as error:
            self.__exit__()
            raise ConfigError(
                f"the checkpoint folder {folder} is not allowed: it cannot be "
                f"written ({_os_reason(error)}), so free space there or choose a "
                f"writable hydra.run.dir."
            ) from None
        finally:
            with contextlib.suppress(OSError):
                probe.unlink()

    def __exit__(self, *exc: Any) -> None:
        if self._lock is not None and not self._lock.closed:
            with contextlib.suppress(OSError):
                fcntl.flock(self._lock, fcntl.LOCK_UN)
            self._lock.close()


def _os_reason(error: OSError) -> str:
    return error.strerror or errno.errorcode.get(error.errno or 0, type(error).__name__)


# ------------------------------------------------------------------ signals


class SignalFlag:
    """Records SIGTERM and SIGINT instead of dying, while installed (main thread only).

    The first signal is kept in ``signum``; training reads it at the next step boundary.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is None:
            log.warning("Received %s: saving the run state at the end of this step.", signal.Signals(signum).name)
            self.signum = signum

    def take(self) -> None:
        """(Re)install the handlers, e.g. over the ones Lightning registers at each stage."""
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in SIGNALS:
            previous = signal.signal(sig, self.handle)
            self._previous.setdefault(sig, previous)

    def release(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def __enter__(self) -> SignalFlag:
        self.take()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


# ------------------------------------------------------------------ writing checkpoints


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
                f"{trainer.global_step} failed ({_os_reason(error)}) and {last}, so "
                f"free space there and resume with ckpt_path=last."
            ) from None
        trainer.strategy.barrier("metarun.last_checkpoint")
        self.saved_step, self.saved_at = trainer.global_step, time.monotonic()
