"""The one LightningModule: outer loop, evaluation and metrics for any `MetaAlgorithm`."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
from torch import Tensor

from metarun.algorithms.base import MetaAlgorithm, MetaOutput
from metarun.algorithms.feature_transform import MEAN_IMAGES
from metarun.algorithms.feature_transform import STREAM as FEATURES_STREAM
from metarun.episodes import Batch, EpisodeBatch
from metarun.errors import NonFiniteLoss
from metarun.stats import mean_ci95
from metarun.test_time import AUTO_EPISODES, TestTimeFinetune

OptimizerFactory = Callable[..., torch.optim.Optimizer]
SOURCE = "source:"  # the key prefix of each evaluated episode's source
SchedulerFactory = Callable[..., torch.optim.lr_scheduler.LRScheduler]


def per_task_metric(pred: Tensor, target: Tensor, metric: str) -> Tensor:
    """``metric`` of each task, "accuracy" or "mse": ``[B, M, ...]`` -> ``[B]``."""
    if metric == "mse":
        return (pred.float() - target).pow(2).flatten(1).mean(1)
    return (pred.argmax(-1) == target).float().mean(1)


class MetaLearningModule(L.LightningModule):
    """Runs the outer loop with manual optimisation: one meta-loss, one backward, one step.

    Validation and test adapt with gradients enabled (the trainer runs with
    ``inference_mode=False``) and report mean ± 1.96·std/√n over the fixed episodes.

    Args:
        algorithm: the meta-learner; owns every meta-parameter.
        optimizer: partial optimiser, completed with the meta-parameters.
        scheduler: partial LR schedule stepped once per outer step, or None.
        grad_clip: max global norm of the meta-gradient, or None.
        regression: report MSE instead of accuracy.
        task_chunk: tasks per backward pass within one outer step (None: the whole
            meta-batch of this process at once). The meta-batch is split into chunks, each
            chunk's meta-loss, weighted by its share of the tasks, is back-propagated on
            its own and the gradients accumulate, so peak memory is one chunk's graph; the
            optimiser steps once, with the meta-gradient of the whole meta-batch.
        lineage: where the backbone's starting weights came from (`metarun.init_from`),
            kept in every checkpoint (``metarun_lineage``), or None.
        test_time: fine-tuning at test time (`metarun.test_time`), applied by `test_step`
            only (validation picks the checkpoint without it).
    """

    def __init__(
        self,
        algorithm: MetaAlgorithm,
        optimizer: OptimizerFactory,
        scheduler: SchedulerFactory | None = None,
        grad_clip: float | None = None,
        regression: bool = False,
        task_chunk: int | None = None,
        lineage: dict[str, Any] | None = None,
        test_time: TestTimeFinetune | None = None,
    ) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.algorithm = algorithm
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.grad_clip = grad_clip
        self.task_chunk = task_chunk
        self.lineage = lineage
        self.test_time = test_time or TestTimeFinetune()
        self.metric = "mse" if regression else "accuracy"
        self.best: dict[str, float | int | None] = {"value": None, "step": None}
        self._episodes: dict[str, list[Tensor]] = {}
        self._step_started: float | None = None

    def configure_optimizers(self) -> Any:
        opt = self.optimizer_factory(params=self.algorithm.parameters())
        if self.scheduler_factory is None:
            return opt
        return {
            "optimizer": opt,
            "lr_scheduler": {"scheduler": self.scheduler_factory(optimizer=opt), "interval": "step"},
        }

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        started = time.perf_counter()
        opt = self.optimizers()
        opt.zero_grad()
        out = self.backward_meta_loss(batch)
        bad = not bool(torch.isfinite(out.loss))
        if self.trainer.world_size > 1:  # every process stops at the same step, none waits
            bad = self.trainer.strategy.reduce_boolean_decision(bad, all=False)
        if bad:  # before the update: the weights stay those of the last step
            raise NonFiniteLoss(self.global_step, out.loss.item())
        opt.step()  # clips in on_before_optimizer_step
        self.algorithm.end_outer_step()
        sched = self.lr_schedulers()
        if sched is not None:
            sched.step()
        tasks = len(batch) * self.trainer.world_size
        metric = out.task_metric.mean()
        extra = {f"train/{k}": v.detach().float().mean() for k, v in (out.extra or {}).items()}
        self.log_dict(
            {
                "train/loss": out.loss.detach(),
                f"train/{self.metric}": metric,
                "train/tasks_per_second": tasks / (time.perf_counter() - started),
            },
            on_step=True,
            prog_bar=True,
            batch_size=len(batch),
        )
        if extra:
            self.log_dict(extra, on_step=True, batch_size=len(batch))
        # Outer steps done; `train` reads it back under ddp_spawn, whose workers return
        # callback_metrics to the launching process but not trainer.global_step.
        self.log("train/steps", float(self.global_step), on_step=True, batch_size=len(batch))
        return out.loss.detach()

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Clip the meta-gradient to ``grad_clip`` (global norm) just before the update.

        Here, not in `training_step`: with ``hardware=fp16`` Lightning unscales the
        gradients inside ``opt.step()``, right before this hook, so clipping earlier would
        clip the loss-scaled gradients (and the update would shrink by the scale).
        """
        if self.grad_clip:
            self.clip_gradients(optimizer, gradient_clip_val=self.grad_clip, gradient_clip_algorithm="norm")

    def backward_meta_loss(self, batch: Batch) -> OuterOutput:
        """`backward_in_chunks` with Lightning's backward; under DDP only the last chunk's
        backward all-reduces (the others run under ``no_sync``)."""
        hold = getattr(self.trainer.strategy, "block_backward_sync", contextlib.nullcontext)
        return backward_in_chunks(self.algorithm, batch, self.task_chunk, self.manual_backward, hold, self.metric)

    # evaluation ---------------------------------------------------------------------------

    def _eval_step(self, stage: str, batch: Batch) -> None:
        for part in batch.uniform():  # a RaggedBatch: one task at a time
            self._eval_part(stage, part)

    def _eval_part(self, stage: str, batch: EpisodeBatch) -> None:
        out: MetaOutput = (
            self.test_time.predict(self.algorithm, batch) if stage == "test" else self.algorithm.predict(batch)
        )
        self._episodes.setdefault(f"{SOURCE}{stage}", []).append(
            torch.stack([batch.index.float(), batch.sources().float()], 1)
        )  # [B, 2]: each episode's source (dataset=multi)
        rows = [batch.index.float(), per_task_metric(out.query_logits, batch.query_y, self.metric)]
        if out.query_logits_before is not None:
            rows.append(per_task_metric(out.query_logits_before, batch.query_y, self.metric))
        self._episodes.setdefault(stage, []).append(torch.stack(rows, 1))  # [B, 2 or 3]
        for name, values in (out.extra or {}).items():  # further per-task metrics, [B] each
            self._episodes.setdefault(f"{stage}/{name}", []).append(
                torch.stack([batch.index.float(), values.detach().float()], 1)
            )  # [B, 2]

    def _gather(self, key: str) -> Tensor:
        """Rows ``[index, values...]`` stored under ``key`` on every rank, each episode once."""
        local = torch.cat(self._episodes.pop(key, [torch.zeros(0, 2, device=self.device)]))
        rows = self.all_gather(local)  # [W, E, R] or [E, R]
        rows = rows.reshape(-1, rows.shape[-1]).cpu()
        _, keep = _unique_first(rows[:, 0])  # DistributedSampler pads with repeats
        return rows[keep]

    def _eval_end(self, stage: str) -> dict[str, float]:
        rows = self._gather(stage)
        mean, ci = mean_ci95(rows[:, 1].tolist())
        metrics = {
            f"{stage}/{self.metric}": mean,
            f"{stage}/{self.metric}_ci95": ci,
            f"{stage}/episodes": float(len(rows)),
        }
        if rows.shape[1] > 2:
            before, before_ci = mean_ci95(rows[:, 2].tolist())
            metrics |= {
                f"{stage}/{self.metric}_before_adaptation": before,
                f"{stage}/{self.metric}_before_adaptation_ci95": before_ci,
            }
        for key in sorted(k for k in self._episodes if k.startswith(f"{stage}/")):
            extra, extra_ci = mean_ci95(self._gather(key)[:, 1].tolist())
            metrics |= {key: extra, f"{key}_ci95": extra_ci}
        sources = self._gather(f"{SOURCE}{stage}")[:, 1].long()  # [E], in the order of rows
        for s, name in enumerate(self.source_names(stage)):
            values = rows[sources == s, 1].tolist()
            mean_s, ci_s = mean_ci95(values) if values else (float("nan"), float("nan"))
            metrics |= {
                f"{stage}/source/{name}/{self.metric}": mean_s,
                f"{stage}/source/{name}/{self.metric}_ci95": ci_s,
                f"{stage}/source/{name}/episodes": float(len(values)),
            }
        self.log_dict(metrics, sync_dist=True)  # identical on every rank: all were gathered
        return metrics

    def source_names(self, stage: str) -> list[str]:
        """The sources of the ``stage`` split when the dataset has several (dataset=multi),
        else none: the per-source metrics are logged for those only."""
        datamodule = self.trainer.datamodule if self._trainer is not None else None
        return [] if datamodule is None else datamodule.source_names(stage)

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        self._eval_step("val", batch)

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            for key in [k for k in self._episodes if k in ("val", f"{SOURCE}val") or k.startswith("val/")]:
                self._episodes.pop(key)
            return
        value = self._eval_end("val")[f"val/{self.metric}"]
        better = self.best["value"] is None or (
            value < self.best["value"] if self.metric == "mse" else value > self.best["value"]
        )
        if better:
            self.best = {"value": value, "step": self.global_step}
        self.log(f"val/best_{self.metric}", self.best["value"])
        self.log("val/best_step", float(self.best["step"]))

    def fit_evaluation_features(self) -> None:
        """SimpleShot's cl2n: the mean feature of a fixed draw of training images, measured
        with the weights about to be evaluated (the same on every rank)."""
        transform = self.algorithm.evaluation_features()
        if transform is None or not transform.needs_mean:
            return
        images = self.trainer.datamodule.training_images(MEAN_IMAGES, FEATURES_STREAM)
        training = self.algorithm.training
        self.algorithm.eval()
        with self.trainer.precision_plugin.forward_context():
            transform.fit(self.algorithm.model, images.to(self.device))
        self.algorithm.train(training)

    def on_validation_start(self) -> None:
        self.fit_evaluation_features()

    def on_test_start(self) -> None:
        """The evaluation features' statistics, then (``test_time.lr=auto``) the rate,
        chosen on the first validation episodes (the same on every rank) before the first
        test task."""
        self.fit_evaluation_features()
        if self.test_time.needs_lr:
            episodes = self.trainer.datamodule.validation_batch(AUTO_EPISODES)
            episodes = self.transfer_batch_to_device(episodes, self.device, 0)
            with self.trainer.precision_plugin.forward_context():
                self.test_time.choose_lr(self.algorithm, episodes)

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        self._eval_step("test", batch)

    def on_test_epoch_end(self) -> None:
        self._eval_end("test")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["metarun_best"] = dict(self.best)
        if self.lineage:
            checkpoint["metarun_lineage"] = self.lineage

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.best = dict(checkpoint.get("metarun_best", self.best))
        self._apply_changed_optimizer_settings(checkpoint)

    def _apply_changed_optimizer_settings(self, checkpoint: dict[str, Any]) -> None:
        """A resumed run uses the optimiser settings it was started with (e.g. a lower
        ``optimizer.lr`` after a divergence), not those saved in the optimiser's state; an
        unchanged setting keeps the saved value (a scheduled learning rate included)."""
        stored = (checkpoint.get("metarun_config") or {}).get("optimizer") or {}
        requested = getattr(self.optimizer_factory, "keywords", {})
        changed = {k: v for k, v in requested.items() if k in stored and stored[k] != v}
        for state in checkpoint.get("optimizer_states", []):
            for group in state.get("param_groups", []):
                group.update({k: v for k, v in changed.items() if k in group})
                if "lr" in changed and "initial_lr" in group:
                    group["initial_lr"] = changed["lr"]
        if "lr" in changed:
            for schedule in checkpoint.get("lr_schedulers", []):
                if "base_lrs" in schedule:
                    schedule["base_lrs"] = [changed["lr"]] * len(schedule["base_lrs"])


