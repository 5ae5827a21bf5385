"""Building a run's objects from its composed config: learner first, data second.

Everything that needs no data (sampler, model, algorithm, optimiser, transform) is built
and checked first (`build_learner`), so a bad setting is reported before a dataset is
decoded; `build_data` adds the dataset and its episode loaders.
"""

from __future__ import annotations

import inspect
import re
from typing import Any, cast

import torch
from hydra.errors import InstantiationException
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from metarun.algorithms.base import MetaAlgorithm
from metarun.catalog import CONFIG_DIR  # noqa: F401  (the commands read it here)
from metarun.checks import check_image_groups, check_settings
from metarun.cli import config_error
from metarun.datasets.base import Dataset
from metarun.episodes import EpisodeSampler
from metarun.errors import ConfigError
from metarun.init_from import init_backbone
from metarun.test_time import TestTimeFinetune


def instantiate_checked(node: Any, **kwargs: Any) -> Any:
    """`instantiate`, re-raising a constructor's `ConfigError` as itself, not Hydra's wrapper;
    a key the class does not take (a setting of another backbone or learner, e.g. a preset's
    ``model.pool`` after ``model=conv4``) is one sentence naming it and what the class takes."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as err:
        found = config_error(err)
        if found is not None:
            raise found from None
        unknown = re.search(r"unexpected keyword argument '(\w+)'", str(err.__cause__ or err))
        if unknown is None or not OmegaConf.is_dict(node):
            raise
        group, cls = node._key() or "the config", get_class(node._target_)
        takes = [k for k in inspect.signature(cls).parameters if k not in ("self", *kwargs)]
        raise ConfigError(
            f"{group}.{unknown.group(1)}={node.get(unknown.group(1))} is not allowed with "
            f"{group}={cls.__name__}: it takes no {unknown.group(1)} (it takes {', '.join(takes)}), so "
            f"drop that setting or choose a {group} that has it."
        ) from None


def build(cfg: DictConfig, initialise: bool = True) -> dict[str, Any]:
    """Instantiate every configured object; stops early (`ConfigError`) on an impossible setting.

    Everything that needs no data (sampler, model, algorithm, optimiser) is built and
    checked first (`build_learner`), so a bad setting is reported before a dataset is decoded.
    """
    return build_data(cfg, build_learner(cfg, initialise))


def named_class(node: DictConfig, key: str, base: type) -> type:
    """The class a group's ``_target_`` names, which must subclass ``base`` (nothing is built)."""
    cls = get_class(node._target_)
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise ConfigError(
            f"{key}._target_={node._target_} is not allowed: it is not a subclass of "
            f"{base.__module__}.{base.__name__}, so name one."
        )
    return cls


def dataset_class(node: DictConfig) -> type[Dataset]:
    """The `Dataset` class a dataset group names."""
    return cast("type[Dataset]", named_class(node, "dataset", Dataset))


def learner_class(node: DictConfig) -> type[MetaAlgorithm]:
    """The `MetaAlgorithm` class an algorithm group names."""
    return cast("type[MetaAlgorithm]", named_class(node, "algorithm", MetaAlgorithm))


def complete_config(cfg: DictConfig, learner: type[MetaAlgorithm]) -> None:
    """Fill the settings that follow from other groups, in ``cfg`` itself (so results.json and
    the checkpoint record what ran): ``model.out_features=auto`` becomes the learner's head
    (``sampler.train_ways`` outputs, or none for an embedding learner); a cross-domain
    ``test_dataset`` takes the training dataset's image size, channels and normalisation;
    ``algorithm.num_train_classes=auto`` (a whole-class head) becomes the number of classes
    of the dataset's training split (which builds the dataset: the one setting read from data)."""
    dataset_class(cfg.dataset).complete(cfg.dataset)  # e.g. dataset=multi's sources
    with open_dict(cfg):
        if OmegaConf.select(cfg, "algorithm.num_train_classes") == "auto":
            cfg.algorithm.num_train_classes = instantiate_checked(cfg.dataset).class_count("train")
        if OmegaConf.select(cfg, "model.out_features") == "auto":
            ways = OmegaConf.select(cfg, "sampler.train_ways", default=OmegaConf.select(cfg, "sampler.max_ways"))
            cfg.model.out_features = ways if learner.needs_head else None
        if cfg.get("test_dataset"):
            for key in TEST_DATASET_FROM_DATASET:
                if key in cfg.dataset:
                    cfg.test_dataset[key] = cfg.dataset[key]


# What a cross-domain test set takes from the training dataset: the model meta-tests on the
# images it was trained on.
TEST_DATASET_FROM_DATASET = ("image_size", "channels", "mean", "std")


def build_model(node: DictConfig) -> Any:
    """The backbone a model group describes; ``init_from`` is not the constructor's but
    `build_learner`'s (`metarun.init_from`)."""
    if "init_from" not in node:
        return instantiate_checked(node)
    init_from = node.init_from
    with open_dict(node):
        del node["init_from"]
    try:
        return instantiate_checked(node)
    finally:
        with open_dict(node):
            node.init_from = init_from


