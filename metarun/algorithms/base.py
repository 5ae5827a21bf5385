"""The contract between the Lightning module and every algorithm."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metarun.algorithms.tasks import check_task_batching, map_tasks, modules_vmap_refusal
from metarun.episodes import EpisodeBatch
from metarun.errors import ConfigError

if TYPE_CHECKING:
    from metarun.algorithms.feature_transform import FeatureTransform


def embedding_network(
    model: nn.Module, learner: str, why: str = "the embedding network has no classifier head"
) -> nn.Module:
    """``model``, refused with one sentence if it ends in a classifier head (an embedding
    learner's backbone: ``model.out_features`` must be null, as ``auto`` makes it)."""
    if getattr(model, "head", None) is not None:
        raise ConfigError(f"model.out_features is not allowed to be set for {learner}: {why}, so it must be null.")
    return model


def embedding_dim(model: nn.Module, learner: str) -> int:
    """The backbone's ``embedding_dim``; one sentence for a backbone without one."""
    dim = getattr(model, "embedding_dim", None)
    if not isinstance(dim, int):
        raise ConfigError(
            f"model is not allowed for {learner}: it must expose an integer embedding_dim (e.g. model=conv4)."
        )
    return dim


def class_means(support: Tensor, support_y: Tensor, ways: int) -> Tensor:
    """The mean embedding of each class: ``support [B, n, D]``, ``support_y [B, n]`` -> ``[B, N, D]``."""
    onehot = F.one_hot(support_y, ways).to(support.dtype)  # [B, n, N]
    return onehot.transpose(1, 2) @ support / onehot.sum(1)[..., None]  # [B, N, D]


def solved_in_float32(head: Callable[..., Tensor], z: Tensor, *args: Any) -> Tensor:
    """``head(z, *args)`` with autocast off and ``z`` in at least float32: a per-task solve
    (R2-D2's ridge system, MetaOptNet's SVM) is not done in bf16/fp16 even under mixed precision."""
    with torch.autocast(device_type=z.device.type, enabled=False):
        return head(z.to(torch.promote_types(z.dtype, torch.float32)), *args)


@dataclass
class MetaOutput:
    """What an algorithm returns for a meta-batch.

    ``loss``: scalar, differentiable w.r.t. the meta-parameters (training) or detached.
    ``query_logits [B, N*Q, N]`` (regression: predictions ``[B, Q, D_out]``).
    ``query_logits_before``: the same before task adaptation, when the learner adapts.
    ``extra``: further per-task metrics, name -> ``[B]`` (e.g. a Neural Process's predictive
    log-likelihood); the module logs each as ``{stage}/{name}``, mean ± 95% CI at evaluation.
    ``query_std [B, Q, D_out]``: the predictive standard deviation, from regression learners
    that model one (CNP, NP), else None.
    """

    loss: Tensor
    query_logits: Tensor
    query_logits_before: Tensor | None = None
    extra: dict[str, Tensor] | None = None
    query_std: Tensor | None = None


class MetaAlgorithm(nn.Module):
    """Owns the meta-parameters; the module never knows which algorithm it runs.

    A learner states what the runner, the predict command and the divergence message need
    to know about it as class attributes (`tasks`, `needs_head`, `lr_keys`, `episodic`) and methods
    (`vmap_refusal`, `check_episode_shape`): nothing outside the learner names it.

    How the tasks of a meta-batch run is a hardware choice, the top-level ``task_batching``,
    given to `set_task_batching` by the runner: "loop" (one after another), "vmap" (one
    batched computation through `torch.func.vmap`; refused with one sentence where the
    learner cannot, see `vmap_refusal`), or "auto" (vmap on CUDA where possible, the loop
    elsewhere: on a CPU the loop measured as fast or faster).
    """

    #: the kinds of task the learner can solve: "classification", "regression" or both
    tasks: tuple[str, ...] = ("classification", "regression")
    #: whether the backbone ends in a ``sampler.train_ways``-way classifier head
    #: (``model.out_features=auto`` builds one for True, none for an embedding learner)
    needs_head: bool = True
    #: the ``algorithm.*`` learning-rate keys a divergence message suggests lowering
    lr_keys: tuple[str, ...] = ()
    #: False for a learner trained on whole classes: each training task is then a plain
    #: mini-batch of ``sampler.batch_size`` images (empty support set; ``query_y``: split class
    #: ids), while validation and test are episodes as for every learner
    episodic: bool = True

    def __init__(self) -> None:
        super().__init__()
        self.task_batching = "loop"

    def set_task_batching(self, task_batching: str) -> None:
        """Run the tasks as ``task_batching`` says; `ConfigError` for a value this learner refuses."""
        check_task_batching(task_batching)
        self.task_batching = task_batching
        self.check_task_batching()

    # the tasks of a meta-batch ---------------------------------------------------------------

    def vmap_refusal(self) -> str | None:
        """Why the tasks cannot run under `torch.func.vmap` (a clause), or None if they can."""
        return modules_vmap_refusal(self)

    def check_task_batching(self) -> None:
        """Raise `ConfigError` if ``task_batching=vmap`` was asked of a learner that refuses it."""
        why = self.vmap_refusal() if self.task_batching == "vmap" else None
        if why:
            raise ConfigError(f"task_batching=vmap is not allowed for {type(self).__name__}: {why}.")

    def uses_vmap(self, device: torch.device) -> bool:
        """Whether `map_tasks` vmaps on ``device`` under this learner's ``task_batching``."""
        if self.task_batching == "vmap":
            self.check_task_batching()
            return True
        return self.task_batching == "auto" and device.type == "cuda" and self.vmap_refusal() is None

    def map_tasks(self, fn: Any, *tensors: Tensor) -> Any:
        """`tasks.map_tasks` with this learner's loop-or-vmap choice for the tensors' device."""
        return map_tasks(fn, *tensors, vmap=self.uses_vmap(tensors[0].device))

    def embed_episodes(self, batch: EpisodeBatch) -> Tensor:
        """``model`` on every episode's support then query images: ``[B, NK+NQ, ...]``.

        One forward call per episode, so with batch norm in training mode each episode is
        its own batch: episodes never share statistics, and the result does not depend on
        how many episodes are batched together or how a meta-batch is split over DDP
        processes.

        When the learner is not training, its `evaluation_features` transform (SimpleShot's)
        follows.
        """
        images = torch.cat([batch.support_x, batch.query_x], 1)  # [B, NK+NQ, C, H, W]
        z = self.map_tasks(self.model, images)  # [B, NK+NQ, D]
        transform = None if self.training else self.evaluation_features()
        return z if transform is None else transform(z)

    def evaluation_features(self) -> FeatureTransform | None:
        """The transform of the features of the tasks this learner labels
        (``algorithm.feature_transform``), or None for a learner without the option."""
        return None

    def end_outer_step(self) -> None:
        """Advance state kept per outer step (a step counter); called once per optimiser
        step by the module, however many chunks the meta-batch was split into."""

    # meta-learning ---------------------------------------------------------------------------

    def meta_loss(self, batch: EpisodeBatch) -> MetaOutput:
        """Outer loss of the meta-batch, differentiable w.r.t. the meta-parameters."""
        raise NotImplementedError

    def predict(self, batch: EpisodeBatch) -> MetaOutput:
        """Adapt to each support set and score its query set (evaluation)."""
        raise NotImplementedError

    def check_episode_shape(self, train_ways: int, ways: int) -> None:
        """Raise `ConfigError` if the algorithm cannot test on ``ways`` after ``train_ways``."""

    def check_variable_episodes(self, min_ways: int, max_ways: int) -> None:
        """Raise `ConfigError` if the algorithm cannot learn from ``sampler=variable``'s
        episodes: class-imbalanced supports of ``min_ways`` to ``max_ways`` ways. A learner
        with a classifier head needs a fixed number of ways."""
        if self.needs_head and min_ways != max_ways:
            raise ConfigError(
                f"algorithm={type(self).__name__} is not allowed with sampler=variable's episodes of "
                f"{min_ways} to {max_ways} ways: its classifier head has a fixed number of outputs, so set "
                f"sampler.min_ways equal to sampler.max_ways, or choose a learner without a head "
                f"(e.g. protonet)."
            )

    def query_probabilities(self, query_logits: Tensor) -> Tensor:
        """Class probabilities ``[B, M, N]`` from `predict`'s ``query_logits`` (a softmax;
        log-probabilities, as Matching Networks give, come back unchanged)."""
        return query_logits.float().softmax(-1)
