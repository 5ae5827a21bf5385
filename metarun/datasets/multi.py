"""Several image datasets in one run (Meta-Dataset's "all sources", Triantafillou et al. 2020)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, cast

from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

from metarun.datasets.base import SPLITS, Dataset
from metarun.datasets.images import check_image_args, check_normalization
from metarun.datasets.images import prepare_image as prepare_any_image
from metarun.episodes import SourceMixture, TaskSource
from metarun.errors import ConfigError

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image

# What every source takes from the multi group: one image size, channels and normalisation.
SHARED = ("image_size", "channels", "mean", "std")


class MultiSource(Dataset):
    """Several image datasets as one: each split is a `SourceMixture` of the sources' splits,
    each source decoded once at the common image size into its own memory-mapped cache.

    A training episode comes from one source, drawn by ``weights`` from the task's
    generator (uniform by default, as Meta-Dataset's "all sources"); validation and test
    episodes take the sources in turn, and every metric is also reported per source.

    Args:
        sources: name -> that source's dataset (the build turns ``dataset.sources``, a list of
            dataset options or ``{name: <option>, <key>: <value>, ...}`` entries, into these,
            each with this group's image_size, channels, mean and std).
        weights: each source's share of the training episodes, in the order of ``sources``
            (null: uniform).
        image_size, channels, mean, std: what every source produces.
    """

    name: ClassVar[str] = "multi"

    def __init__(
        self,
        sources: Mapping[str, Dataset],
        weights: Sequence[float] | None = None,
        image_size: int = 84,
        channels: int = 3,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        check_image_args(image_size, channels)
        check_normalization(mean, std, channels)
        self.sources = dict(sources)
        self.weights = source_weights(weights, list(self.sources))
        self.image_size, self.channels = image_size, channels
        self._splits: dict[str, SourceMixture] = {}

    @classmethod
    def complete(cls, node: DictConfig) -> None:
        """Turn ``node.sources`` (names, or ``{name: <option>, ...}`` with that option's own
        keys) into the sources' dataset configs, each with this group's `SHARED` keys."""
        from metarun.catalog import classes, option_config

        entries = node.get("sources")
        if isinstance(entries, DictConfig) and all("_target_" in v for v in entries.values()):
            return  # completed already (a checkpoint's config)
        known = [
            name
            for name, c in classes("dataset").items()
            if issubclass(c, Dataset)
            and cast(type[Dataset], c).takes_images
            and not cast(type[Dataset], c).meta_test_only
            and not issubclass(c, MultiSource)
        ]
        if not isinstance(entries, ListConfig) or not entries:
            raise ConfigError(
                f"dataset.sources={entries!r} is not allowed: list the image datasets to draw from, e.g. "
                f"dataset.sources=[omniglot,image_folder], from {', '.join(known)}."
            )
        completed: dict[str, Any] = {}
        for entry in entries:
            raw = OmegaConf.to_container(entry) if isinstance(entry, DictConfig) else {"name": entry}
            settings: dict[str, Any] = {str(k): v for k, v in raw.items()} if isinstance(raw, dict) else {}
            name = settings.pop("name", None)
            if name not in known:
                raise ConfigError(
                    f"dataset.sources entry {entry!r} is not allowed: a source is an image dataset option "
                    f"({', '.join(known)}), or {{name: <option>, <key>: <value>}} with that option's keys."
                )
            if name in completed:
                raise ConfigError(
                    f"dataset.sources names {name} twice, which is not allowed: each source is one dataset."
                )
            config = option_config("dataset", name)
            config.update(settings)
            config.update({key: node.get(key) for key in SHARED})
            completed[name] = config
        source_weights(node.get("weights"), list(completed))  # before any source is built
        with open_dict(node):
            node.sources = completed

    def split(self, name: str) -> SourceMixture:
        """The "train", "val" or "test" split of every source, as one mixture."""
        if name not in SPLITS:
            raise ValueError(f"split {name!r} is not one of {SPLITS}")
        if name not in self._splits:
            members = [cast(TaskSource, source.split(name)) for source in self.sources.values()]
            self._splits[name] = SourceMixture(members, list(self.sources), self.weights)
        return self._splits[name]

    def class_count(self, name: str) -> int:
        """The classes of every source's split ``name`` together."""
        return sum(source.class_count(name) for source in self.sources.values())

    @staticmethod
    def prepare_image(image: Image.Image, size: int, channels: int) -> np.ndarray:
        """A user's image as the sources' images: resized to ``size``, ``channels`` channels."""
        return prepare_any_image(image, size, channels)


def source_weights(weights: Any, names: list[str]) -> list[float]:
    """``dataset.weights`` as probabilities, one per source (null: uniform); one sentence
    when they are not one number >= 0 per source, not all 0."""
    if weights is None:
        return [1.0 / len(names)] * len(names)
    given = OmegaConf.to_container(weights) if isinstance(weights, ListConfig) else weights
    if (
        not isinstance(given, list | tuple)
        or len(given) != len(names)
        or not all(isinstance(w, int | float) and not isinstance(w, bool) and w >= 0 for w in given)
        or sum(given) <= 0
    ):
        raise ConfigError(
            f"dataset.weights={given!r} is not allowed: it must be {len(names)} numbers >= 0, one per source "
            f"({', '.join(names)}), not all 0, or null for uniform."
        )
    total = float(sum(given))
    return [float(w) / total for w in given]
