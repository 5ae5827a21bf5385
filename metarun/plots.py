"""Plots of regression tasks before and after adaptation."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from metarun.algorithms.base import MetaAlgorithm  # noqa: E402
from metarun.episodes import EvalEpisodes, collate_episodes  # noqa: E402


def plot_regression_tasks(
    algorithm: MetaAlgorithm, episodes: EvalEpisodes, path: Path, tasks: int = 4, points: int = 200
) -> Path:
    """True curve, support points and the prediction before and after adaptation."""
    source = episodes.source
    lo, hi = source.x_range
    grid = torch.linspace(lo, hi, points)[:, None]  # [M, 1]
    fig, axes = plt.subplots(1, tasks, figsize=(4 * tasks, 3.2), sharey=True)
    for ax, i in zip(axes, range(tasks)):
        ep = episodes[i]
        ep.query_x, ep.query_y = grid, source.curve(ep.task_params, grid)
        batch = collate_episodes([ep])
        device = next(algorithm.parameters()).device
        batch = type(batch)(**{k: (v.to(device) if torch.is_tensor(v) else v) for k, v in vars(batch).items()})
        out = algorithm.predict(batch)
        ax.plot(grid, ep.query_y, "k-", label="true")
        if out.query_logits_before is not None:
            ax.plot(grid, out.query_logits_before[0].float().cpu(), "C1--", label="before adaptation")
        ax.plot(grid, out.query_logits[0].float().cpu(), "C0-", label="after adaptation")
        ax.plot(ep.support_x, ep.support_y, "C3^", label="support")
        ax.set_title(f"test task {i}")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _show(ax, image: torch.Tensor) -> None:
    """A ``[C, H, W]`` image in [0, 1] on ``ax``, without axes."""
    if image.shape[0] == 1:
        ax.imshow(image[0].cpu(), cmap="gray", vmin=0, vmax=1)
    else:
        ax.imshow(image.permute(1, 2, 0).clamp(0, 1).cpu())
    ax.set_xticks([])
    ax.set_yticks([])


def plot_predictions(
    support: dict,
    queries: list,
    labels: list,
    probabilities: torch.Tensor,
    truth: list | None,
    path: Path,
    max_queries: int = 24,
    max_shots: int = 5,
) -> Path:
    """The support images by class (one row each, up to ``max_shots``), then the first
    ``max_queries`` queries, each titled with its predicted class and probability (green
    when it matches the true class of a labelled query, red when not)."""
    classes = list(support)
    shown = min(len(queries), max_queries)
    columns = max(max_shots, 6)
    query_rows = -(-shown // columns)
    fig, axes = plt.subplots(
        len(classes) + query_rows, columns, figsize=(1.6 * columns, 1.7 * (len(classes) + query_rows)), squeeze=False
    )
    for ax in axes.flat:
        ax.axis("off")
    for row, name in enumerate(classes):
        for col, (_, image) in enumerate(support[name][:columns]):
            ax = axes[row, col]
            ax.axis("on")
            _show(ax, image)
            if col == 0:
                ax.set_ylabel(f"support: {name}"[:24], fontsize=8)
    for i in range(shown):
        ax = axes[len(classes) + i // columns, i % columns]
        ax.axis("on")
        _show(ax, queries[i][1])
        p = float(probabilities[i].max())
        colour = "black" if truth is None else ("green" if labels[i] == truth[i] else "red")
        ax.set_title(f"{labels[i]} ({p:.2f})"[:22], fontsize=8, color=colour)
    fig.suptitle(f"{len(queries)} queries ({shown} shown): predicted class (probability)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_points(support_x, support_y, query_x, mean, std, path: Path) -> Path:
    """Regression: support points, the predicted mean at the queries and ± 2 std when the
    learner gives one (the first input and output dimension)."""
    order = query_x[:, 0].argsort()
    x, m = query_x[order, 0], mean[order, 0]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    if std is not None:
        s = std[order, 0]
        ax.fill_between(x, m - 2 * s, m + 2 * s, color="C0", alpha=0.2, label="± 2 std")
    ax.plot(x, m, "C0-", label="prediction")
    ax.plot(support_x[:, 0], support_y[:, 0], "C3^", label="support")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_learning_curves(train: list, val: list, metric: str, path: Path) -> Path:
    """Training loss and the validation metric against outer steps (``[(step, value)]``)."""
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    for ax, points, title in ((axes[0], train, "training loss"), (axes[1], val, f"validation {metric}")):
        if points:
            steps, values = zip(*points)
            ax.plot(steps, values, "C0.-" if len(points) < 30 else "C0-")
        else:
            ax.text(0.5, 0.5, "no values logged", ha="center", va="center", transform=ax.transAxes)
        ax.set_xlabel("outer step")
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_test_episode(algorithm, episode, path: Path, max_queries: int = 24) -> Path:
    """One test episode of a classifier: its support images by class, then the first few
    queries of every class (``max_queries`` in all) titled with the predicted class and
    probability (green when right, red when wrong)."""
    batch = collate_episodes([episode])
    device = next(algorithm.parameters()).device
    batch = type(batch)(**{k: (v.to(device) if torch.is_tensor(v) else v) for k, v in vars(batch).items()})
    was_training = algorithm.training
    algorithm.eval()
    with torch.no_grad():
        logits = algorithm.predict(batch).query_logits
    algorithm.train(was_training)
    probabilities = algorithm.query_probabilities(logits)[0].cpu()  # [M, N]
    support: dict = {}
    for image, label in zip(episode.support_x, episode.support_y.tolist()):
        support.setdefault(f"class {label}", []).append((None, image.float()))
    support = dict(sorted(support.items()))
    ways = len(support)
    per_class = max(1, max_queries // ways)
    shown = [
        i
        for c in range(ways)  # the first few queries of every class
        for i in (episode.query_y == c).nonzero().flatten().tolist()[:per_class]
    ]
    queries = [(None, episode.query_x[i].float()) for i in shown]
    labels = [f"class {i}" for i in probabilities[shown].argmax(-1).tolist()]
    truth = [f"class {episode.query_y[i]}" for i in shown]
    return plot_predictions(support, queries, labels, probabilities[shown], truth, path, max_queries)
