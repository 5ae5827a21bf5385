"""Sinusoid regression tasks (Finn et al. 2017, "Model-Agnostic Meta-Learning", §5.1)."""

from __future__ import annotations

import math

import torch

from metarun.datasets.base import Dataset
from metarun.episodes import Episode
from metarun.errors import ConfigError


class Sinusoid(Dataset):
    """The family y = A·sin(x − φ), A ~ U[amp], φ ~ U[phase], x ~ U[x_range].

    Tasks are generated on the fly from the sampler's generator, so every split is the
    same infinite distribution; validation and test use their own fixed seeded lists.
    ``task_params [2]`` holds (amplitude, phase) for plotting the true curve.

    Args:
        amplitude_min, amplitude_max: amplitude range (paper: 0.1, 5.0).
        phase_min, phase_max: phase range (paper: 0, π).
        x_min, x_max: input range (paper: −5, 5).
    """

    kind = "regression"
    takes_images = False
    has_curve = True
    num_classes = 0  # as a split: a task is one function

    def __init__(
        self,
        amplitude_min: float = 0.1,
        amplitude_max: float = 5.0,
        phase_min: float = 0.0,
        phase_max: float = math.pi,
        x_min: float = -5.0,
        x_max: float = 5.0,
    ) -> None:
        for key, lo, hi in (
            ("amplitude", amplitude_min, amplitude_max),
            ("phase", phase_min, phase_max),
            ("x", x_min, x_max),
        ):
            if not lo < hi:
                raise ConfigError(
                    f"dataset.{key}_min={lo} is not allowed: it must be smaller than dataset.{key}_max={hi}."
                )
        self.amplitude = (amplitude_min, amplitude_max)
        self.phase = (phase_min, phase_max)
        self.x_range = (x_min, x_max)

    def split(self, name: str) -> Sinusoid:
        return self

    def check_episode(self, ways: int, shots: int, queries: int, prefix: str) -> None:
        if ways != 1:
            raise ConfigError(
                f"{prefix}ways={ways} is not allowed for sinusoid regression: "
                f"a task is one function, so ways must be 1."
            )

    def curve(self, params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """True y for ``params [2]`` (amplitude, phase) at ``x [M, 1]``."""
        return params[0] * torch.sin(x - params[1])

    def episode(self, generator: torch.Generator, ways: int, shots: int, queries: int) -> Episode:
        u = torch.rand(2, generator=generator)
        amp = self.amplitude[0] + (self.amplitude[1] - self.amplitude[0]) * u[0]
        phase = self.phase[0] + (self.phase[1] - self.phase[0]) * u[1]
        x = self.x_range[0] + (self.x_range[1] - self.x_range[0]) * torch.rand(
            shots + queries, 1, generator=generator
        )  # [K+Q, 1]
        params = torch.stack([amp, phase])  # [2]
        y = self.curve(params, x)  # [K+Q, 1]
        return Episode(x[:shots], y[:shots], x[shots:], y[shots:], params)
