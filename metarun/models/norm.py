"""The normalisation choice for backbones used by episodic learners."""

from __future__ import annotations

from torch import nn

from metarun.errors import ConfigError

NORMS = ("transductive", "running", "none")


def batch_norm(channels: int, norm: str) -> nn.Module:
    """Batch norm in one of three modes (the `model.norm` key).

    - ``transductive``: always the current batch's statistics, no running buffers; at test
      time the statistics come from the task's own support or query batch (Finn et al. 2017).
    - ``running``: standard batch norm; running averages accumulated in training are used
      in evaluation (Snell et al. 2017).
    - ``none``: identity.
    """
    if norm == "transductive":
        return nn.BatchNorm2d(channels, track_running_stats=False)
    if norm == "running":
        return nn.BatchNorm2d(channels)
    if norm == "none":
        return nn.Identity()
    raise ConfigError(f"model.norm={norm!r} is not allowed: choose one of {', '.join(NORMS)}.")
