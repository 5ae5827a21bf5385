"""Checks of a user's settings, in one place: one sentence each, naming the key, the value and
what is allowed.

The primitives (`positive_number`, `positive_int`, `same_ways`, `inner_loop_settings`) are what
every constructor (learners, models, datasets, the sampler) validates its arguments with. The runner calls
`check_settings`, `check_run_settings` and `check_hardware` before it builds anything, and
`check_image_groups` once it knows the dataset.
"""

from __future__ import annotations

from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from metarun.errors import ConfigError


def positive_number(key: str, value: Any, allow_none: bool = False) -> None:
    """``value`` must be a number greater than zero (a learning rate, a scale), or null if allowed."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        allowed = "a positive number or null" if allow_none else "a positive number"
        raise ConfigError(f"{key}={value!r} is not allowed: it must be {allowed}.")


def number_in(key: str, value: Any, low: float, high: float | None = None) -> float:
    """``value`` must be a number in ``[low, high)`` (``high`` None: no upper bound), e.g. a
    label smoothing in [0, 1) or a ridge of at least 0; returned as a float."""
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or value < low
        or (high is not None and value >= high)
    ):
        allowed = f"a number in [{low:g}, {high:g})" if high is not None else f"a number >= {low:g}"
        raise ConfigError(f"{key}={value!r} is not allowed: it must be {allowed}.")
    return float(value)


def positive_int(key: str, value: Any, allow_none: bool = False, what: str = "a positive integer") -> int | None:
    """``value`` must be an integer of at least one (a step count, a width), or null if allowed."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        allowed = f"{what} or null" if allow_none else what
        raise ConfigError(f"{key}={value!r} is not allowed: it must be {allowed}.")
    return value


def inner_loop_settings(
    inner_lr: Any, inner_steps: Any, test_inner_steps: Any, lr_key: str = "algorithm.inner_lr"
) -> None:
    """An inner loop's step size must be a positive number and its step counts (training and
    evaluation) positive integers."""
    positive_number(lr_key, inner_lr)
    positive_int("algorithm.inner_steps", inner_steps)
    positive_int("algorithm.test_inner_steps", test_inner_steps)


def positive_ints(key: str, values: Any, count: int) -> tuple[int, ...]:
    """``values`` must be ``count`` positive integers (a backbone's stage widths)."""
    values = list(values)
    if len(values) != count or any(isinstance(v, bool) or not isinstance(v, int) or v <= 0 for v in values):
        raise ConfigError(f"{key}={values} is not allowed: it must be {count} positive integers.")
    return tuple(values)


def integer_at_least(key: str, value: Any, minimum: int) -> int:
    """``value`` must be an integer of at least ``minimum`` (an epoch count may be 0)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        what = "a positive integer" if minimum == 1 else f"an integer of at least {minimum}"
        raise ConfigError(f"{key}={value!r} is not allowed: it must be {what}.")
    return value


def same_ways(train_ways: int, ways: int) -> None:
    """A learner with a fixed classifier head tests on as many ways as it trained on."""
    if ways != train_ways:
        raise ConfigError(
            f"sampler.ways={ways} is not allowed with sampler.train_ways={train_ways} for "
            f"this algorithm: its classifier head has a fixed number of outputs, so ways "
            f"must equal train_ways."
        )


def check_settings(cfg: DictConfig) -> None:
    """The top-level settings every run reads, checked before anything is built."""
    seed = cfg.get("seed")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise ConfigError(f"seed={seed!r} is not allowed: it must be an integer from 0 to 2**63 - 1.")
    lr = OmegaConf.select(cfg, "optimizer.lr")
    if lr is not None:
        positive_number("optimizer.lr", lr)
    positive_number("grad_clip", cfg.get("grad_clip"), allow_none=True)
    direction = cfg.get("objective_direction", "maximize")
    if direction not in ("maximize", "minimize"):
        raise ConfigError(
            f"objective_direction={direction!r} is not allowed: choose maximize or "
            f"minimize (the direction a sweeper optimises the validation metric in)."
        )
    positive_int(
        "task_chunk", cfg.get("task_chunk"), allow_none=True, what="a positive integer (tasks per backward pass)"
    )


def check_run_settings(cfg: DictConfig) -> None:
    """The trainer's step limit and the checkpoint cadence (before anything is built)."""
    steps = OmegaConf.select(cfg, "trainer.max_steps")
    if isinstance(steps, bool) or not isinstance(steps, int) or not (steps > 0 or steps == -1):
        raise ConfigError(
            f"trainer.max_steps={steps!r} is not allowed: it must be a positive "
            f"integer (or -1 for no limit, with trainer.max_time set)."
        )
    every = OmegaConf.select(cfg, "checkpoint.every_n_steps")
    if every is not None and (isinstance(every, bool) or not isinstance(every, int) or every < 1):
        raise ConfigError(f"checkpoint.every_n_steps={every!r} is not allowed: it must be a positive integer or null.")
    positive_number("checkpoint.every_minutes", OmegaConf.select(cfg, "checkpoint.every_minutes"), allow_none=True)


def check_hardware(trainer_cfg: DictConfig) -> None:
    """Stop before building anything when the hardware profile cannot run on this machine.

    Lightning would otherwise fail deep inside the Trainer ("No supported gpu backend
    found!") or, with ``accelerator=cpu``, silently switch float16 to bfloat16.
    """
    precision = str(trainer_cfg.get("precision"))
    accelerator = str(trainer_cfg.get("accelerator"))
    cuda = torch.cuda.is_available()
    if precision in ("16-mixed", "16") and (accelerator == "cpu" or not cuda):
        where = (
            "trainer.accelerator=cpu"
            if accelerator == "cpu"
            else "this machine, where torch.cuda.is_available() is False"
        )
        raise ConfigError(
            f"trainer.precision={precision} (hardware=fp16) is not allowed on {where}: float16 "
            f"mixed precision needs a CUDA GPU, so use hardware=bf16 or hardware=cpu instead."
        )
    if accelerator in ("gpu", "cuda") and not (cuda or torch.backends.mps.is_available()):
        raise ConfigError(
            f"trainer.accelerator={accelerator} (hardware=gpu) is not allowed on this machine: no "
            f"GPU is visible (torch.cuda.is_available() is False), so use hardware=cpu or "
            f"hardware=bf16 instead."
        )


def check_image_groups(cfg: DictConfig, takes_images: bool) -> None:
    """The groups that only image datasets take (transform, test_dataset), checked before any data."""
    dataset = cfg.dataset._target_.rsplit(".", 1)[-1]
    for group, what in (("transform", "augments images"), ("test_dataset", "meta-tests on another image dataset")):
        if not takes_images and cfg.get(group):
            raise ConfigError(
                f"{group}={cfg[group]._target_.rsplit('.', 1)[-1]} is not allowed with dataset={dataset}: it "
                f"{what}, and {dataset} has no images, so drop the {group} override."
            )
