"""The pictures a run and metarun-predict write: regression tasks before and after adaptation,
classification episodes and predictions, learning curves. Images are drawn with the
dataset's normalisation undone (`displayable`)."""

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


# A dataset's per-channel normalisation, (mean, std), each ``[C, 1, 1]``; None: pixels in [0, 1].
Normalization = tuple[torch.Tensor, torch.Tensor] | None


def displayable(image: torch.Tensor, normalization: Normalization = None) -> torch.Tensor:
    """A ``[C, H, W]`` image as the eye should see it: the dataset's normalisation undone,
    then clipped to [0, 1]. Every picture draws its images through this function."""
    x = image.detach().float().cpu()
    if normalization is not None:
        mean, std = normalization
        x = x * std.float().cpu() + mean.float().cpu()
    return x.clamp(0, 1)


def _show(ax, image: torch.Tensor, normalization: Normalization = None) -> None:
    """A ``[C, H, W]`` image on ``ax``, without axes."""
    x = displayable(image, normalization)
    if x.shape[0] == 1:
        ax.imshow(x[0], cmap="gray", vmin=0, vmax=1)
    else:
        ax.imshow(x.permute(1, 2, 0).numpy())
    ax.set_xticks([])
    ax.set_yticks([])


def query_title(label: str, probability: float, true: str | None) -> tuple[str, str]:
    """A query's title and colour: the prediction and its probability; green when right, red
    with the true class under it when wrong, black when the class is not known."""
    title = f"{label}"[:14] + f" ({probability:.2f})"
    if true is None:
        return title, "black"
    if label == true:
        return title, "green"
    return f"{title}\ntrue: {str(true)[:14]}", "red"


def plot_predictions(
    support: dict,
    queries: list,
    labels: list,
    probabilities: torch.Tensor,
    truth: list | None,
    path: Path,
    max_queries: int = 24,
    max_shots: int = 5,
    normalization: Normalization = None,
) -> Path:
    """The support images, then the first ``max_queries`` queries, each titled with its
    predicted class and probability; when the query's class is known, a right prediction is
    green and a wrong one red with the true class under it.

    The layout stays compact from 5 to 50 ways: with several shots and up to 10 ways, one row
    per class with up to ``max_shots`` of its images; else one image per class, flowing over
    up to 10 columns.
    Images are drawn with ``normalization`` undone (`displayable`).
    """
    classes = list(support)
    shown = min(len(queries), max_queries)
    shots = max(1, min(max_shots, max(len(images) for images in support.values())))
    if len(classes) <= 10 and shots > 1:  # one row a class, its shots side by side
        columns = max(6, shots)
        rows = [[(name, image) for _, image in support[name][:shots]] for name in classes]
    else:  # one image a class, flowing
        columns = min(10, max(6, len(classes)))
        flat = [(name, support[name][0][1]) for name in classes]
        rows = [flat[i : i + columns] for i in range(0, len(flat), columns)]
    query_rows = -(-shown // columns)
    height = len(rows) + query_rows
    fig, axes = plt.subplots(height, columns, figsize=(1.45 * columns, 1.6 * height + 0.4), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for r, row in enumerate(rows):
        for c, (name, image) in enumerate(row):
            ax = axes[r, c]
            ax.axis("on")
            _show(ax, image, normalization)
            if c == 0 or len(row) > 1 and row[0][0] != row[1][0]:
                ax.set_title(f"{name}"[:16], fontsize=7, color="navy")
    for i in range(shown):
        ax = axes[len(rows) + i // columns, i % columns]
        ax.axis("on")
        _show(ax, queries[i][1], normalization)
        title, colour = query_title(labels[i], float(probabilities[i].max()), None if truth is None else truth[i])
        ax.set_title(title, fontsize=7, color=colour)
    what = "right in green, wrong in red with the true class" if truth is not None else "predicted class"
    fig.suptitle(
        f"support ({len(classes)} classes, titled in blue), then {shown} of {len(queries)} queries: "
        f"prediction (probability); {what}",
        fontsize=9,
    )
    inches = 1.6 * height + 0.4
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.4 / inches))  # 0.4 in for the title, however tall the figure
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


def learning_curves_figure(train: list, val: list, metric: str):
    """The learning curves' figure (``[(step, value)]`` each): at most six step ticks with
    thousands separators, so a run of tens of thousands of steps keeps readable labels."""
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    for ax, points, title in ((axes[0], train, "training loss"), (axes[1], val, f"validation {metric}")):
        if points:
            steps, values = zip(*points)
            ax.plot(steps, values, "C0.-" if len(points) < 30 else "C0-")
        else:
            ax.text(0.5, 0.5, "no values logged", ha="center", va="center", transform=ax.transAxes)
        ax.xaxis.set_major_locator(MaxNLocator(nbins=5, integer=True))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:,.0f}"))
        ax.set_xlabel("outer step")
        ax.set_title(title)
    fig.tight_layout()
    return fig


def plot_learning_curves(train: list, val: list, metric: str, path: Path) -> Path:
    """Training loss and the validation metric against outer steps (``[(step, value)]``)."""
    fig = learning_curves_figure(train, val, metric)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_sources(sources: dict, metric: str, path: Path) -> Path:
    """Each source's validation (last) and test ``metric`` with its 95% CI (dataset=multi)."""
    names = list(sources)
    scale, unit = (100.0, " (%)") if metric == "accuracy" else (1.0, "")
    fig, ax = plt.subplots(figsize=(max(4.0, 1.4 * len(names) + 1.5), 3.2))
    width = 0.38
    for offset, stage, colour in ((-width / 2, "val", "C0"), (width / 2, "test", "C1")):
        means = [scale * sources[n][stage]["mean"] if stage in sources[n] else float("nan") for n in names]
        cis = [scale * sources[n][stage]["ci95"] if stage in sources[n] else 0.0 for n in names]
        positions = [i + offset for i in range(len(names))]
        ax.bar(positions, means, width, yerr=cis, capsize=3, color=colour, label=stage)
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel(f"{metric}{unit}")
    ax.set_title(f"{metric} per source (95% CI)")
    low, high = ax.get_ylim()
    ax.set_ylim(low, high + 0.2 * (high - low))  # room for the legend above the bars
    ax.legend(loc="upper center", ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_test_episode(
    algorithm, episode, path: Path, max_queries: int = 24, normalization: Normalization = None
) -> Path:
    """One test episode of a classifier: its support images by class, then the first few
    queries of every class (``max_queries`` in all) titled with the predicted class and
    probability (green when right, red when wrong), with the dataset's ``normalization`` undone."""
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
    support = dict(sorted(support.items(), key=lambda item: int(item[0].split()[-1])))  # class 0, 1, ..., 10
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
    return plot_predictions(
        support, queries, labels, probabilities[shown], truth, path, max_queries, normalization=normalization
    )
