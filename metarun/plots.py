"""Plots of regression tasks before and after adaptation."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from metarun.algorithms.base import MetaAlgorithm  # noqa: E402
from metarun.episodes import EvalEpisodes, collate_episodes  # noqa: E402


def plot_regression_tasks(algorithm: MetaAlgorithm, episodes: EvalEpisodes, path: Path,
                          tasks: int = 4, points: int = 200) -> Path:
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
        batch = type(batch)(**{k: (v.to(device) if torch.is_tensor(v) else v)
                               for k, v in vars(batch).items()})
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
