"""A run directory held by one process, and the signals that stop a run at a step boundary.

- `RunDirectory` refuses to start a second run in a directory that holds one, or that
  another metarun process is using, and checks that checkpoints can be written there.
- `SignalFlag` records SIGTERM and SIGINT so that training stops after saving its state.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import signal
import threading
from pathlib import Path
from types import FrameType
from typing import Any

from metarun.checkpoint_files import LAST
from metarun.errors import ConfigError

log = logging.getLogger(__name__)

LOCK = ".metarun.lock"
SIGNALS = (signal.SIGTERM, signal.SIGINT)


class RunDirectory:
    """Holds a run directory for one metarun process: a POSIX record lock (``lockf``) on
    ``.metarun.lock``, which processes it forks (the image decoders) do not inherit, so a run
    killed with SIGKILL never leaves its directory locked by orphans; the lock ends with the
    process, and the next run notes the pid it takes over from.

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
                f"({os_reason(error)}), so choose a writable hydra.run.dir."
            ) from None
        try:
            fcntl.lockf(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
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
        previous = self._lock.read().strip()
        if previous.isdigit() and int(previous) != os.getpid() and not pid_alive(int(previous)):
            log.info("%s: the run of pid %s ended without finishing (killed?); taking over", self.output_dir, previous)
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
                f"written ({os_reason(error)}), so free space there or choose a "
                f"writable hydra.run.dir."
            ) from None
        finally:
            with contextlib.suppress(OSError):
                probe.unlink()

    def __exit__(self, *exc: Any) -> None:
        if self._lock is not None and not self._lock.closed:
            with contextlib.suppress(OSError):
                fcntl.lockf(self._lock, fcntl.LOCK_UN)
            self._lock.close()


def os_reason(error: OSError) -> str:
    return error.strerror or errno.errorcode.get(error.errno or 0, type(error).__name__)


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


def launching_rank() -> bool:
    """Whether this process starts the run (global rank 0): DDP ranks started by Lightning,
    torchrun or srun share its run directory and must not claim it again."""
    for var in ("RANK", "SLURM_PROCID", "LOCAL_RANK"):
        if var in os.environ:
            return os.environ[var] == "0"
    return True


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists (signal 0 probes without sending)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's: alive
        return True
    return True
