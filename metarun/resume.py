"""What ``ckpt_path`` means for a run, and whether a checkpoint belongs to it.

`resolve_resume` decides what ``ckpt_path`` means for this run (``last``, ``auto`` or a
path) and refuses a checkpoint whose settings differ from the requested ones.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from metarun.checkpoint_files import LAST, load_checkpoint
from metarun.errors import ConfigError

log = logging.getLogger(__name__)

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