@dataclass
class OuterOutput:
    """What one outer step's backward passes give: the meta-batch's ``loss`` (detached), each
    task's ``task_metric [B]`` (accuracy or MSE on its queries) and the learner's ``extra``
    per-task metrics (name -> ``[B]``)."""

    loss: Tensor
    task_metric: Tensor
    extra: dict[str, Tensor] | None = None


def backward_in_chunks(
    algorithm: MetaAlgorithm,
    batch: Batch,
    chunk: int | None,
    backward: Callable[[Tensor], Any],
    hold_sync: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    metric: str = "accuracy",
) -> OuterOutput:
    """Back-propagate the meta-batch's meta-loss, ``chunk`` tasks at a time (None: all).

    Each chunk's loss is weighted by its share of the tasks (every learner's meta-loss is
    a mean over its tasks), so the gradients accumulated over the chunks are the whole
    meta-batch's; peak memory is one chunk's graph. A `RaggedBatch` (tasks of different
    shapes) runs one task per chunk, whatever ``chunk`` says. ``hold_sync`` wraps every
    backward but the last (DDP's ``no_sync``). Returns the whole meta-batch's loss, each
    task's ``metric`` and the extras, as one `meta_loss` call would.
    """
    size = len(batch)
    if isinstance(batch, EpisodeBatch):
        step = min(chunk or size, size)
        starts = range(0, size, step)
        parts = [batch if step == size else batch.tasks(start, min(start + step, size)) for start in starts]
    else:
        parts = batch.uniform()
    outputs, losses, metrics, done = [], [], [], 0
    for part in parts:
        done += len(part)
        out = algorithm.meta_loss(part)
        loss = out.loss * (len(part) / size)
        with hold_sync() if done < size else contextlib.nullcontext():
            backward(loss)
        outputs.append(out)
        losses.append(loss.detach())
        metrics.append(per_task_metric(out.query_logits.detach(), part.query_y, metric))
    extra = {k: torch.cat([o.extra[k] for o in outputs]) for k in (outputs[0].extra or {})}
    return OuterOutput(torch.stack(losses).sum(), torch.cat(metrics), extra or None)


def _unique_first(ids: Tensor) -> tuple[Tensor, Tensor]:
    """Unique ids and the position of each one's first occurrence."""
    order = torch.argsort(ids, stable=True)
    sorted_ids = ids[order]
    first = torch.ones_like(sorted_ids, dtype=torch.bool)
    first[1:] = sorted_ids[1:] != sorted_ids[:-1]
    return sorted_ids[first], order[first]


__all__ = ["MetaLearningModule", "OuterOutput", "backward_in_chunks", "per_task_metric"]
