"""The optional linear classifier every backbone ends with."""

from __future__ import annotations

from torch import nn

from metarun.errors import ConfigError


def classifier_head(embedding_dim: int, out_features: int | None) -> nn.Linear | None:
    """``Linear(embedding_dim, out_features)``, or None for an embedding network
    (``model.out_features=null``); one sentence for any other value."""
    if out_features is None:
        return None
    if isinstance(out_features, bool) or not isinstance(out_features, int) or out_features <= 0:
        raise ConfigError(
            f"model.out_features={out_features} is not allowed: it must be "
            f"a positive number of classes or null for an embedding."
        )
    return nn.Linear(embedding_dim, out_features)
