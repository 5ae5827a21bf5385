"""Fine-tuning at test time: it lowers the support loss, is seeded, never changes the learner or
its checkpoint, and labels alike through metarun-eval, metarun-predict and metarun.load."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

import metarun
from metarun.algorithms.base import MetaOutput
from metarun.build import build
from metarun.episodes import TEST, EpisodeBatch, collate_episodes
from metarun.errors import ConfigError
from metarun.runner import train
from metarun.test_time import AUTO_RATES, TestTimeFinetune, augment_images
from tests.conftest import EVAL, PREDICT, TINY, compose_config, data_dir, finish, launch

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

SMALL = ["dataset=omniglot", "model.hidden=8", "sampler.ways=5", "sampler.shots=1", "sampler.queries=3"]


def test_augmentation_is_seeded_geometry():
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8)
    a = augment_images(x, torch.Generator().manual_seed(0))
    b = augment_images(x, torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and a.shape == x.shape
    assert not torch.equal(a, augment_images(x, torch.Generator().manual_seed(1)))
    assert set(a.unique().tolist()) <= set(x.unique().tolist())  # pixels moved, never changed


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 3-step ProtoNet run on Omniglot 5-way 1-shot, and its objects."""
    root = data_dir()
    if root is None or not (root / "omniglot" / "images_background.zip").exists():
        pytest.skip("METARUN_DATA_DIR with omniglot/ is not set (.ci/run sets it)")
    folder = tmp_path_factory.mktemp("protonet")
    _, objects = train(compose_config([*TINY, *SMALL, "algorithm=protonet"], folder))
    return folder, objects


def test_lowers_the_support_loss_is_seeded_and_leaves_the_learner_unchanged(run):
    _, objects = run
    algorithm, sampler = objects["algorithm"].eval(), objects["sampler"]
    test = objects["datamodule"].splits["test"]
    batch = collate_episodes([sampler.eval_episode(test, TEST, i) for i in range(2)])
    before = {k: v.clone() for k, v in algorithm.state_dict().items()}
    tuner = TestTimeFinetune(finetune_steps=10, lr=0.05, seed=0)
    task = batch.tasks(0, 1)
    pseudo = tuner.pseudo_episode(task, torch.Generator())
    with torch.no_grad():
        untuned = algorithm.meta_loss(pseudo).loss.item()
        tuned = tuner.finetuned(algorithm, task, tuner.lr).meta_loss(pseudo).loss.item()
    assert tuned < untuned - 0.05
    first = tuner.predict(algorithm, batch).query_logits
    assert torch.equal(first, tuner.predict(algorithm, batch).query_logits)  # seeded
    assert torch.equal(first[1:], tuner.predict(algorithm, batch.tasks(1, 2)).query_logits)  # per episode
    assert not torch.equal(first, algorithm.predict(batch).query_logits)
    for key, value in algorithm.state_dict().items():
        assert torch.equal(value, before[key]), key
    off = TestTimeFinetune(finetune_steps=0)
    assert torch.equal(off.predict(algorithm, batch).query_logits, algorithm.predict(batch).query_logits)


def test_eval_predict_and_load_give_the_same_labels_and_the_checkpoint_is_untouched(run, tmp_path):
    from tests.test_predict import predictions, save_png

    folder, objects = run
    ckpt = folder / "checkpoints" / "last.ckpt"
    digest = hashlib.sha256(ckpt.read_bytes()).hexdigest()
    episode = objects["sampler"].eval_episode(objects["datamodule"].splits["test"], TEST, 0)
    for part, x, y in (("support", episode.support_x, episode.support_y), ("query", episode.query_x, episode.query_y)):
        for i, (image, label) in enumerate(zip(x, y.tolist())):
            save_png(image, tmp_path / part / f"class_{label}" / f"{i:02d}.png")
    settings = ["test_time.finetune_steps=5", "test_time.lr=0.05", "test_time.augment=true"]
    evaluated = launch(tmp_path / "eval", f"ckpt_path={ckpt}", "sampler.test_episodes=1", *settings, command=EVAL)
    predicted = launch(
        tmp_path / "predict",
        f"ckpt_path={ckpt}",
        f"support={tmp_path / 'support'}",
        f"query={tmp_path / 'query'}",
        *settings,
        command=PREDICT,
    )
    ev, done = finish(evaluated), finish(predicted)
    assert ev.returncode == 0, ev.stderr[-3000:]
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    report = json.loads((tmp_path / "predict" / "predict.json").read_text())
    recorded = {"finetune_steps": 5, "lr": 0.05, "augment": True}
    assert results["experiment"]["test_time"] == recorded and report["test_time"] == recorded
    assert report["accuracy"]["mean"] == results["test"]["accuracy"]["mean"]
    # the labels: the fine-tuned copy's prediction of episode 0, in Python too
    tuner = TestTimeFinetune(finetune_steps=5, lr=0.05, augment=True, seed=0)
    module = build(compose_config([*TINY, *SMALL, "algorithm=protonet"], tmp_path / "build"))["module"]
    module.load_state_dict(torch.load(ckpt, weights_only=True)["state_dict"])
    logits = tuner.predict(module.algorithm.eval(), collate_episodes([episode])).query_logits[0]
    expected = [f"class_{i}" for i in logits.argmax(-1).tolist()]
    assert [r["predicted"] for r in predictions(tmp_path / "predict")] == expected
    learner = metarun.load(ckpt, test_time={"finetune_steps": 5, "lr": 0.05, "augment": True})
    support = sorted((tmp_path / "support").rglob("*.png"))
    labels, _ = learner.adapt(support, [p.parent.name for p in support]).predict(
        sorted((tmp_path / "query").rglob("*.png"))
    )
    assert labels == expected
    assert hashlib.sha256(ckpt.read_bytes()).hexdigest() == digest


