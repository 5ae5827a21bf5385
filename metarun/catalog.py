"""What the config groups offer: the one place that lists learners, datasets and presets.

Everything that needs a list of algorithms, datasets or presets (the predict command's
messages, the tests, the benchmark and results tables) derives it from the config files
here, so a new ``conf/<group>/<name>.yaml`` is picked up with no list edited.

``METARUN_CONFIG_PATH`` (folders separated by ``:``) adds config folders of your own, laid
out like ``conf/``: their groups join the packaged ones in every command (Hydra's search
path) and in these lists.
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Any

from hydra.utils import get_class
from omegaconf import OmegaConf

_PACKAGE = Path(__file__).resolve().parent
# The config groups: inside an installed package (metarun/conf), else the repository's conf/.
CONFIG_DIR = str(_PACKAGE / "conf" if (_PACKAGE / "conf").is_dir() else _PACKAGE.parent / "conf")
ENV = "METARUN_CONFIG_PATH"


def extra_config_dirs() -> list[Path]:
    """The user's config folders from ``METARUN_CONFIG_PATH``, in order."""
    return [Path(p).expanduser().resolve() for p in os.environ.get(ENV, "").split(os.pathsep) if p]


def config_dirs() -> list[Path]:
    """Every config folder: the packaged one first, then the user's."""
    return [Path(CONFIG_DIR), *extra_config_dirs()]


def options(group: str) -> dict[str, Path]:
    """``name -> file`` of every option of ``group`` (e.g. "algorithm"), sorted by name; a
    user's folder may add options, not replace packaged ones."""
    found: dict[str, Path] = {}
    for folder in config_dirs():
        for path in sorted((folder / group).glob("*.yaml")):
            found.setdefault(path.stem, path)
    return dict(sorted(found.items()))


def option_config(group: str, name: str) -> dict[str, Any]:
    """The config of option ``name`` of ``group`` as written (interpolations unresolved)."""
    return _load(options(group)[name])


def _load(path: Path) -> dict[str, Any]:
    data = OmegaConf.to_container(OmegaConf.load(path))
    return {str(k): v for k, v in data.items()} if isinstance(data, dict) else {}


def target(group: str, name: str) -> str | None:
    """The ``_target_`` of ``group/name``, following defaults within the group (fomaml -> maml)."""
    files = options(group)
    seen: set[str] = set()
    while name in files and name not in seen:
        seen.add(name)
        data = _load(files[name])
        if "_target_" in data:
            return str(data["_target_"])
        parents = [d for d in data.get("defaults", []) if isinstance(d, str) and d != "_self_"]
        if not parents:
            return None
        name = parents[0]
    return None


def preset_choice(preset: str, group: str) -> str | None:
    """The option of ``group`` that ``experiment/<preset>.yaml`` selects (``override /group:``),
    following the presets it builds on."""
    files = options("experiment")
    seen: set[str] = set()
    while preset in files and preset not in seen:
        seen.add(preset)
        parent = None
        for entry in _load(files[preset]).get("defaults", []):
            if isinstance(entry, dict):
                for key, value in entry.items():
                    if str(key).split()[-1].lstrip("/") == group:
                        return str(value)
            elif isinstance(entry, str) and entry != "_self_":
                parent = entry
        if parent is None:
            return None
        preset = parent
    return None


def classes(group: str) -> dict[str, type]:
    """``name -> class`` of every option of ``group`` that names one."""
    out = {}
    for name in options(group):
        found = target(group, name)
        if found is not None:
            out[name] = get_class(found)
    return out


def head_free_learners() -> list[str]:
    """The algorithm options whose learner has no fixed classifier head (any number of ways)."""
    return [name for name, cls in classes("algorithm").items() if not getattr(cls, "needs_head", True)]


def learners_for(kind: str) -> list[str]:
    """The algorithm options whose learner solves ``kind`` tasks ("classification" or "regression")."""
    return [name for name, cls in classes("algorithm").items() if kind in getattr(cls, "tasks", ())]


def transductive_learners() -> list[str]:
    """The algorithm options whose learner offers ``algorithm.transductive`` (its constructor
    takes it: `metarun.algorithms.transductive`)."""
    return [name for name, cls in classes("algorithm").items() if "transductive" in inspect.signature(cls).parameters]
