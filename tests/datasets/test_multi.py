"""``dataset=multi``: several image datasets in one run (Meta-Dataset's "all sources").

Training episodes come from each source by its weight, evaluation episodes take the sources
in turn; a run on real Omniglot and a generated RGB folder trains, reports every metric per
source (results.json, the CSV logger, a picture) and predicts on the user's images.
"""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from metarun.build import build
from metarun.episodes import VAL, EpisodeSampler, SourceMixture, VariableEpisodeSampler, task_generator
from tests.conftest import EVAL, PREDICT, TINY, compose_config, finish, launch, untrained_and_trained
from tests.datasets import standins
from tests.test_variable_episodes import numbered_split

pytestmark = pytest.mark.usefixtures("one_thread")


def mixture() -> SourceMixture:
    return SourceMixture([numbered_split([10] * 8), numbered_split([12] * 6)], ["small", "large"], [0.25, 0.75])


def test_training_episodes_come_from_each_source_by_weight_and_evaluation_takes_them_in_turn():
    mix = mixture()
    sampler = EpisodeSampler(3, 2, 2, meta_batch_size=4)
    drawn = torch.cat([sampler.train_batch(mix, step).sources() for step in range(500)])  # 2,000 episodes
    share = float((drawn == 1).double().mean())
    assert abs(share - 0.75) < 4 * math.sqrt(0.75 * 0.25 / len(drawn))
    assert [sampler.eval_episode(mix, VAL, i).source for i in range(5)] == [0, 1, 0, 1, 0]
    variable = VariableEpisodeSampler(meta_batch_size=2, min_ways=3, max_ways=6)
    batch = variable.train_batch(mix, 0)
    assert [int(part.sources()) for part in batch.uniform()] == [e.source for e in map(batch.task, range(2))]
    for step in range(20):  # plain mini-batches are labelled by the classes of all sources together
        plain = mix.batch(task_generator(0, 0, step, 0), 5)
        low, high = (0, 8) if plain.source == 0 else (8, 14)
        assert ((plain.query_y >= low) & (plain.query_y < high)).all()
    assert mix.num_classes == 14


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """A generated RGB image folder: 15 classes of 8 images."""
    return standins.image_folder(tmp_path_factory.mktemp("photos") / "photos", classes=15, per_class=8, grey_every=0)


def test_two_sources_train_validate_per_source_and_predict(omniglot_available, photos, tmp_path):
    settings = [
        *TINY,
        "dataset=multi",
        f"dataset.sources=[omniglot,{{name:image_folder,root:{photos}}}]",
        "algorithm=protonet",
        "model.hidden=16",
        "sampler.ways=3",
        "sampler.queries=2",
        "sampler.val_episodes=10",
        "sampler.test_episodes=40",
        "trainer.val_check_interval=20",
        "logger=csv",
    ]
    untrained, results = untrained_and_trained(settings, tmp_path, 40)
    assert results["test"]["accuracy"]["mean"] > untrained["test"]["accuracy"]["mean"] + 0.05
    sources = results["sources"]
    assert list(sources) == ["omniglot", "image_folder"]
    for name in sources:
        assert sources[name]["test"]["episodes"] == 20 and sources[name]["val"]["episodes"] == 5
    pooled = sum(sources[n]["test"]["mean"] * 20 for n in sources) / 40
    assert pooled == pytest.approx(results["test"]["accuracy"]["mean"], abs=1e-6)
    assert (tmp_path / "run" / "sources.png").stat().st_size > 0
    with open(next((tmp_path / "run" / "csv").rglob("metrics.csv"))) as f:
        columns = next(csv.reader(f))
    assert {"val/source/omniglot/accuracy", "test/source/image_folder/accuracy_ci95"} <= set(columns)
    # the installed predict command labels the user's RGB images with the trained learner
    support, query = tmp_path / "support", tmp_path / "query"
    for label in ("class_12", "class_13", "class_14"):
        for folder, images in ((support, ("img_0.png", "img_1.png")), (query, ("img_5.jpg",))):
            (folder / label).mkdir(parents=True)
            for image in images:
                found = next((photos / label).glob(f"{Path(image).stem}.*"))
                shutil.copy(found, folder / label / found.name)
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    done = finish(
        launch(tmp_path / "predicted", f"ckpt_path={ckpt}", f"support={support}", f"query={query}", command=PREDICT)
    )
    assert done.returncode == 0, done.stderr[-2000:]
    predicted = json.loads((tmp_path / "predicted" / "predict.json").read_text())
    assert predicted["queries"] == 3
    # metarun-eval reports the checkpoint's test per source too
    done = finish(launch(tmp_path / "evaluated", f"ckpt_path={ckpt}", "sampler.test_episodes=6", command=EVAL))
    assert done.returncode == 0, done.stderr[-2000:]
    evaluated = json.loads((tmp_path / "evaluated" / "results.json").read_text())
    assert {name: s["test"]["episodes"] for name, s in evaluated["sources"].items()} == {
        "omniglot": 3,
        "image_folder": 3,
    }
    assert "  image_folder: " in done.stdout


def test_resident_memory_stays_bounded_over_2000_episodes(omniglot_available, photos, tmp_path):
    """Two sources, variable episodes: after 200 episodes of warm-up, drawing 1,800 more grows
    the process's resident memory by less than 5% (each source's images are one memory-mapped
    cache; an episode allocates only itself)."""
    settings = [
        *TINY,
        "dataset=multi",
        f"dataset.sources=[omniglot,{{name:image_folder,root:{photos}}}]",
        "algorithm=protonet",
        "sampler=variable",
        "sampler.min_ways=3",
    ]
    datamodule = build(compose_config(settings, tmp_path))["datamodule"]

    def resident() -> int:
        return int(Path("/proc/self/statm").read_text().split()[1]) * 4096

    for step in range(100):  # meta-batches of 2: 200 episodes
        datamodule.train_batch(step)
    warm = resident()
    for step in range(100, 1000):
        datamodule.train_batch(step)
    assert resident() < 1.05 * warm, (warm, resident())
