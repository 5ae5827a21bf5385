"""The learned LSTM optimiser: the inner update is the output of a coordinate-wise LSTM."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from metarun.algorithms.base import MetaAlgorithm, MetaOutput
from metarun.algorithms.inner_loop import Params, adapted_meta_loss, adapted_predictions, forward, task_loss
from metarun.algorithms.tasks import in_transform, support_gradients
from metarun.checks import positive_int, positive_number, same_ways
from metarun.episodes import EpisodeBatch
from metarun.errors import ConfigError

VARIANTS = ("andrychowicz", "ravi")
PREPROCESS_P = 10.0  # Andrychowicz et al., appendix A: p = 10

# update(grad [P], loss [], theta [P], state) -> (new theta [P], new state); state is None
# at the first step of a task. P = number of coordinates of all adapted parameters.
UpdateFn = Callable[[Tensor, Tensor, Tensor, Any], tuple[Tensor, Any]]


def preprocess(x: Tensor, p: float = PREPROCESS_P) -> Tensor:
    """Andrychowicz et al.'s gradient preprocessing, coordinate-wise: ``[P] -> [P, 2]``.

    (log|x|/p, sign(x)) if |x| ≥ e^{−p}, else (−1, e^p·x): the scale and the sign of each
    coordinate separately, so inputs of very different magnitudes reach the LSTM in range.
    """
    big = x.abs() >= math.exp(-p)
    # the log of a clamped |x| keeps the unused branch finite (and its gradient zero, not NaN)
    log_part = torch.where(big, x.abs().clamp_min(math.exp(-p)).log() / p, -torch.ones_like(x))
    sign_part = torch.where(big, torch.sign(x), math.exp(p) * x)
    return torch.stack([log_part, sign_part], dim=-1)  # [P, 2]


def flatten(tensors: list[Tensor]) -> Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])  # [P]


def unflatten(flat: Tensor, like: Params) -> Params:
    """The flat vector ``[P]`` cut back into tensors shaped as ``like``."""
    out, start = {}, 0
    for name, p in like.items():
        out[name] = flat[start : start + p.numel()].view_as(p)  # [*p.shape]
        start += p.numel()
    return out


def lstm_adapt(
    model: nn.Module,
    params: Params,
    x: Tensor,
    y: Tensor,
    steps: int,
    update: UpdateFn,
    first_order: bool,
    keep_graph: bool = True,
) -> Params:
    """``steps`` learned updates on the support loss, from ``params``; pure.

    At each step the support loss L and gradient ∇ of all parameters (flattened to ``[P]``)
    go to ``update``, which returns the new flat parameters and its own per-task state (the
    LSTM's hidden states). ``first_order=True`` computes ∇ without a graph, so no second
    derivative flows through the optimiser's inputs (Andrychowicz et al. do not propagate
    through ∇); the update still depends on the optimiser's weights. ``keep_graph=False``
    (evaluation) detaches the parameters after every step. With an ``update`` returning
    θ − α∇ this is exactly `inner_loop.adapt`.
    """
    state = None
    for _ in range(steps):
        loss, grads = support_gradients(
            lambda p: task_loss(forward(model, p, x), y), params, create_graph=not first_order and keep_graph
        )
        grad = flatten([grads[name] for name in params])  # [P]
        with torch.set_grad_enabled(keep_graph):  # evaluation: no graph through the optimiser
            theta, state = update(grad, loss, flatten(list(params.values())), state)  # [P]
        params = unflatten(theta, params)
        if not keep_graph:
            params = {k: v.detach() for k, v in params.items()}
            state = None if state is None else _detach(state)
    return params


def lstm_cell(cell: nn.LSTMCell, x: Tensor, h: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
    """``cell(x, (h, c))``; inside vmap (which has no rule for PyTorch's fused LSTM cell) the
    same equations in plain operations: i, f, g, o = W_ih x + b_ih + W_hh h + b_hh,
    c′ = σ(f) c + σ(i) tanh(g), h′ = σ(o) tanh(c′)."""
    if not in_transform():
        return cell(x, (h, c))
    gates = x @ cell.weight_ih.T + cell.bias_ih + h @ cell.weight_hh.T + cell.bias_hh  # [P, 4H]
    i, f, g, o = gates.chunk(4, -1)  # [P, H] each
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c), c


def _detach(state: Any) -> Any:
    if isinstance(state, Tensor):
        return state.detach()
    return type(state)(_detach(s) for s in state)


class LSTMOptimizer(MetaAlgorithm):
    """A learned optimiser for the inner loop, meta-trained through the unrolled inner loop.

    ``variant="andrychowicz"`` (Andrychowicz et al., NeurIPS 2016, "Learning to learn by
    gradient descent by gradient descent"): a ``layers``-layer LSTM with ``hidden`` units
    and shared weights runs on every coordinate of every parameter independently (the
    coordinates are the LSTM's batch); its input is the coordinate's gradient (with the
    paper's log/sign preprocessing, p = 10, if ``preprocess``), a linear head reads the
    update out of the top layer, and θ ← θ + ``output_scale``·out. Hidden states start at
    zero for every task.

    ``variant="ravi"`` (Ravi & Larochelle, ICLR 2017, "Optimization as a Model for
    Few-Shot Learning", section 3): the meta-learner LSTM. A first, standard LSTM
    (``layers`` layers of ``hidden`` units; the paper: one layer of 20) reads each
    coordinate's preprocessed (L, ∇); its output h_t feeds the two gates of the second
    layer, whose cell state is the parameter vector itself::

        i_t = σ(W_I·[h_t, θ_{t−1}, i_{t−1}] + b_I)      (a learned step size per coordinate)
        f_t = σ(W_F·[h_t, θ_{t−1}, f_{t−1}] + b_F)      (a learned shrinkage per coordinate)
        θ_t = f_t ⊙ θ_{t−1} − i_t ⊙ ∇_t

    b_F starts at 5 (f ≈ 0.993) and b_I at logit(``output_scale``), gate weights at zero,
    i_0 = f_0 = 0: as in the paper, the untrained learner is gradient descent (lr
    ``output_scale``) with a slight weight decay. The paper's other half, its batch-norm
    handling at meta-test time (never the test batch's own statistics), is
    ``model.norm=support`` (or ``tasknorm``); see `metarun.models.norm`.

    In both the meta-parameters are the optimiser and the learner's initialisation θ; the
    meta-loss is the mean query loss after the unrolled inner loop, back-propagated
    through it (second order unless ``first_order``). Validation and test run the learned
    optimiser without keeping its graph.

    Args:
        model: backbone whose output is the task prediction (a head of ``ways`` outputs).
        inner_steps: learned updates during meta-training (the unroll length).
        test_inner_steps: learned updates at validation/test.
        hidden: LSTM units per layer (Andrychowicz et al. and Ravi & Larochelle: 20).
        layers: LSTM layers (Andrychowicz et al.: 2; for "ravi", layers before the
            parameter cell, the paper: 1).
        preprocess: the paper's log/sign input preprocessing; otherwise the raw gradient.
        output_scale: the update is the LSTM's output times this (Andrychowicz et al.: 0.1);
            for "ravi", the initial input gate (step size), in (0, 1).
        variant: "andrychowicz" or "ravi".
        first_order: do not back-propagate through the gradient inputs of the optimiser.
        seed: seeds the optimiser's initial weights (the global RNG is untouched).
    """

    def __init__(
        self,
        model: nn.Module,
        inner_steps: int,
        test_inner_steps: int,
        hidden: int = 20,
        layers: int = 2,
        preprocess: bool = True,
        output_scale: float = 0.1,
        variant: str = "andrychowicz",
        first_order: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__()
        for key, value in (
            ("algorithm.inner_steps", inner_steps),
            ("algorithm.test_inner_steps", test_inner_steps),
            ("algorithm.hidden", hidden),
            ("algorithm.layers", layers),
        ):
            positive_int(key, value)
        positive_number("algorithm.output_scale", output_scale)
        if variant not in VARIANTS:
            raise ConfigError(f"algorithm.variant={variant!r} is not allowed: choose one of {', '.join(VARIANTS)}.")
        if variant == "ravi" and not output_scale < 1:
            raise ConfigError(
                f"algorithm.output_scale={output_scale!r} is not allowed with "
                f"algorithm.variant=ravi: it is the initial input gate, in (0, 1)."
            )
        self.model = model
        self.inner_steps, self.test_inner_steps = inner_steps, test_inner_steps
        self.preprocess, self.output_scale = preprocess, output_scale
        self.variant, self.first_order = variant, first_order
        features = 2 if preprocess else 1
        dtype = next(model.parameters()).dtype
        with torch.random.fork_rng(devices=[]):  # seeded initialisation, global RNG untouched
            torch.manual_seed(seed)
            inputs = features if variant == "andrychowicz" else 2 * features  # ∇, or (L, ∇)
            self.cells = nn.ModuleList(nn.LSTMCell(inputs if i == 0 else hidden, hidden) for i in range(layers))
            if variant == "andrychowicz":
                self.out = nn.Linear(hidden, 1)
            else:  # gate inputs per coordinate: [h (hidden), θ, previous gate]
                self.input_gate = nn.Linear(hidden + 2, 1)
                self.forget_gate = nn.Linear(hidden + 2, 1)
        self.to(dtype)
        if variant == "ravi":
            with torch.no_grad():  # in the model's dtype, so σ(b_I) is 0.1 to its precision
                for gate in (self.input_gate, self.forget_gate):
                    gate.weight.zero_()
                self.input_gate.bias.fill_(math.log(output_scale / (1 - output_scale)))
                self.forget_gate.bias.fill_(5.0)

    def check_episode_shape(self, train_ways: int, ways: int) -> None:
        same_ways(train_ways, ways)

    def _inputs(self, x: Tensor) -> Tensor:
        return preprocess(x) if self.preprocess else x.unsqueeze(-1)  # [P, features]

    def _lstm(self, h: Tensor, state: Any) -> tuple[Tensor, Any]:
        """The coordinate-wise LSTM stack on inputs ``[P, in]``: top output ``[P, hidden]``."""
        if state is None:
            zeros = h.new_zeros(h.shape[0], self.cells[0].hidden_size)  # [P, hidden]
            state = tuple((zeros, zeros) for _ in self.cells)
        new_state = []
        for cell, (h_prev, c_prev) in zip(self.cells, state):
            h, c = lstm_cell(cell, h, h_prev, c_prev)  # [P, hidden] each
            new_state.append((h, c))
        return h, tuple(new_state)

    def update(self, grad: Tensor, loss: Tensor, theta: Tensor, state: Any) -> tuple[Tensor, Any]:
        """One learned step: flat gradient ``[P]``, loss, flat parameters ``[P]`` -> new ``[P]``.

        State: the LSTM stack's (h, c) per layer; for "ravi" also the previous gates
        (i, f), each ``[P]``.
        """
        if self.variant == "andrychowicz":
            h, lstm_state = self._lstm(self._inputs(grad), state)  # [P, hidden]
            return theta + self.out(h).squeeze(-1) * self.output_scale, lstm_state  # [P]
        lstm_state, i_prev, f_prev = (
            (None, theta.new_zeros(theta.shape), theta.new_zeros(theta.shape)) if state is None else state
        )
        h, lstm_state = self._lstm(
            torch.cat([self._inputs(loss.expand_as(grad)), self._inputs(grad)], dim=-1), lstm_state
        )
        shared = torch.cat([h, theta.unsqueeze(-1)], dim=-1)  # [P, hidden + 1]
        i = torch.sigmoid(self.input_gate(torch.cat([shared, i_prev.unsqueeze(-1)], -1))).squeeze(-1)
        f = torch.sigmoid(self.forget_gate(torch.cat([shared, f_prev.unsqueeze(-1)], -1))).squeeze(-1)
        return f * theta - i * grad, (lstm_state, i, f)  # [P] each

    def meta_loss(self, batch: EpisodeBatch) -> MetaOutput:
        return adapted_meta_loss(
            self,
            batch,
            lambda theta, sx, sy: lstm_adapt(
                self.model, theta, sx, sy, self.inner_steps, self.update, self.first_order
            ),
        )

    def predict(self, batch: EpisodeBatch) -> MetaOutput:
        return adapted_predictions(
            self,
            batch,
            lambda theta, sx, sy: lstm_adapt(
                self.model, theta, sx, sy, self.test_inner_steps, self.update, first_order=True, keep_graph=False
            ),
        )
