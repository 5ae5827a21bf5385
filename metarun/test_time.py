"""Fine-tuning at test time: each test task's own copy of the learner, trained on its support set.

P>M>F's last step (Hu, Li, Stühmer, Kim & Hospedales, CVPR 2022, "Pushing the Limits of Simple
Pipelines for Few-Shot Learning"): before a task's queries are labelled, a copy of the whole
learner (backbone, head, learned rates) takes ``finetune_steps`` SGD steps (momentum 0.9) on
the learner's own loss over pseudo-episodes made from that task's support set: the support
images as pseudo-support and again as pseudo-queries, each independently flipped and shifted
when ``augment``. The copy then predicts the task and is dropped: the learner itself, and any
checkpoint, never change. Every draw comes from a generator seeded by (seed, episode index),
so the result does not depend on batching, processes or what ran before.

``lr: auto`` picks the rate as P>M>F does (the rate is the setting their results are most
sensitive to; "3-5 episodes with labelled query set" tell it): each rate of `AUTO_RATES`
(0: no fine-tuning) fine-tunes on the first `AUTO_EPISODES` validation episodes, and the one
with the best query accuracy labels the test tasks (a tie goes to the smaller rate).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from metarun.algorithms.base import MetaAlgorithm, MetaOutput
from metarun.algorithms.tasks import map_tasks
from metarun.checks import integer_at_least
from metarun.episodes import Batch, EpisodeBatch, task_generator
from metarun.errors import ConfigError

STREAM = 3  # the generators' stream: after training (0), validation (1) and test (2)
SHIFT = 4  # pixels an augmented pseudo-episode image may move
AUTO_RATES = (0.0, 0.0001, 0.001, 0.01)  # test_time.lr=auto's candidates (P>M>F's grid)
AUTO_EPISODES = 5  # the validation episodes that choose among them


def augment_images(x: Tensor, generator: torch.Generator) -> Tensor:
    """Each image of ``x [M, C, H, W]`` flipped horizontally with probability ½ and shifted by
    up to `SHIFT` pixels (reflection padding, then a crop): geometry only, so it suits
    normalised images."""
    m, _, h, w = x.shape
    flip = torch.rand(m, generator=generator) < 0.5
    x = torch.where(flip.view(m, 1, 1, 1).to(x.device), x.flip(-1), x)
    padded = F.pad(x, (SHIFT, SHIFT, SHIFT, SHIFT), mode="reflect")
    offsets = torch.randint(0, 2 * SHIFT + 1, (m, 2), generator=generator).tolist()
    return torch.stack([padded[i, :, dy : dy + h, dx : dx + w] for i, (dy, dx) in enumerate(offsets)])


class TestTimeFinetune:
    """The top-level ``test_time`` settings, applied to every test task (test, `metarun-eval`,
    `metarun-predict` and `metarun.load`); validation is never fine-tuned.

    Args:
        finetune_steps: SGD steps per task (0: off).
        lr: their learning rate, or ``"auto"``: picked on validation episodes (`choose_lr`)
            before the first test task.
        augment: flip and shift the pseudo-episodes' images.
        seed: seeds every task's draws, with its episode index.
    """

    __test__ = False  # not a pytest class

    def __init__(self, finetune_steps: int = 0, lr: float | str = 0.001, augment: bool = False, seed: int = 0) -> None:
        self.finetune_steps = integer_at_least("test_time.finetune_steps", finetune_steps, 0)
        if lr != "auto" and (isinstance(lr, (bool, str)) or not isinstance(lr, (int, float)) or not lr > 0):
            raise ConfigError(f"test_time.lr={lr!r} is not allowed: it must be a positive number or auto.")
        if not isinstance(augment, bool):
            raise ConfigError(f"test_time.augment={augment!r} is not allowed: it must be true or false.")
        self.lr: float | None = None if lr == "auto" else float(lr)  # None: not chosen yet
        self.augment, self.seed = augment, seed
        self.search: dict[str, Any] | None = None  # what test_time.lr=auto measured

    @property
    def enabled(self) -> bool:
        return self.finetune_steps > 0

    @property
    def needs_lr(self) -> bool:
        """``lr: auto`` and the rate not chosen yet: call `choose_lr` before `predict`."""
        return self.enabled and self.lr is None

    def settings(self) -> dict[str, Any] | None:
        """What results.json records (None when off): with ``lr: auto``, the rate chosen and
        each candidate's validation accuracy."""
        if not self.enabled:
            return None
        settings = {"finetune_steps": self.finetune_steps, "lr": "auto" if self.lr is None else self.lr}
        settings["augment"] = self.augment
        if self.search is not None:
            settings["lr_search"] = self.search
        return settings

    def choose_lr(self, algorithm: MetaAlgorithm, episodes: Batch) -> float:
        """Set ``lr`` to the rate of `AUTO_RATES` whose fine-tuned copies label ``episodes``
        (labelled validation episodes, never test ones) best, by their mean accuracy per
        episode; a tie goes to the smaller rate."""
        parts = episodes.uniform()  # a RaggedBatch: one task at a time
        for part in parts:
            self.check_task(algorithm, part)
        accuracy = {}
        for rate in AUTO_RATES:
            scores = []
            for part in parts:
                logits = self.predict_at(algorithm, part, rate).query_logits
                scores.append((logits.argmax(-1) == part.query_y).float().mean(1))  # [B]
            accuracy[rate] = torch.cat(scores).mean().item()
        self.lr = max(AUTO_RATES, key=lambda rate: (accuracy[rate], -rate))
        self.search = {"episodes": len(episodes), "accuracy": {str(r): a for r, a in accuracy.items()}}
        return self.lr

    def check(self, algorithm: MetaAlgorithm) -> None:
        """One sentence for a learner whose loss cannot fine-tune on a test episode."""
        if self.enabled and not algorithm.episodic:
            raise ConfigError(
                f"test_time.finetune_steps={self.finetune_steps} is not allowed with algorithm="
                f"{type(algorithm).__name__}: it trains on whole classes, whose loss does not apply to a test "
                f"episode's new classes, so fine-tune a learner meta-trained on episodes (e.g. meta_baseline "
                f"with model.init_from=<this run>) or set test_time.finetune_steps=0."
            )

    def check_task(self, algorithm: MetaAlgorithm, batch: EpisodeBatch) -> None:
        """`check`, and one sentence for regression tasks."""
        self.check(algorithm)
        if batch.support_y.is_floating_point():
            raise ConfigError(
                f"test_time.finetune_steps={self.finetune_steps} is not allowed on regression tasks: "
                f"fine-tuning at test time is for classification, so set test_time.finetune_steps=0."
            )

    def predict(self, algorithm: MetaAlgorithm, batch: EpisodeBatch) -> MetaOutput:
        """``algorithm.predict(batch)``, each task by its own fine-tuned copy when enabled."""
        if not self.enabled:
            return algorithm.predict(batch)
        if self.lr is None:
            raise RuntimeError("test_time.lr=auto: choose_lr must pick the rate before the first test task")
        self.check_task(algorithm, batch)
        return self.predict_at(algorithm, batch, self.lr)

    def predict_at(self, algorithm: MetaAlgorithm, batch: EpisodeBatch, lr: float) -> MetaOutput:
        """Each task of ``batch`` labelled by its copy fine-tuned at rate ``lr`` (0: by
        ``algorithm`` itself)."""
        if lr == 0:
            return algorithm.predict(batch)

        def one_task(support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor, index: Tensor) -> Any:
            task = EpisodeBatch(support_x[None], support_y[None], query_x[None], query_y[None], None, index[None])
            out = self.finetuned(algorithm, task, lr).predict(task)
            return out.query_logits[0], out.loss

        logits, losses = map_tasks(
            one_task, batch.support_x, batch.support_y, batch.query_x, batch.query_y, batch.index
        )
        return MetaOutput(losses.mean(), logits)

    def finetuned(self, algorithm: MetaAlgorithm, task: EpisodeBatch, lr: float) -> MetaAlgorithm:
        """A copy of ``algorithm`` after `finetune_steps` steps at rate ``lr`` on pseudo-episodes
        of ``task``'s support set, in evaluation mode (``algorithm`` is not touched)."""
        learner = copy.deepcopy(algorithm).train()
        generator = task_generator(self.seed, STREAM, 0, int(task.index[0]))
        params = [p for p in learner.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(params, lr=lr, momentum=0.9)
        with torch.enable_grad():
            for _ in range(self.finetune_steps):
                loss = learner.meta_loss(self.pseudo_episode(task, generator)).loss
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        return learner.eval()

    def pseudo_episode(self, task: EpisodeBatch, generator: torch.Generator) -> EpisodeBatch:
        """The support set as pseudo-support and pseudo-queries (each augmented on its own)."""
        x, y = task.support_x[0], task.support_y[0]  # [N*K, C, H, W], [N*K]
        support = augment_images(x, generator) if self.augment else x
        query = augment_images(x, generator) if self.augment else x
        return EpisodeBatch(support[None], y[None], query[None], y[None], None, task.index)
