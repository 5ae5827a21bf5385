"""``sampler=variable``: Meta-Dataset's episodes and the ragged meta-batches they make.

The sampler's formulas against an independent NumPy transcription of Triantafillou et al.
(2020)'s algorithm, its distribution over many episodes against that transcription's own
Monte Carlo, the class imbalance it specifies, the same episodes on 1 and 2 processes and
after a resume, and every learner on ragged batches: each one either gives on a fixed-shape
meta-batch split into one-task parts exactly its fixed-shape result, or refuses with a sentence.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from metarun.build import build, build_learner
from metarun.datasets.base import ClassImages
from metarun.episodes import (
    TRAIN,
    EpisodeBatch,
    EpisodeSampler,
    RaggedBatch,
    TrainEpisodes,
    VariableEpisodeSampler,
    task_generator,
    variable_shots,
)
from metarun.errors import ConfigError
from metarun.module import backward_in_chunks
from metarun.runner import train
from tests.conftest import TINY, algorithms, compose_config, data_dir, untrained_and_trained

pytestmark = pytest.mark.usefixtures("one_thread")

LOG_HALF, LOG_TWO = math.log(0.5), math.log(2.0)


def numbered_split(sizes: list[int], superclasses: list[str] | None = None) -> ClassImages:
    """Class c has ``sizes[c]`` images, in class order; image i's first two pixels are
    i mod 256 and i div 256 (`identities`)."""
    labels = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    n = len(labels)
    ids = torch.arange(n)
    images = torch.stack([ids % 256, ids // 256], 1).to(torch.uint8).view(n, 1, 1, 2)  # [n, 1, 1, 2]
    return ClassImages(images, labels, "numbered", superclasses=superclasses)


def identities(x: torch.Tensor) -> torch.Tensor:
    pixels = (x[:, 0, 0] * 255).round().long()  # [M, 2]
    return pixels[:, 0] + 256 * pixels[:, 1]


def paper_shots(images: np.ndarray, queries: int, beta: float, alpha: np.ndarray, max_support: int, per_class: int):
    """Triantafillou et al. 2020, appendix: the support size, then each class's shots."""
    remaining = images - queries
    support = min(max_support, int(np.sum(np.floor(beta * np.minimum(per_class, remaining) + 1))))
    weights = images * np.exp(alpha)
    desired = np.floor(weights / weights.sum() * (support - len(images))).astype(np.int64) + 1
    return np.minimum(desired, remaining)


