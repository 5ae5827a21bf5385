"""``model.init_from``: start a backbone from another run's weights, and record where they came from.

The source is a metarun run directory (its best validation checkpoint, as its results.json
names it), a metarun ``.ckpt`` file, or a plain state dict file of the same backbone (a
torchvision or timm ``.pth`` / ``.safetensors``). Every tensor of the backbone except its
classifier head (``head.*``, which belongs to the source's own episode shape) is copied
exactly; names and shapes are checked first. The run keeps the lineage: the source file,
its sha256 and, for a metarun source, the source run's config.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from metarun.checkpoint_files import load_checkpoint
from metarun.errors import ConfigError
from metarun.models.weights import CLASSIFIER_NAMES, differences, read_state_dict

KEY = "model.init_from"
MODEL_PREFIX = "algorithm.model."  # a metarun checkpoint's backbone tensors
HEAD = "head."  # the backbone's own classifier head, never copied


def source_file(source: str) -> Path:
    """The file ``source`` names: a run directory's best validation checkpoint, or the file itself."""
    path = Path(source).expanduser()
    if not path.is_dir():
        if not path.exists():
            raise ConfigError(
                f"{KEY}={source} is not allowed: no such file or directory, so give a metarun run directory, "
                f"a .ckpt file or a weights file."
            )
        return path
    results = path / "results.json"
    try:
        best = json.loads(results.read_text())["val"]["best_checkpoint"]
    except (OSError, ValueError, KeyError, TypeError):
        best = None
    if not best:
        raise ConfigError(
            f"{KEY}={source} is not allowed: the directory holds no finished metarun run (no results.json naming a "
            f"best checkpoint), so give a finished run directory or one of its checkpoints/*.ckpt files."
        )
    best_path = Path(best)
    return best_path if best_path.is_absolute() or best_path.exists() else path / "checkpoints" / best_path.name


def source_tensors(path: Path) -> tuple[dict[str, Tensor], dict[str, Any] | None]:
    """The backbone tensors in ``path`` and, for a metarun checkpoint, the run's config."""
    if path.suffix == ".ckpt":
        checkpoint = load_checkpoint(path, key=KEY)
        state = checkpoint.get("state_dict") or {}
        tensors = {k[len(MODEL_PREFIX) :]: v for k, v in state.items() if k.startswith(MODEL_PREFIX)}
        return tensors, checkpoint["metarun_config"]
    return read_state_dict(path, KEY), None


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def init_backbone(model: nn.Module, source: str) -> dict[str, Any]:
    """Copy the backbone tensors of ``source`` into ``model`` (all but its ``head.*``) and
    return the lineage: ``{"init_from", "sha256", "tensors", "source_config"}``."""
    path = source_file(source)
    tensors, config = source_tensors(path)
    own = {k: v for k, v in model.state_dict().items() if not k.startswith(HEAD)}
    if own and not any(k in tensors for k in own) and any(f"features.{k}" in own for k in tensors):
        tensors = {f"features.{k}": v for k, v in tensors.items()}  # a bare torchvision / timm state dict
    ignore = [k for k in tensors if k.startswith(HEAD) or k.removeprefix("features.").split(".")[0] in CLASSIFIER_NAMES]
    found = differences(own, tensors, ignore=ignore)
    if found:
        what = f"{type(model).__name__} built from model.*"
        why = "; ".join(found)
        raise ConfigError(
            f"{KEY}={source} is not allowed: its weights do not fit the {what} ({why}), "
            f"so give a run, checkpoint or weights file of the same backbone and settings."
        )
    model.load_state_dict({k: tensors[k] for k in own}, strict=False)
    return {"init_from": str(path.resolve()), "sha256": sha256(path), "tensors": len(own), "source_config": config}


def describe(lineage: dict[str, Any] | None) -> str | None:
    """One line for a user: which weights a run started from, or None."""
    if not lineage:
        return None
    source = lineage.get("source_config") or {}
    algorithm = ((source.get("algorithm") or {}).get("_target_") or "").rsplit(".", 1)[-1]
    dataset = ((source.get("dataset") or {}).get("_target_") or "").rsplit(".", 1)[-1]
    run = f" ({algorithm} on {dataset})" if algorithm and dataset else ""
    return f"backbone initialised from {lineage['init_from']}{run}, sha256 {lineage['sha256'][:12]}"
