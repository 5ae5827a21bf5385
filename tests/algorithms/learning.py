"""Shared by the algorithm tests: the short meta-training loop, the accuracy measure and
the sinusoid check of the learning tests, and the meta-gradient / finite-difference pair."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from hydra.utils import instantiate

from metarun.algorithms.base import MetaAlgorithm
from metarun.build import build
from metarun.datasets.sinusoid import Sinusoid
from metarun.episodes import TEST, EpisodeBatch, EpisodeSampler, TaskSource, collate_episodes


def meta_train(algorithm: MetaAlgorithm, sampler: EpisodeSampler, source: TaskSource, steps: int, lr: float) -> None:
    """``steps`` Adam outer steps on the sampler's seeded training meta-batches (plain
    mini-batches for a whole-class learner)."""
    opt = torch.optim.Adam(algorithm.parameters(), lr=lr)
    algorithm.train()
    for step in range(steps):
        loss = algorithm.meta_loss(sampler.train_batch(source, step, plain=not algorithm.episodic)).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        algorithm.end_outer_step()


def episode_accuracy(
    algorithm: MetaAlgorithm, sampler: EpisodeSampler, source: TaskSource, episodes: int = 100, chunk: int = 20
) -> float:
    """Mean query accuracy on the first ``episodes`` fixed test episodes."""
    algorithm.eval()
    correct = []
    for start in range(0, episodes, chunk):
        batch = collate_episodes(
            [sampler.eval_episode(source, TEST, i) for i in range(start, min(start + chunk, episodes))]
        )
        logits = algorithm.predict(batch).query_logits  # [E, N*Q, N]
        correct.append((logits.argmax(-1) == batch.query_y).float().flatten())
    algorithm.train()
    return torch.cat(correct).mean().item()


def assert_learns(
    algorithm: MetaAlgorithm,
    sampler: EpisodeSampler,
    test: TaskSource,
    fit: Callable[[], None],
    at_least: float,
    gain: float,
    episodes: int = 100,
) -> tuple[float, float]:
    """Test accuracy of the untrained learner, then ``fit()``, then of the trained one, on
    the same fixed test episodes: trained ≥ ``at_least`` and ≥ untrained + ``gain`` (an
    untrained learner adapted at test time can already be far above chance)."""
    before = episode_accuracy(algorithm, sampler, test, episodes)
    fit()
    after = episode_accuracy(algorithm, sampler, test, episodes)
    print(f"test accuracy before training {before:.3f}, after {after:.3f}")  # shown with -s
    assert after >= at_least and after >= before + gain, (before, after)
    return before, after


def tiny_batch(tasks: int = 2, shots: int = 3, queries: int = 4) -> EpisodeBatch:
    """A float64 sinusoid meta-batch for gradient checks."""
    sampler = EpisodeSampler(1, shots, queries, tasks)
    batch = sampler.train_batch(Sinusoid(), step=0)
    for name in ("support_x", "support_y", "query_x", "query_y"):
        setattr(batch, name, getattr(batch, name).double())
    return batch


def meta_gradient(
    algorithm: MetaAlgorithm, batch: EpisodeBatch, params: Iterable[torch.Tensor] | None = None
) -> torch.Tensor:
    """Autograd's gradient of the meta-loss w.r.t. ``params`` (default: all), flattened."""
    params = list(algorithm.parameters() if params is None else params)
    algorithm.zero_grad()
    algorithm.meta_loss(batch).loss.backward()
    return torch.cat([p.grad.flatten() for p in params])


def meta_loss_value(algorithm: MetaAlgorithm, batch: EpisodeBatch) -> Callable[[], float]:
    return lambda: algorithm.meta_loss(batch).loss.item()


def finite_difference(loss: Callable[[], float], params: Iterable[torch.Tensor], eps: float = 1e-6) -> torch.Tensor:
    """Central differences (loss(θ + ε) − loss(θ − ε)) / 2ε, coordinate by coordinate."""
    out = []
    for p in params:
        flat = p.data.view(-1)
        for i in range(flat.numel()):
            old = flat[i].item()
            flat[i] = old + eps
            up = loss()
            flat[i] = old - eps
            down = loss()
            flat[i] = old
            out.append((up - down) / (2 * eps))
    return torch.tensor(out, dtype=torch.float64)


def check_learns_sinusoids(cfg, steps: int, lr: float = 3e-3) -> None:
    """A neural process trained ``steps`` Adam steps on sinusoids: its test MSE on 100 fixed
    tasks falls below 0.3 × the targets' variance and 0.3 × its untrained MSE, and its
    mean predictive log-likelihood rises by more than 2 nats."""
    objects = build(cfg)
    alg, sampler, splits = objects["algorithm"], objects["sampler"], objects["datamodule"].splits
    test = collate_episodes([sampler.eval_episode(splits["test"], TEST, i) for i in range(100)])
    before = alg.predict(test)
    opt = instantiate(cfg.optimizer, lr=lr)(params=alg.parameters())
    for step in range(steps):
        opt.zero_grad()
        alg.meta_loss(sampler.train_batch(splits["train"], step)).loss.backward()
        opt.step()
        alg.end_outer_step()
    after = alg.predict(test)
    mse = (after.query_logits - test.query_y).pow(2).mean().item()
    assert mse < 0.3 * test.query_y.var().item()
    assert mse < 0.3 * (before.query_logits - test.query_y).pow(2).mean().item()
    assert after.extra["log_likelihood"].mean() > before.extra["log_likelihood"].mean() + 2


def check_learns_on_first_classes(cfg, classes: int, steps: int, lr: float, at_least: float, gain: float) -> None:
    """A whole-class learner (``algorithm.num_train_classes=classes``) trained ``steps`` steps on
    the first ``classes`` training classes of the config's dataset (all of Omniglot's 4112
    are too many for so short a run), then `assert_learns` on its fixed test episodes."""
    from metarun.datasets.base import ClassImages

    objects = build(cfg)
    alg, sampler = objects["algorithm"], objects["sampler"]
    splits = objects["datamodule"].splits
    train = splits["train"]
    keep = train.labels < classes
    first = ClassImages(train.images[keep], train.labels[keep], f"{train.name}[:{classes}]")
    fit = lambda: meta_train(alg, sampler, first, steps=steps, lr=lr)  # noqa: E731
    assert_learns(alg, sampler, splits["test"], fit, at_least=at_least, gain=gain)


def check_learns_episodes(cfg, steps: int, lr: float, at_least: float, gain: float) -> None:
    """A learner meta-trained ``steps`` Adam steps on the config's training episodes, then
    `assert_learns` on its fixed test episodes."""
    objects = build(cfg)
    alg, sampler, splits = objects["algorithm"], objects["sampler"], objects["datamodule"].splits
    fit = lambda: meta_train(alg, sampler, splits["train"], steps=steps, lr=lr)  # noqa: E731
    assert_learns(alg, sampler, splits["test"], fit, at_least=at_least, gain=gain)


def check_episodic_head_learns_omniglot(make_config, algorithm: str) -> None:
    """An embedding learner ``algorithm`` (a head on Conv4 features, no inner loop) trained 60
    Adam steps of 8 tasks, 5-way 1-shot, from scratch (Conv4, 32 channels), against its
    untrained self on the same 100 fixed test episodes."""
    cfg = make_config(
        "dataset=omniglot",
        f"algorithm={algorithm}",
        "model.hidden=32",
        "sampler.queries=5",
        "sampler.train_queries=2",
        "sampler.meta_batch_size=8",
    )
    check_learns_episodes(cfg, steps=60, lr=2e-3, at_least=0.6, gain=0.1)
