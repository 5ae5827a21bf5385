"""The short meta-training loop and the accuracy measure of the learning tests."""

from __future__ import annotations

import torch

from metarun.algorithms.base import MetaAlgorithm
from metarun.datasets.sinusoid import Sinusoid
from metarun.episodes import TEST, EpisodeBatch, EpisodeSampler, TaskSource, collate_episodes


def meta_train(algorithm: MetaAlgorithm, sampler: EpisodeSampler, source: TaskSource,
               steps: int, lr: float) -> None:
    """``steps`` Adam outer steps on the sampler's seeded training meta-batches."""
    opt = torch.optim.Adam(algorithm.parameters(), lr=lr)
    algorithm.train()
    for step in range(steps):
        loss = algorithm.meta_loss(sampler.train_batch(source, step)).loss
        opt.zero_grad()
        loss.backward()
        opt.step()


def episode_accuracy(algorithm: MetaAlgorithm, sampler: EpisodeSampler, source: TaskSource,
                     episodes: int = 100, chunk: int = 20) -> float:
    """Mean query accuracy on the first ``episodes`` fixed test episodes."""
    algorithm.eval()
    correct = []
    for start in range(0, episodes, chunk):
        batch = collate_episodes([sampler.eval_episode(source, TEST, i)
                                  for i in range(start, min(start + chunk, episodes))])
        logits = algorithm.predict(batch).query_logits  # [E, N*Q, N]
        correct.append((logits.argmax(-1) == batch.query_y).float().flatten())
    algorithm.train()
    return torch.cat(correct).mean().item()


def tiny_batch(tasks: int = 2, shots: int = 3, queries: int = 4) -> EpisodeBatch:
    """A float64 sinusoid meta-batch for gradient checks."""
    sampler = EpisodeSampler(1, shots, queries, tasks)
    batch = sampler.train_batch(Sinusoid(), step=0)
    for name in ("support_x", "support_y", "query_x", "query_y"):
        setattr(batch, name, getattr(batch, name).double())
    return batch