def paper_episode(rng: np.random.Generator, sizes: np.ndarray, sampler: VariableEpisodeSampler):
    """One episode description drawn by the paper's algorithm with NumPy's generator."""
    ways = rng.integers(sampler.min_ways, min(sampler.max_ways, len(sizes)) + 1)
    classes = rng.choice(len(sizes), ways, replace=False)
    images = sizes[classes]
    queries = min(sampler.max_queries, int((images // 2).min()))
    beta = rng.uniform()
    alpha = rng.uniform(sampler.min_log_weight, sampler.max_log_weight, ways)
    shots = paper_shots(images, queries, beta, alpha, sampler.max_support, sampler.max_support_per_class)
    return ways, queries, shots


def test_shots_equal_the_papers_formulas():
    rng = np.random.default_rng(0)
    for _ in range(500):
        ways = int(rng.integers(2, 40))
        images = rng.integers(2, 300, ways)
        queries = min(10, int((images // 2).min()))
        beta, alpha = float(rng.uniform()), rng.uniform(LOG_HALF, LOG_TWO, ways)
        max_support = int(rng.integers(ways, 600))
        ours = variable_shots(torch.from_numpy(images), queries, beta, torch.from_numpy(alpha), max_support, 100)
        assert ours.tolist() == paper_shots(images, queries, beta, alpha, max_support, 100).tolist()
        assert int(ours.min()) >= 1 and int(ours.sum()) <= max_support
        assert (ours <= torch.from_numpy(images) - queries).all()


def test_ways_queries_and_support_sizes_follow_the_papers_distribution():
    """4,000 episodes of a 30-class split with 4 to 60 images per class against 4,000 drawn by
    the NumPy transcription: the ways are uniform (a chi-square test), the queries follow
    the formula exactly, and the support sizes and imbalance have the same means."""
    sizes = [4 + (7 * c) % 57 for c in range(30)]
    split = numbered_split(sizes)
    sampler = VariableEpisodeSampler(meta_batch_size=1, min_ways=5, max_ways=20, max_support=200)
    n = 4000
    ours = [sampler.describe(split, task_generator(0, TRAIN, 0, i)) for i in range(n)]
    ways = np.array([len(d.classes) for d in ours])
    counts = np.bincount(ways, minlength=21)[5:]
    expected = n / 16
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 37.7  # 15 degrees of freedom, p = 0.001
    for d in ours:
        images = split.counts[d.classes]
        assert d.queries == min(10, int((images // 2).min()))
        assert len(set(d.classes.tolist())) == len(d.classes)
    rng = np.random.default_rng(1)
    theirs = [paper_episode(rng, np.array(sizes), sampler) for _ in range(n)]

    def same_mean(a: np.ndarray, b: np.ndarray) -> None:
        se = math.sqrt(a.var() / len(a) + b.var() / len(b))
        assert abs(a.mean() - b.mean()) < 4 * se, (a.mean(), b.mean(), se)

    same_mean(np.array([int(d.shots.sum()) for d in ours]), np.array([int(s.sum()) for _, _, s in theirs]))
    same_mean(
        np.array([int(d.shots.max() - d.shots.min()) for d in ours]),
        np.array([int(s.max() - s.min()) for _, _, s in theirs]),
    )
    same_mean(ways.astype(float), np.array([w for w, _, _ in theirs], dtype=float))


def test_supports_are_class_imbalanced_as_specified():
    """Equal classes: a class's share of the support follows e^α, α ~ U[log ½, log 2), so
    the largest class has fewer than 4 times the shots of the smallest (plus the one each
    is given), and almost every large enough support is unequal."""
    split = numbered_split([60] * 40)
    sampler = VariableEpisodeSampler(meta_batch_size=1, max_ways=10)
    unequal = large = 0
    for i in range(2000):
        d = sampler.describe(split, task_generator(3, TRAIN, 0, i))
        assert int(d.shots.max()) - 1 < 4 * int(d.shots.min())
        if int(d.shots.sum()) >= 5 * len(d.classes):
            large += 1
            unequal += int(d.shots.max() > d.shots.min())
    assert large > 1000 and unequal / large > 0.95


def test_an_episode_holds_the_described_images():
    split = numbered_split([4 + (7 * c) % 57 for c in range(30)])
    sampler = VariableEpisodeSampler(meta_batch_size=1, max_ways=12)
    for i in range(50):
        d = sampler.describe(split, task_generator(0, TRAIN, 0, i))
        batch = sampler.collate([sampler.eval_episode(split, TRAIN, i)])
        assert isinstance(batch, RaggedBatch)
        episode = batch.task(0)
        ways = len(d.classes)
        assert torch.equal(episode.classes, d.classes)
        assert torch.bincount(episode.support_y, minlength=ways).tolist() == d.shots.tolist()
        assert torch.bincount(episode.query_y, minlength=ways).tolist() == [d.queries] * ways
        support, query = identities(episode.support_x), identities(episode.query_x)
        assert set(support.tolist()).isdisjoint(query.tolist())
        assert len(set(support.tolist())) == len(support) and len(set(query.tolist())) == len(query)
        for label in range(ways):  # every image of label c is an image of class classes[c]
            ids = torch.cat([support[episode.support_y == label], query[episode.query_y == label]])
            assert (split.labels[ids] == d.classes[label]).all()


def test_hierarchy_keeps_an_episode_within_one_superclass():
    groups = [f"alphabet{c % 5}" for c in range(40)]  # 8 classes each
    split = numbered_split([20] * 40, superclasses=groups)
    sampler = VariableEpisodeSampler(meta_batch_size=1, min_ways=3, max_ways=50, hierarchy=True)
    seen = set()
    for i in range(300):
        d = sampler.describe(split, task_generator(0, TRAIN, 0, i))
        assert len({groups[int(c)] for c in d.classes}) == 1
        assert 3 <= len(d.classes) <= 8
        seen.add(groups[int(d.classes[0])])
    assert seen == set(groups)
    with pytest.raises(ConfigError, match=r"sampler.hierarchy=true is not allowed with split numbered: its dataset"):
        sampler.check(numbered_split([20] * 40), split, split)
    with pytest.raises(ConfigError, match=r"sampler.min_ways=9 .* the largest superclass .* has 8 classes"):
        VariableEpisodeSampler(meta_batch_size=1, min_ways=9, hierarchy=True).check(split, split, split)


def test_same_episodes_on_one_and_two_processes_and_after_a_resume():
    split = numbered_split([4 + (7 * c) % 57 for c in range(30)])
    sampler = VariableEpisodeSampler(meta_batch_size=4, max_ways=12)
    whole = sampler.train_batch(split, step=5)
    assert isinstance(whole, RaggedBatch) and len(whole) == 4
    halves = [sampler.train_batch(split, step=5, rank=r, world_size=2) for r in (0, 1)]
    assert [p.index.tolist() for p in halves] == [[0, 1], [2, 3]]
    for mine, part in zip([*halves[0].uniform(), *halves[1].uniform()], whole.uniform()):
        assert torch.equal(mine.support_x, part.support_x) and torch.equal(mine.query_y, part.query_y)
    straight = iter(TrainEpisodes(sampler, split, start_step=0, rank=0, world_size=1))
    for _ in range(3):
        next(straight)
    resumed = next(iter(TrainEpisodes(sampler, split, start_step=3, rank=0, world_size=1)))
    for a, b in zip(next(straight).uniform(), resumed.uniform()):
        assert torch.equal(a.support_x, b.support_x) and torch.equal(a.support_y, b.support_y)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"min_ways": 1}, r"sampler\.min_ways=1 is not allowed: it must be an integer of at least 2\."),
        ({"min_ways": 9, "max_ways": 8}, r"sampler\.min_ways=9 is not allowed with sampler\.max_ways=8"),
        ({"max_support": 10}, r"sampler\.max_support=10 is not allowed with sampler\.max_ways=50: every class"),
        ({"min_log_weight": 1.0, "max_log_weight": 0.0}, r"sampler\.min_log_weight=1\.0 is not allowed"),
        ({"hierarchy": "yes"}, r"sampler\.hierarchy='yes' is not allowed: it must be true or false\."),
        ({"max_queries": 0}, r"sampler\.max_queries=0 is not allowed"),
    ],
)
def test_bad_variable_settings_are_one_sentence(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        VariableEpisodeSampler(meta_batch_size=1, **kwargs)


def test_splits_that_cannot_give_a_variable_episode_are_refused():
    sampler = VariableEpisodeSampler(meta_batch_size=1)
    few = numbered_split([5] * 4)
    with pytest.raises(ConfigError, match=r"sampler.min_ways=5 is not allowed: split numbered has only 4 classes"):
        sampler.check(few, few, few)
    lonely = numbered_split([5] * 9 + [1])
    with pytest.raises(ConfigError, match=r"a class of it has 1 image, and each class needs one support"):
        sampler.check(lonely, lonely, lonely)


# ------------------------------------------------------------------ every learner

VARIABLE = [
    *TINY,
    "dataset=omniglot",
    "model.hidden=8",
    "sampler=variable",
    "sampler.max_queries=2",
    "sampler.max_support=24",
    "sampler.meta_batch_size=2",
]
WAYS = {"fixed": ["sampler.min_ways=3", "sampler.max_ways=3"], "varying": ["sampler.min_ways=3", "sampler.max_ways=6"]}


@pytest.fixture(scope="module")
def omniglot_episodes(tmp_path_factory):
    """Real Omniglot's validation split, a fixed-shape meta-batch of 3-way 2-shot tasks and a
    ragged one of each ``WAYS`` setting."""
    root = data_dir()
    if root is None or not (root / "omniglot" / "images_background.zip").exists():
        pytest.skip("METARUN_DATA_DIR with omniglot/ is not set (.ci/run sets it)")
    out = tmp_path_factory.mktemp("variable")
    batches = {}
    for name, ways in WAYS.items():
        objects = build(compose_config([*VARIABLE, "algorithm=protonet", *ways], out / name))
        batches[name] = objects["datamodule"].train_batch(0)
        split = objects["datamodule"].splits["val"]
    fixed = EpisodeSampler(3, 2, 2, meta_batch_size=2).train_batch(split, 0)
    assert isinstance(batches["fixed"], RaggedBatch) and isinstance(batches["varying"], RaggedBatch)
    return fixed, batches


def double(batch: EpisodeBatch) -> EpisodeBatch:
    x, q = batch.support_x.double(), batch.query_x.double()
    return EpisodeBatch(x, batch.support_y, q, batch.query_y, None, batch.index, batch.classes)


@pytest.mark.slow
@pytest.mark.parametrize("name", algorithms("classification"))
@pytest.mark.parametrize("ways", sorted(WAYS))
def test_each_learner_matches_its_fixed_shape_result_or_refuses(name, ways, omniglot_episodes, tmp_path):
    fixed, ragged = omniglot_episodes
    cfg = compose_config([*VARIABLE, f"algorithm={name}", *WAYS[ways]], tmp_path)
    try:
        algorithm = build_learner(cfg)["algorithm"]
    except ConfigError as error:
        sentence = str(error)
        assert "sampler=variable" in sentence and sentence.endswith(".") and "\n" not in sentence
        head_refusal = ways == "varying" and algorithm_needs_head(cfg)
        assert head_refusal or name in ("relation_net", "feat"), sentence
        return
    algorithm = algorithm.double()
    if algorithm.episodic:  # the meta-gradient of the fixed batch, whole and split into tasks
        params = [p for p in algorithm.parameters() if p.requires_grad]
        grads = []
        for batch in (double(fixed), RaggedBatch([double(fixed.tasks(i, i + 1)) for i in range(len(fixed))])):
            algorithm.zero_grad()
            out = backward_in_chunks(algorithm.train(), batch, None, lambda loss: loss.backward())
            grads.append((out.loss, out.task_metric, [p.grad.clone() for p in params if p.grad is not None]))
        torch.testing.assert_close(grads[1][0], grads[0][0], rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(grads[1][1], grads[0][1])
        assert len(grads[1][2]) == len(grads[0][2]) > 0
        for a, b in zip(grads[1][2], grads[0][2]):
            torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)
        for part in ragged[ways].uniform():  # a real variable meta-batch trains
            out = algorithm.meta_loss(double(part))
            assert torch.isfinite(out.loss)
    algorithm.eval()
    whole = algorithm.predict(double(fixed)).query_logits
    for i in range(len(fixed)):
        torch.testing.assert_close(algorithm.predict(double(fixed.tasks(i, i + 1))).query_logits, whole[i : i + 1])
    for part in ragged[ways].uniform():
        logits = algorithm.predict(double(part)).query_logits  # [1, N*Q, N]
        ways_here = int(part.support_y.max()) + 1
        assert logits.shape == (1, part.query_y.shape[1], ways_here) and torch.isfinite(logits).all()


def algorithm_needs_head(cfg) -> bool:
    from metarun.build import learner_class

    return learner_class(cfg.algorithm).needs_head


# ------------------------------------------------------------------ runs


def test_a_variable_run_trains_validates_tests_and_resumes_exactly(omniglot_available, tmp_path):
    """ProtoNet on Omniglot's alphabets (``hierarchy``): trained beats untrained on the same
    variable test episodes, and 40 + 8 steps after a resume equal 48 straight."""
    settings = [
        *VARIABLE,
        "algorithm=protonet",
        "sampler.hierarchy=true",
        "sampler.max_ways=10",
        "sampler.test_episodes=20",
        "sampler.val_episodes=10",
        "trainer.val_check_interval=8",
    ]
    untrained, straight = untrained_and_trained(settings, tmp_path, 48)
    assert straight["experiment"]["ways"] == "5-10" and straight["experiment"]["shots"] == "variable"
    assert straight["test"]["accuracy"]["mean"] > untrained["test"]["accuracy"]["mean"] + 0.1
    train(compose_config([*settings, "trainer.max_steps=40"], tmp_path / "b"))
    resumed, _ = train(compose_config([*settings, "trainer.max_steps=48", "ckpt_path=last"], tmp_path / "b"))
    assert resumed["train"]["resumed_from"] == str(tmp_path / "b" / "checkpoints" / "last.ckpt")
    assert resumed["test"] == straight["test"]


def test_fine_tuning_at_test_time_chooses_its_rate_on_variable_episodes(omniglot_available, tmp_path):
    """``test_time.lr=auto`` scores each candidate rate on ragged validation episodes, one
    task at a time, and the test fine-tunes each variable test task's own copy."""
    settings = [*VARIABLE, "algorithm=protonet", "sampler.min_ways=3", "sampler.max_ways=5", "trainer.max_steps=2"]
    tuned = [*settings, "test_time.finetune_steps=1", "test_time.lr=auto"]
    results, _ = train(compose_config(tuned, tmp_path / "tuned"))
    search = results["experiment"]["test_time"]["lr_search"]
    assert search["episodes"] == 4 and {float(rate) for rate in search["accuracy"]} == {0.0, 0.0001, 0.001, 0.01}
    assert results["experiment"]["test_time"]["lr"] in (0, 0.0001, 0.001, 0.01)
    assert results["test"]["accuracy"]["episodes"] == 4