def build_learner(cfg: DictConfig, initialise: bool = True) -> dict[str, Any]:
    """The sampler, the algorithm and its module: every setting that needs no data, checked.

    ``model.init_from`` copies another run's backbone into the model unless ``initialise``
    is False (a checkpoint's own weights are about to replace them: `metarun-eval`, `predict`).
    The returned ``lineage`` says where the weights came from (None: a fresh initialisation)."""
    check_settings(cfg)
    data, learner = dataset_class(cfg.dataset), learner_class(cfg.algorithm)
    if data.kind not in learner.tasks:  # before anything is built: the groups do not fit
        raise ConfigError(
            f"algorithm={learner.__name__} is not allowed with dataset={data.__name__}: it solves "
            f"{' and '.join(learner.tasks)} tasks only, so choose a {learner.tasks[0]} "
            f"dataset or another algorithm."
        )
    if data.meta_test_only:
        raise ConfigError(
            f"dataset={data.__name__} is not allowed as the training dataset: it is a meta-test set only, so "
            f"train on another dataset and meta-test on it with test_dataset."
        )
    episodes = cast("type[EpisodeSampler]", named_class(cfg.sampler, "sampler", EpisodeSampler))
    if data.kind not in episodes.kinds:
        raise ConfigError(
            f"sampler={episodes.__name__} is not allowed with dataset={data.__name__}: it draws "
            f"{' and '.join(episodes.kinds)} episodes only, so use sampler=episodic or another dataset."
        )
    check_image_groups(cfg, data.takes_images)
    complete_config(cfg, learner)
    sampler = instantiate_checked(cfg.sampler)
    init_from = cfg.model.get("init_from") if initialise else None
    with torch.random.fork_rng(devices=[]):  # seeded initialisation, global RNG untouched
        torch.manual_seed(cfg.seed)
        model = build_model(cfg.model)
        lineage = init_backbone(model, str(init_from)) if init_from else None
        if cfg.get("channels_last"):  # a hardware choice: any backbone, 4-D weights only
            model.to(memory_format=torch.channels_last)
        algorithm = instantiate_checked(cfg.algorithm, model=model)  # and its own parameters
    sampler.check_learner(algorithm)
    algorithm.set_task_batching(cfg.get("task_batching", "auto"))
    optimizer = instantiate(cfg.optimizer)
    try:  # the optimiser's own checks (e.g. Adam's betas), on a throwaway instance
        optimizer(params=algorithm.parameters())
    except (ValueError, TypeError) as error:
        raise ConfigError(
            f"optimizer={cfg.optimizer._target_} is not allowed with these "
            f"settings: {error}, so change the optimizer.* values."
        ) from None
    regression = data.kind == "regression"
    test_time = TestTimeFinetune(**(cfg.get("test_time") or {}), seed=cfg.seed)
    test_time.check(algorithm)
    augment = instantiate_checked(cfg.transform) if cfg.get("transform") else None  # checked before any data
    from metarun.module import MetaLearningModule  # Lightning: imported once the settings are known to be good

    module = MetaLearningModule(
        algorithm,
        lineage=lineage,
        test_time=test_time,
        optimizer=optimizer,
        scheduler=instantiate(cfg.scheduler) if cfg.scheduler else None,
        grad_clip=cfg.grad_clip,
        regression=regression,
        task_chunk=cfg.get("task_chunk"),
    )
    return {
        "sampler": sampler,
        "algorithm": algorithm,
        "module": module,
        "regression": regression,
        "augment": augment,
        "lineage": lineage,
    }


def build_data(cfg: DictConfig, learner: dict[str, Any]) -> dict[str, Any]:
    """``learner`` plus the dataset and its episode loaders (the episode shapes checked)."""
    dataset = instantiate_checked(cfg.dataset)
    test_dataset = build_test_dataset(cfg.test_dataset) if cfg.get("test_dataset") else None
    plain = not learner["algorithm"].episodic  # a whole-class learner trains on plain mini-batches
    from metarun.datamodule import EpisodicDataModule  # Lightning

    datamodule = EpisodicDataModule(dataset, learner["sampler"], learner["augment"], test_dataset, plain)
    datamodule.prepare()
    return {**learner, "dataset": dataset, "datamodule": datamodule}


def build_test_dataset(node: DictConfig) -> Any:
    """The cross-domain dataset with its test split loaded; its errors name ``test_dataset.*``
    (the dataset classes speak of ``dataset.*``, the group they usually sit in)."""
    try:
        dataset = instantiate_checked(node)
        dataset.split("test")
    except ConfigError as error:
        raise ConfigError(re.sub(r"\bdataset\.", "test_dataset.", str(error))) from None
    return dataset