def test_auto_lr_takes_the_best_rate_and_a_tie_goes_to_the_smaller(monkeypatch):
    tuner = TestTimeFinetune(finetune_steps=1, lr="auto")
    assert tuner.needs_lr and tuner.settings()["lr"] == "auto"
    with pytest.raises(RuntimeError, match="choose_lr must pick the rate"):
        tuner.predict(None, None)
    right, wrong = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]]), torch.tensor([[[0.0, 1.0], [1.0, 0.0]]])
    half = torch.tensor([[[1.0, 0.0], [1.0, 0.0]]])  # [B=1, M=2, N=2]
    logits = dict(zip(AUTO_RATES, (half, right, right, wrong)))
    monkeypatch.setattr(tuner, "predict_at", lambda algorithm, batch, lr: MetaOutput(torch.tensor(0.0), logits[lr]))
    monkeypatch.setattr(tuner, "check_task", lambda algorithm, batch: None)
    labels = torch.tensor([[0, 1]])
    episodes = EpisodeBatch(torch.zeros(1, 2, 1), labels, torch.zeros(1, 2, 1), labels, None, torch.zeros(1).long())
    assert tuner.choose_lr(None, episodes) == 0.0001 and not tuner.needs_lr
    assert tuner.settings()["lr_search"] == {
        "episodes": 1,
        "accuracy": {"0.0": 0.5, "0.0001": 1.0, "0.001": 1.0, "0.01": 0.0},
    }


def test_auto_lr_is_chosen_on_validation_episodes_alike_in_eval_and_predict(run, tmp_path):
    from tests.test_predict import save_png

    folder, objects = run
    ckpt = folder / "checkpoints" / "last.ckpt"
    episode = objects["sampler"].eval_episode(objects["datamodule"].splits["test"], TEST, 0)
    for i, (image, label) in enumerate(zip(episode.support_x, episode.support_y.tolist())):
        save_png(image, tmp_path / "support" / f"class_{label}" / f"{i:02d}.png")
    settings = ["test_time.finetune_steps=2", "test_time.lr=auto"]
    evaluated = launch(tmp_path / "eval", f"ckpt_path={ckpt}", "sampler.test_episodes=1", *settings, command=EVAL)
    support = f"support={tmp_path / 'support'}"
    predicted = launch(
        tmp_path / "predict", f"ckpt_path={ckpt}", support, f"query={tmp_path / 'support'}", *settings, command=PREDICT
    )
    learner = metarun.load(ckpt, test_time={"finetune_steps": 2, "lr": "auto"})
    learner.choose_test_time_lr()
    chosen = learner.test_time.settings()
    assert chosen["lr"] in AUTO_RATES and chosen["lr_search"]["episodes"] == min(5, objects["sampler"].val_episodes)
    ev, done = finish(evaluated), finish(predicted)
    assert ev.returncode == 0, ev.stderr[-3000:]
    assert done.returncode == 0, done.stderr[-3000:]
    assert "fine-tuned at test time: 2 steps at lr" in ev.stdout and "test_time.lr=auto on " in ev.stdout
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    report = json.loads((tmp_path / "predict" / "predict.json").read_text())
    assert results["experiment"]["test_time"] == report["test_time"] == {**chosen, "augment": False}
    # without the checkpoint's data the rate cannot be picked: one sentence
    learner = metarun.load(ckpt, test_time={"finetune_steps": 2, "lr": "auto"})
    learner.config.dataset.root, learner.config.dataset.download = str(tmp_path / "nowhere"), False
    with pytest.raises(
        ConfigError,
        match=r"test_time.lr=auto is not allowed here: it picks the rate on validation "
        r"episodes of the checkpoint's dataset \(Omniglot\), which could not be read",
    ):
        learner.predict(sorted((tmp_path / "support").rglob("*.png")))


def test_bad_settings_are_one_sentence(tmp_path):
    with pytest.raises(ConfigError, match="test_time.finetune_steps=-1 is not allowed"):
        TestTimeFinetune(finetune_steps=-1)
    with pytest.raises(ConfigError, match="test_time.lr='fast' is not allowed: it must be a positive number or auto"):
        TestTimeFinetune(finetune_steps=1, lr="fast")
    with pytest.raises(ConfigError, match="test_time.augment='yes' is not allowed"):
        TestTimeFinetune(finetune_steps=1, augment="yes")
    done = finish(
        launch(tmp_path / "pretrain", *TINY, "dataset=omniglot", "algorithm=pretrain", "test_time.finetune_steps=5")
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert (
        "metarun: error: test_time.finetune_steps=5 is not allowed with algorithm=Pretrain: it trains on whole "
        "classes" in done.stderr
    )
