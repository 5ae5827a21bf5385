"""Turning user mistakes into one clear sentence and a non-zero exit code."""

from __future__ import annotations

import functools
import logging
import os
import shutil
import sys
import textwrap
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TypeVar

from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from omegaconf import OmegaConf
from omegaconf.errors import MissingMandatoryValue

from metarun.catalog import extra_config_dirs, options
from metarun.errors import ConfigError, Interrupted
from metarun.run_directory import launching_rank

T = TypeVar("T")
DIR_KEYS = ("hydra.run.dir", "hydra.sweep.dir")
# Keys that moved: old command lines name them; each gets one sentence naming the new key.
MOVED = {
    "algorithm.task_batching": (
        "task_batching",
        "how a meta-batch's tasks run is a hardware choice, set beside task_chunk",
    ),
    "model.channels_last": (
        "channels_last",
        "the memory layout is a hardware choice that every backbone takes",
    ),
}
# What a cross-domain test set always takes from the training dataset.
FROM_DATASET = ("image_size", "channels", "mean", "std")


def config_error(err: BaseException) -> ConfigError | None:
    """The `ConfigError` behind ``err`` (Hydra wraps errors raised in constructors)."""
    current: BaseException | None = err
    while current is not None:
        if isinstance(current, ConfigError):
            return current
        current = current.__cause__ or current.__context__
    return None


def fail(message: str, code: int = 2) -> None:
    print(f"metarun: error: {message}", file=sys.stderr)
    sys.exit(code)


def exit_on_config_error(fn: Callable[..., T]) -> Callable[..., T]:
    """Print a user's `ConfigError` as ``metarun: error: ...`` and exit with code 2; an
    `Interrupted` run prints where its state is and exits with 128 + the signal's number.

    With ``HYDRA_FULL_ERROR=1`` a `ConfigError` propagates with its full traceback.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Interrupted as err:
            print(f"metarun: {err}", file=sys.stderr)
            sys.exit(err.exit_code)
        except MissingMandatoryValue as err:  # a required key (ckpt_path=...) not given
            if os.environ.get("HYDRA_FULL_ERROR") == "1":
                raise
            remove_unused_run_directory()
            fail(f"{err.full_key} is not set: give {err.full_key}=<value> (see --help for examples).")
        except (ConfigError, InstantiationException) as err:
            found = config_error(err)
            if found is None or os.environ.get("HYDRA_FULL_ERROR") == "1":
                raise
            remove_unused_run_directory()
            fail(str(found))

    return wrapper


# What a command writes in its run directory before it reads data or trains: a directory
# holding nothing else was this command's own, and is removed when it stops on a mistake.
BEFORE_STARTING = {".hydra", ".metarun.lock", "checkpoints"}


def remove_unused_run_directory() -> None:
    """Remove the run directory of a command that stopped before it wrote anything of its own
    (a mistake found before training), so failed attempts leave no empty run folders."""
    try:
        folder = Path(HydraConfig.get().runtime.output_dir)
    except (ValueError, MissingMandatoryValue):  # not under a Hydra command (the API, the tests)
        return
    if not launching_rank():  # a DDP rank shares rank 0's directory
        return
    logs = {f"{HydraConfig.get().job.name}.log"}
    entries = {p.name for p in folder.iterdir()} if folder.is_dir() else set()
    checkpoints = folder / "checkpoints"
    if entries <= BEFORE_STARTING | logs and not (checkpoints.is_dir() and any(checkpoints.iterdir())):
        logging.shutdown()  # Hydra's file handler holds the log open
        shutil.rmtree(folder, ignore_errors=True)


def check_output_dirs(argv: Iterable[str]) -> None:
    """Create an explicitly given ``hydra.run.dir`` / ``hydra.sweep.dir`` now and write a
    probe file in it, so one that cannot be created or written (read-only, immutable) is
    one sentence (exit 2) rather than a traceback from Hydra's own logging."""
    for arg in argv:
        key, _, value = arg.partition("=")
        if key.lstrip("+") not in DIR_KEYS or not value or "${" in value:
            continue
        folder = Path(value).expanduser()
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            fail(
                f"{key}={value} is not allowed: the directory cannot be created "
                f"({error.strerror or type(error).__name__}), so choose a writable path."
            )
        probe = folder / f".metarun-probe-{os.getpid()}"
        try:
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as error:
            fail(
                f"{key}={value} is not allowed: the directory cannot be written "
                f"({error.strerror or type(error).__name__}), so choose a writable path."
            )


