"""A fully connected network for regression tasks."""

from __future__ import annotations

from torch import Tensor, nn


class MLP(nn.Module):
    """Linear layers with ReLU between them (Finn et al. 2017: 1-40-40-1 for sinusoids).

    Args:
        in_features: input dimension.
        hidden: widths of the hidden layers.
        out_features: output dimension, or None to end at the last hidden layer.
    """

    def __init__(self, in_features: int = 1, hidden: tuple[int, ...] = (40, 40), out_features: int | None = 1) -> None:
        super().__init__()
        widths = [in_features, *hidden]
        layers: list[nn.Module] = []
        for a, b in zip(widths[:-1], widths[1:]):
            layers += [nn.Linear(a, b), nn.ReLU()]
        if out_features is not None:
            layers.append(nn.Linear(widths[-1], out_features))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)
