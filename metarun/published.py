"""Published numbers: the one data file (``published.csv``) that the presets point to and the
benchmark tables, the docs and reproductions read. A number is written there once, with its
source; nothing else in the repository types it."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from importlib import resources


@dataclass(frozen=True)
class Published:
    """One published accuracy (%) of a learner on a dataset at an episode shape."""

    algorithm: str
    dataset: str
    ways: int
    shots: int
    accuracy: float
    ci95: float | None
    transductive: bool
    preset: str | None
    source: str
    printed: str  # as the paper prints it: "98.7 ± 0.4", "96.0"

    @property
    def text(self) -> str:
        """As printed in the paper, marked when the inference was transductive."""
        return self.printed + (" (transductive)" if self.transductive else "")


def published() -> list[Published]:
    """Every row of ``published.csv``."""
    text = resources.files("metarun").joinpath("published.csv").read_text()
    return [
        Published(
            algorithm=row["algorithm"],
            dataset=row["dataset"],
            ways=int(row["ways"]),
            shots=int(row["shots"]),
            accuracy=float(row["accuracy"]),
            ci95=float(row["ci95"]) if row["ci95"] else None,
            transductive=row["transductive"] == "true",
            preset=row["preset"] or None,
            source=row["source"],
            printed=row["accuracy"] + (f" ± {row['ci95']}" if row["ci95"] else ""),
        )
        for row in csv.DictReader(text.splitlines())
    ]


def lookup(algorithm: str, dataset: str, ways: int, shots: int) -> Published | None:
    """The published number of ``algorithm`` on ``dataset`` at ``ways``-way ``shots``-shot, if any."""
    for row in published():
        if (row.algorithm, row.dataset, row.ways, row.shots) == (algorithm, dataset, ways, shots) and (
            row.preset is None or "resnet12" not in row.preset
        ):
            return row
    return None


def for_preset(preset: str) -> Published | None:
    """The published number a preset (``experiment/<preset>.yaml``) reproduces, if any."""
    return next((row for row in published() if row.preset == preset), None)
