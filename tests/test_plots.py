"""The pictures: colours as in the source image (the dataset's normalisation undone), a compact
layout from 5 to 50 ways, wrong predictions marked with the true class, and learning curves whose
step labels stay apart."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from PIL import Image

from metarun.plots import displayable, learning_curves_figure, plot_predictions, query_title

# ImageNet's statistics, as image_folder and CUB normalise by
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
COLOURS = {"pink": (255, 192, 203), "green": (40, 180, 60), "lavender": (230, 230, 250), "navy": (0, 0, 128)}


def normalised(rgb: tuple[int, int, int]) -> torch.Tensor:
    """A 16-px image of one colour as the training loader gives it: [0, 1], then normalised."""
    x = torch.tensor(rgb, dtype=torch.float32).div(255).view(3, 1, 1).expand(3, 16, 16)
    return (x - MEAN) / STD


def pixels_near(path, rgb, tolerance: int = 3) -> int:
    picture = np.asarray(Image.open(path).convert("RGB")).astype(int)
    return int((np.abs(picture - np.array(rgb)).max(-1) <= tolerance).sum())


def test_displayable_undoes_the_normalisation():
    for rgb in COLOURS.values():
        back = displayable(normalised(rgb), (MEAN, STD))
        torch.testing.assert_close(back[:, 0, 0] * 255, torch.tensor(rgb, dtype=torch.float32), atol=1e-3, rtol=0)


def test_rgb_pictures_show_the_source_colours(tmp_path):
    support = {name: [(None, normalised(rgb))] for name, rgb in COLOURS.items()}
    queries = [(None, normalised(rgb)) for rgb in COLOURS.values()]
    names = list(COLOURS)
    path = plot_predictions(
        support, queries, names, torch.full((4, 4), 0.25), names, tmp_path / "p.png", normalization=(MEAN, STD)
    )
    for name, rgb in COLOURS.items():
        assert pixels_near(path, rgb) > 200, name  # two 16-px images of it, drawn about 100 px wide
    # drawn without undoing the normalisation, pink and lavender would come out as (near) white
    raw = plot_predictions(support, queries, names, torch.full((4, 4), 0.25), names, tmp_path / "raw.png")
    assert pixels_near(raw, COLOURS["pink"]) == 0


@pytest.mark.parametrize("ways, most_rows", [(5, 5), (20, 5), (50, 8)])
def test_the_layout_stays_compact(tmp_path, ways, most_rows):
    """Support then 24 queries: 5-way 1-shot in 5 rows, 20 ways in 5 and 50 in 8 (not one row a class)."""
    support = {f"c{i}": [(None, torch.rand(1, 8, 8))] for i in range(ways)}
    queries = [(None, torch.rand(1, 8, 8)) for _ in range(24)]
    labels = [f"c{i % ways}" for i in range(24)]
    path = plot_predictions(support, queries, labels, torch.rand(24, ways), None, tmp_path / "p.png")
    height = Image.open(path).size[1]
    assert height <= (1.6 * most_rows + 0.4) * 100 + 1


def test_a_wrong_prediction_names_the_true_class():
    assert query_title("cat", 0.9, "cat") == ("cat (0.90)", "green")
    assert query_title("cat", 0.6, "dog") == ("cat (0.60)\ntrue: dog", "red")
    assert query_title("cat", 0.6, None) == ("cat (0.60)", "black")


def test_support_classes_are_in_label_order(tmp_path, monkeypatch):
    """class 0, 1, 2, ..., 10, not the text order 0, 1, 10, 11, ..."""
    import metarun.plots
    from metarun.algorithms.protonet import ProtoNet
    from metarun.episodes import Episode
    from metarun.models.conv4 import Conv4

    seen = {}
    monkeypatch.setattr(metarun.plots, "plot_predictions", lambda support, *a, **k: seen.update(support=list(support)))
    x = torch.rand(12, 1, 28, 28)
    metarun.plots.plot_test_episode(
        ProtoNet(Conv4(hidden=4)), Episode(x, torch.arange(12), x, torch.arange(12), None), tmp_path / "p.png"
    )
    assert seen["support"] == [f"class {i}" for i in range(12)]


@pytest.mark.parametrize("steps", [60, 20_000, 600_000])
def test_learning_curves_step_labels_do_not_overlap(steps):
    """A run of 20,000 steps drew nine step labels that ran into one another; every length
    gets a few labels, apart, with thousands separators."""
    train = [(s, 1.0 / (1 + s)) for s in range(0, steps + 1, max(1, steps // 400))]
    val = [(s, 0.5 + s / (2 * steps)) for s in range(0, steps + 1, max(1, steps // 20))]
    fig = learning_curves_figure(train, val, "accuracy")
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    for ax in fig.axes:
        low, high = ax.get_xlim()
        labels = [t.label1 for t in ax.xaxis.get_major_ticks() if low <= t.get_loc() <= high]
        boxes = [label.get_window_extent(renderer) for label in labels if label.get_text()]
        assert 3 <= len(boxes) <= 7
        assert all(left.x1 < right.x0 for left, right in zip(boxes, boxes[1:]))  # apart, left to right
        if steps >= 10_000:
            assert any("," in label.get_text() for label in labels)
    plt.close(fig)
