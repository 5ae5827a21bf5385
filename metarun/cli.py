"""Turning user mistakes into one clear sentence and a non-zero exit code."""

from __future__ import annotations

import functools
import os
import sys
from typing import Callable, TypeVar

from hydra.errors import InstantiationException

from metarun.errors import ConfigError

T = TypeVar("T")


def config_error(err: BaseException) -> ConfigError | None:
    """The `ConfigError` behind ``err`` (Hydra wraps errors raised in constructors)."""
    while err is not None:
        if isinstance(err, ConfigError):
            return err
        err = err.__cause__ or err.__context__
    return None


def exit_on_config_error(fn: Callable[..., T]) -> Callable[..., T]:
    """Print a user's `ConfigError` as ``metarun: error: ...`` and exit with code 2.

    With ``HYDRA_FULL_ERROR=1`` the exception propagates with its full traceback.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (ConfigError, InstantiationException) as err:
            found = config_error(err)
            if found is None or os.environ.get("HYDRA_FULL_ERROR") == "1":
                raise
            print(f"metarun: error: {found}", file=sys.stderr)
            sys.exit(2)

    return wrapper
