"""Reading a weights file a user points at, and copying its tensors into a backbone.

One reader and one checker for every place that takes someone else's weights
(``model.weights`` of the timm and torchvision backbones, ``model.init_from``): files are
untrusted, so ``.pth``/``.pt`` are read with ``weights_only=True`` and every malformed file,
missing name or wrong shape is one sentence.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from metarun.errors import ConfigError

# top-level names of the ImageNet classifiers that a backbone without its head ignores
CLASSIFIER_NAMES = ("fc", "head", "classifier", "last_linear", "heads")


def read_state_dict(path: Path, key: str) -> dict[str, Tensor]:
    """The tensors of a ``.safetensors`` file, or of a ``.pth``/``.pt`` state dict (a bare
    one, or under ``state_dict``/``model``), loaded without running code."""
    if not path.is_file():
        raise ConfigError(f"{key}={path} is not allowed: no such file (nothing is downloaded at run time).")
    state: Any
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
            for inner in ("state_dict", "model"):
                if isinstance(state, dict) and isinstance(state.get(inner), dict):
                    state = state[inner]
    except Exception as error:  # an untrusted file: whatever the reader raises is one sentence
        first = str(error).strip().splitlines()[0][:200] if str(error).strip() else "no details"
        raise ConfigError(
            f"{key}={path} is not allowed: it is not a readable weights file ({type(error).__name__}: {first})."
        ) from None
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ConfigError(f"{key}={path} is not allowed: it holds no state dict (names to tensors).")
    return state


def differences(own: dict[str, Tensor], state: dict[str, Tensor], ignore: Iterable[str] = ()) -> list[str]:
    """What keeps ``state`` from filling ``own`` exactly, one clause per kind: the names it
    lacks, the names ``own`` lacks (except ``ignore``), the shapes that differ; the first
    three names of each, and how many more."""
    ignored = set(ignore)
    missing = [k for k in own if k not in state]
    extra = [k for k in state if k not in own and k not in ignored]
    shapes = [
        f"{k} has shape {tuple(state[k].shape)}, not {tuple(own[k].shape)}"
        for k in own
        if k in state and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    found = []
    if missing:
        found.append(f"it lacks {first(missing)}")
    if extra:
        found.append(f"it has {first(extra)}, which the model lacks")
    if shapes:
        found.append(first(shapes))
    return found


def first(items: list[str], count: int = 3) -> str:
    """The first ``count`` of ``items``, and how many more there are."""
    more = len(items) - count
    return ", ".join(items[:count]) + (f" (and {more} more)" if more > 0 else "")


def load_backbone_file(module: nn.Module, path: Path, key: str, name: str) -> None:
    """A local state dict of the architecture ``name`` into ``module`` (its ImageNet
    classifier, named in `CLASSIFIER_NAMES`, is ignored); one sentence on any mismatch."""
    state = read_state_dict(path, key)
    own = module.state_dict()
    classifier = [k for k in state if k not in own and k.split(".")[0] in CLASSIFIER_NAMES]
    found = differences(own, state, ignore=classifier)
    if found:
        raise ConfigError(
            f"{key}={path} is not allowed with model.name={name}: {found[0]}, so give the "
            f"weights of that architecture (with dataset.channels input channels)."
        )
    module.load_state_dict({k: v for k, v in state.items() if k in own})
