"""CAVIA: fast context adaptation via meta-learning."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from metarun.algorithms.base import MetaAlgorithm, MetaOutput
from metarun.algorithms.inner_loop import Params, TaskAdapter, adapt, adapted_meta_loss, adapted_predictions
from metarun.checks import inner_loop_settings, positive_int, same_ways
from metarun.episodes import EpisodeBatch
from metarun.errors import ConfigError

MODULATIONS = ("film", "shift")


def auto_context_layer(model: nn.Module) -> str:
    """Zintgraf et al.'s layers: after the third convolution's normalisation in a
    convolutional backbone (their images), else the first linear layer (their sinusoids,
    where the context is an input of the first layer)."""
    layers = [(name, m) for name, m in model.named_modules() if not list(m.children())]
    convs = [i for i, (_, m) in enumerate(layers) if isinstance(m, nn.Conv2d)]
    if len(convs) >= 3:
        i = convs[2]
        after = layers[i + 1] if i + 1 < len(layers) else None
        normalised = after is not None and isinstance(getattr(after[1], "num_features", None), int)
        return after[0] if normalised else layers[i][0]
    linear = [name for name, m in layers if isinstance(m, nn.Linear)]
    if not linear:
        raise ConfigError(
            "algorithm.context_layer=auto is not allowed for this model: it has neither three "
            "convolutions nor a linear layer, so name the layer (e.g. algorithm.context_layer=features.9)."
        )
    return linear[0]


def output_channels(model: nn.Module, name: str) -> int:
    """The number of channels (dimension 1) of the output of ``model``'s layer ``name``."""
    layers = dict(model.named_modules())
    if name not in layers or name == "":
        names = [n for n, m in layers.items() if n and not list(m.children())]
        shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
        raise ConfigError(
            f"algorithm.context_layer={name!r} is not allowed: it must name a layer of the backbone ({shown})."
        )
    layer = layers[name]
    for attribute in ("out_channels", "out_features", "num_features"):
        value = getattr(layer, attribute, None)
        if isinstance(value, int):
            return value
    raise ConfigError(
        f"algorithm.context_layer={name!r} is not allowed: the context modulates channels, so it must name a "
        f"convolution, a linear layer or a normalisation layer, not a {type(layer).__name__}."
    )


class CAVIA(MetaAlgorithm):
    """CAVIA (Zintgraf, Shiarlis, Kurin, Hofmann & Whiteson, ICML 2019, "Fast context
    adaptation via meta-learning").

    The parameters are split in two: context parameters φ, reset to 0 for every task and
    the only ones adapted in the inner loop (``inner_steps`` steps of lr ``inner_lr`` on the
    support loss), and the shared weights θ (backbone and the context's linear map),
    updated by the outer loop alone through the query loss at φ′ (second order unless
    ``first_order``).

    φ enters the backbone at the output ``h`` of one layer (``context_layer``), per channel:
    ``modulation="film"`` gives ``h·(1 + γ) + β`` with ``(γ, β) = Wφ + b`` (FiLM, as the
    authors condition the third convolution of their image network; ``1 + γ`` is their γ
    written so that b = 0 is the identity), ``"shift"`` gives ``h + Wφ``, which at an
    MLP's first layer is their sinusoid network's context concatenated to the input.

    Args:
        model: backbone whose output is the task prediction (a head of ``ways`` outputs, or
            the regression output).
        context_size: the number of context parameters (the authors: 5 on sinusoids, 100 on
            images).
        context_layer: the backbone layer whose output φ modulates, or "auto": after the
            third convolution's normalisation (Conv4: ``features.9``), else the first linear
            layer (the MLP: ``net.0``).
        modulation: "film" or "shift".
        inner_lr: the inner-loop step size on φ.
        inner_steps, test_inner_steps: inner steps in training and at validation/test.
        first_order: drop the second derivatives (dφ′/dθ = 0).
    """

    lr_keys = ("inner_lr",)

    def __init__(
        self,
        model: nn.Module,
        context_size: int,
        context_layer: str,
        modulation: str,
        inner_lr: float,
        inner_steps: int,
        test_inner_steps: int,
        first_order: bool = False,
    ) -> None:
        super().__init__()
        positive_int("algorithm.context_size", context_size)
        inner_loop_settings(inner_lr, inner_steps, test_inner_steps)
        if modulation not in MODULATIONS:
            raise ConfigError(
                f"algorithm.modulation={modulation!r} is not allowed: choose one of {', '.join(MODULATIONS)}."
            )
        self.model = model
        self.context_layer = auto_context_layer(model) if context_layer == "auto" else context_layer
        channels = output_channels(model, self.context_layer)
        self.modulation = modulation
        self.film = nn.Linear(context_size, channels * (2 if modulation == "film" else 1))
        nn.init.zeros_(self.film.bias)  # at φ = 0 the backbone is unmodulated
        # φ at the start of every task; `adapt` replaces it through functional_call
        self.register_buffer("context", torch.zeros(context_size), persistent=False)
        self.uses_context = bool(getattr(model, "uses_context", False))  # TaskNorm: see query_forward
        self.inner_lr, self.inner_steps, self.test_inner_steps = inner_lr, inner_steps, test_inner_steps
        self.first_order = first_order

    def check_episode_shape(self, train_ways: int, ways: int) -> None:
        same_ways(train_ways, ways)

    def modulate(self, h: Tensor) -> Tensor:
        """``h [M, C, ...]`` modulated per channel by the current context."""
        m = self.film(self.context.to(self.film.weight.dtype)).to(h.dtype)  # [C] or [2C]
        shape = (-1,) + (1,) * (h.dim() - 2)  # broadcast over the positions of a feature map
        if self.modulation == "shift":
            return h + m.view(shape)
        gamma, beta = m.chunk(2)
        return h * (1 + gamma.view(shape)) + beta.view(shape)

    def forward(self, x: Tensor, context_size: int | None = None) -> Tensor:
        """The backbone on ``x`` with the context layer's output modulated by ``self.context``
        (which `functional_call` replaces by a task's φ)."""
        layer = self.model.get_submodule(self.context_layer)
        handle = layer.register_forward_hook(lambda module, inputs, h: self.modulate(h))
        try:
            return self.model(x) if context_size is None else self.model(x, context_size)
        finally:
            handle.remove()

    def context_adapter(self, steps: int, first_order: bool) -> TaskAdapter:
        """θ, a task's support set -> θ with φ′: ``steps`` steps on the support loss from
        φ = 0, the shared weights θ fixed."""

        def adapter(shared: Params, sx: Tensor, sy: Tensor) -> Params:
            start = {"context": self.context.to(next(iter(shared.values())).dtype)}
            phi = adapt(self, start, sx, sy, steps, self.inner_lr, first_order, fixed=shared)
            return {**shared, **phi}

        return adapter

    def meta_loss(self, batch: EpisodeBatch) -> MetaOutput:
        return adapted_meta_loss(self, batch, self.context_adapter(self.inner_steps, self.first_order), network=self)

    def predict(self, batch: EpisodeBatch) -> MetaOutput:
        return adapted_predictions(
            self, batch, self.context_adapter(self.test_inner_steps, first_order=True), network=self
        )