def translate(argv: list[str]) -> list[str]:
    """Old command lines in today's keys: ``test_dataset=cub`` mounts the dataset group a
    second time (``dataset@test_dataset=cub``); a moved key is one sentence naming its new
    one; a user's config folders (``METARUN_CONFIG_PATH``) join Hydra's search path."""
    out = []
    for arg in argv:
        key, eq, value = arg.partition("=")
        bare = key.lstrip("+~")
        if eq and bare in MOVED:
            new, why = MOVED[bare]
            fail(f"{bare}={value} is not allowed: {why}, so write {new}={value}.")
        if eq and bare.startswith("test_dataset.") and bare.split(".", 1)[1] in FROM_DATASET:
            fail(
                f"{bare}={value} is not allowed: a cross-domain test set takes dataset."
                f"{bare.split('.', 1)[1]} (the model meta-tests on the images it was trained on), "
                f"so drop the override or change dataset.{bare.split('.', 1)[1]}."
            )
        if eq and bare == "test_dataset":
            arg = f"{key[: len(key) - len(bare)]}dataset@test_dataset={value}"
        out.append(arg)
    extra = extra_config_dirs()
    if extra and not any(a.split("=", 1)[0].lstrip("+") == "hydra.searchpath" for a in out):
        out.append("hydra.searchpath=[" + ",".join(f"file://{d}" for d in extra) + "]")
    return out


def options_text(group: str) -> str:
    """A group's options, comma-separated and wrapped to the help text's column (its
    ``${metarun.options:<group>}``), so ``--help`` lists what conf/ holds, never a copy."""
    names = ", ".join(options(group))
    return textwrap.fill(names, width=96, initial_indent=" " * 17, subsequent_indent=" " * 17).lstrip()


class _NoAdvertisement(logging.Filter):
    """Drops Lightning's advertisements for its cloud services ("💡 Tip: ...") from a run's output."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip")


def quiet_libraries() -> None:
    """A command's output without other libraries' noise that is not about the run: Lightning's
    tips, and the deprecation of torch's ``LeafSpec`` that Lightning's own code triggers."""
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_NoAdvertisement())
    warnings.filterwarnings(
        "ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated", category=FutureWarning
    )


def one_line_per_log_record() -> None:
    """Under a command, Hydra's handlers on the root logger print each record and file it in
    the run's log; the ``lightning`` package adds its own console handler as well, so each of
    Lightning's lines ("GPU available: ...") was printed twice. Drop Lightning's console
    handler where the root logger has handlers (outside a command, Lightning keeps its own)."""
    if not logging.getLogger().hasHandlers():
        return
    lightning = logging.getLogger("lightning")
    for handler in list(lightning.handlers):
        if type(handler) is logging.StreamHandler:
            lightning.removeHandler(handler)


def run_command(hydra_main: Callable[[], None], append_unless: tuple[str, ...] = ()) -> None:
    """Run a ``@hydra.main`` entry point on ``sys.argv`` after the checks above (and
    `translate`).

    ``append_unless``: for `metarun-eval`, whose own config does not hold the trained
    run's groups: a plain ``sampler.shots=5`` is passed to Hydra as ``+sampler.shots=5``
    unless its top-level key is one of these (the command's own keys).
    """
    quiet_libraries()
    OmegaConf.register_new_resolver("metarun.options", options_text, replace=True)  # the --help texts
    argv = translate(sys.argv[1:])
    sys.argv[1:] = argv
    check_output_dirs(argv)
    if append_unless:
        argv = [
            f"+{arg}"
            if "=" in arg
            and not arg.startswith(("+", "~", "-"))
            and arg.split("=", 1)[0].split(".", 1)[0] not in append_unless
            else arg
            for arg in argv
        ]
        sys.argv[1:] = argv
    hydra_main()
