"""Validation shared by the algorithms' constructors: one sentence per mistake."""

from __future__ import annotations

from metarun.errors import ConfigError


def check_positive(key: str, value: float) -> None:
    """``value`` must be a number greater than zero (a learning rate, a scale)."""
    if isinstance(value, bool) or not value > 0:
        raise ConfigError(f"{key}={value!r} is not allowed: it must be positive.")


def check_positive_int(key: str, value: int) -> None:
    """``value`` must be an integer of at least one (a step count, a width)."""
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"{key}={value!r} is not allowed: it must be a positive integer.")


def check_same_ways(train_ways: int, ways: int) -> None:
    """A learner with a fixed classifier head tests on as many ways as it trained on."""
    if ways != train_ways:
        raise ConfigError(
            f"sampler.ways={ways} is not allowed with sampler.train_ways={train_ways} for "
            f"this algorithm: its classifier head has a fixed number of outputs, so ways "
            f"must equal train_ways."
        )
