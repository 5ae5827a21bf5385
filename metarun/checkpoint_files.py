"""Reading a checkpoint a user points at: safely, and into the current config shape.

- `load_checkpoint` reads a file with ``torch.load(weights_only=True)``, turns every
  malformed file into one sentence, and brings the config of an older checkpoint format
  to today's keys (`migrate_config`).
- `load_weights` puts its weights into a freshly built module, one sentence on a mismatch.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from metarun.errors import ConfigError

# 1: before the format was recorded; 2: + metarun_format, written at step boundaries;
# 3: task_batching and channels_last are top-level settings (algorithm.task_batching, model.channels_last)
FORMAT = 3
LAST = "last.ckpt"


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
    checkpoint["metarun_config"] = migrate_config(checkpoint["metarun_config"], found)
    return checkpoint


def migrate_config(config: dict[str, Any], found: int) -> dict[str, Any]:
    """A checkpoint's stored config (format ``found``) in the keys of this version."""
    if found < 3:
        algorithm = config.get("algorithm")
        if isinstance(algorithm, dict) and "task_batching" in algorithm:
            config = {**config, "algorithm": {k: v for k, v in algorithm.items() if k != "task_batching"}}
            config.setdefault("task_batching", algorithm["task_batching"])
        model = config.get("model")
        if isinstance(model, dict) and "channels_last" in model:
            config = {**config, "model": {k: v for k, v in model.items() if k != "channels_last"}}
            config.setdefault("channels_last", model["channels_last"])
    return config


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
