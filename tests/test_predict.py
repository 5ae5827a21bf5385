"""metarun-predict and metarun.load: a trained learner on a user's own labelled examples.

The Omniglot checkpoints are trained for a few steps (the labels need not be right, only
identical to what `metarun-eval` computes); the episode written to disk is test episode 0
of the fixed list, as support/<class>/<i>.png and query/<class>/<i>.png.
"""

from __future__ import annotations

import csv
import json
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

import metarun
from metarun.build import build_learner
from metarun.episodes import TEST, EpisodeBatch, collate_episodes
from metarun.predict import Learner, load
from metarun.runner import train
from metarun.stats import wilson_interval
from tests.conftest import EVAL, NEEDS, PREDICT, TINY, algorithms, compose_config, data_dir, finish, launch
from tests.test_cli import assert_one_sentence

EPISODE = ["sampler.ways=5", "sampler.shots=1", "sampler.queries=3"]
SMALL = ["dataset=omniglot", "model.hidden=8", *EPISODE, "sampler.meta_batch_size=2"]

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


def command(exe: str, run_dir: Path, *overrides: str) -> subprocess.Popen:
    return launch(run_dir, *overrides, command=exe)


def save_png(x: torch.Tensor, path: Path) -> None:
    """A ``[1, H, W]`` image in [0, 1] (a training tensor) as the grey PNG it came from."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(x[0].mul(255).round().byte().numpy(), mode="L").save(path)


def predict_command(ckpt: Path, support: Path, query: Path, run_dir: Path) -> subprocess.CompletedProcess:
    """metarun-predict on ``support`` and ``query``, run to the end."""
    return finish(command(PREDICT, run_dir, f"ckpt_path={ckpt}", f"support={support}", f"query={query}"))


def predictions(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "predictions.csv") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def omniglot(tmp_path_factory):
    """{algorithm: (checkpoint, episode folder, episode)} for ProtoNet and MAML."""
    root = data_dir()
    if root is None or not (root / "omniglot" / "images_background.zip").exists():
        pytest.skip("METARUN_DATA_DIR with omniglot/ is not set (.ci/run sets it)")
    out = {}
    for algorithm in ("protonet", "maml"):
        run = tmp_path_factory.mktemp(algorithm)
        cfg = compose_config([*TINY, *SMALL, f"algorithm={algorithm}"], run)
        _, objects = train(cfg)
        episode = objects["sampler"].eval_episode(objects["datamodule"].splits["test"], TEST, 0)
        folder = run / "episode"
        for part, x, y in (
            ("support", episode.support_x, episode.support_y),
            ("query", episode.query_x, episode.query_y),
        ):
            for i, (image, label) in enumerate(zip(x, y.tolist())):
                save_png(image, folder / part / f"class_{label}" / f"{i:02d}.png")
        out[algorithm] = (run / "checkpoints" / "last.ckpt", folder, episode, objects)
    return out


@pytest.mark.parametrize("algorithm", ["protonet", "maml"])
def test_predict_gives_what_eval_gives_on_the_same_episode(omniglot, tmp_path, algorithm):
    ckpt, folder, episode, objects = omniglot[algorithm]
    predicted = command(
        PREDICT, tmp_path / "predict", f"ckpt_path={ckpt}", f"support={folder / 'support'}", f"query={folder / 'query'}"
    )
    evaluated = command(EVAL, tmp_path / "eval", f"ckpt_path={ckpt}", "sampler.test_episodes=1")
    done, ev = finish(predicted), finish(evaluated)
    assert done.returncode == 0, done.stderr[-3000:]
    assert ev.returncode == 0, ev.stderr[-3000:]
    report = json.loads((tmp_path / "predict" / "predict.json").read_text())
    tested = json.loads((tmp_path / "eval" / "results.json").read_text())["test"]["accuracy"]
    assert tested["episodes"] == 1
    assert report["accuracy"]["mean"] == tested["mean"]  # exactly: the same episode, same code
    right = round(report["accuracy"]["mean"] * 15)  # a proportion of 15 queries: Wilson's interval
    assert (report["accuracy"]["ci95_low"], report["accuracy"]["ci95_high"]) == wilson_interval(right, 15)
    assert "95% Wilson interval" in done.stdout and f"{right} of 15 labelled queries" in done.stdout
    assert report["support"] == {f"class_{i}": 1 for i in range(5)} and report["queries"] == 15
    # the labels: the algorithm's own meta-test prediction of episode 0
    module = objects["module"]
    module.load_state_dict(torch.load(ckpt, weights_only=True)["state_dict"])
    module.eval()
    with torch.no_grad():
        logits = module.algorithm.predict(collate_episodes([episode])).query_logits[0]
    expected = [f"class_{i}" for i in logits.argmax(-1).tolist()]
    rows = predictions(tmp_path / "predict")
    assert [r["predicted"] for r in rows] == expected
    assert [r["true"] for r in rows] == [f"class_{i}" for i in episode.query_y.tolist()]
    probabilities = torch.tensor([[float(r[f"p(class_{i})"]) for i in range(5)] for r in rows])
    torch.testing.assert_close(probabilities, logits.softmax(-1), rtol=0, atol=1e-6)
    picture = tmp_path / "predict" / "predictions.png"
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and picture.stat().st_size > 5000
    # the Python API is the same code: same labels and probabilities
    learner = metarun.load(ckpt)
    support = sorted((folder / "support").rglob("*.png"))
    queries = sorted((folder / "query").rglob("*.png"))
    labels, probs = learner.adapt(support, [p.parent.name for p in support]).predict(queries)
    assert labels == expected
    torch.testing.assert_close(probs, probabilities, rtol=0, atol=1e-6)


def test_transductive_inference_in_predict_and_eval_is_recorded_and_refused_where_it_does_not_apply(omniglot, tmp_path):
    """``transductive=bd_cspn`` (predict) and ``algorithm.transductive=bd_cspn`` (eval) on the
    ProtoNet checkpoint: the same accuracy on the same episode, the learner's own transductive
    labels, and both reports say the inference was transductive; on the MAML checkpoint, one
    sentence."""
    ckpt, folder, episode, objects = omniglot["protonet"]
    args = (f"ckpt_path={ckpt}", f"support={folder / 'support'}", f"query={folder / 'query'}")
    predicted = command(PREDICT, tmp_path / "predict", *args, "transductive=bd_cspn")
    evaluated = command(
        EVAL, tmp_path / "eval", f"ckpt_path={ckpt}", "sampler.test_episodes=1", "algorithm.transductive=bd_cspn"
    )
    maml = command(PREDICT, tmp_path / "maml", f"ckpt_path={omniglot['maml'][0]}", *args[1:], "transductive=tim")
    done, ev, refused = finish(predicted), finish(evaluated), finish(maml)
    assert done.returncode == 0, done.stderr[-3000:]
    assert ev.returncode == 0, ev.stderr[-3000:]
    report = json.loads((tmp_path / "predict" / "predict.json").read_text())
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert report["inference"] == results["experiment"]["inference"] == "transductive (BD-CSPN)"
    assert "inference: transductive (BD-CSPN)" in done.stdout and "inference: transductive (BD-CSPN)" in ev.stdout
    assert report["accuracy"]["mean"] == results["test"]["accuracy"]["mean"]
    module = objects["module"]
    module.load_state_dict(torch.load(ckpt, weights_only=True)["state_dict"])
    module.eval()
    module.algorithm.transductive = "bd_cspn"
    with torch.no_grad():
        logits = module.algorithm.predict(collate_episodes([episode])).query_logits[0]
    module.algorithm.transductive = "none"
    assert [r["predicted"] for r in predictions(tmp_path / "predict")] == [
        f"class_{i}" for i in logits.argmax(-1).tolist()
    ]
    assert refused.returncode == 2
    assert_one_sentence(refused.stderr.strip().splitlines()[-1], "transductive=tim", "MAML", "protonet")


def test_an_image_on_disk_reads_back_as_its_training_tensor(omniglot, tmp_path):
    ckpt, _, _, objects = omniglot["protonet"]
    dataset = objects["dataset"]
    with zipfile.ZipFile(data_dir() / "omniglot" / "images_background.zip") as archive:
        first = sorted(n for n in archive.namelist() if n.endswith(".png"))[0]
        (tmp_path / "drawing.png").write_bytes(archive.read(first))  # the original 105x105 file
    training = dataset.images[0].float().div(255.0)  # the decoded, cached training image
    learner = load(ckpt)
    assert torch.equal(learner.image(tmp_path / "drawing.png"), training)
    assert torch.equal(learner.image(Image.open(tmp_path / "drawing.png")), training)


def test_learner_refuses_bad_support_in_python(omniglot):
    ckpt = omniglot["maml"][0]
    learner = load(ckpt)
    blank = [torch.zeros(1, 28, 28)] * 3
    with pytest.raises(metarun.errors.ConfigError) as caught:
        learner.adapt(blank, ["a", "b", "c"])
    assert_one_sentence(str(caught.value), "3 classes", "classifier head has 5 outputs", "protonet")
    with pytest.raises(metarun.errors.ConfigError, match="at least 2 classes"):
        load(omniglot["protonet"][0]).adapt(blank, ["a", "a", "a"])


# ------------------------------------------------------------------ bad input, via the command


def write_images(folder: Path, count: int, mode: str = "L") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        colour = 200 if mode == "L" else (200, 30, 30)
        Image.new(mode, (28, 28), colour).save(folder / f"{i}.png")


def test_bad_input_is_one_sentence(omniglot, tmp_path):
    proto, maml = omniglot["protonet"][0], omniglot["maml"][0]
    good = tmp_path / "good"
    for c in "ab":
        write_images(good / c, 2)
    write_images(tmp_path / "queries", 2)
    cases = {
        "empty_class": (proto, {"a": 2, "b": 0}, "its class folder 'b' holds no readable images"),
        "one_class": (proto, {"a": 2}, "it holds 1 class folder (a), so give at least 2 class"),
        "fixed_head": (
            maml,
            {"a": 1, "b": 1, "c": 1},
            "it holds 3 classes but the model's classifier head has 5 outputs",
        ),
    }
    procs = {}
    for name, (ckpt, counts, _) in cases.items():
        for c, n in counts.items():
            write_images(tmp_path / name / c, n) if n else (tmp_path / name / c).mkdir(parents=True)
        procs[name] = command(
            PREDICT,
            tmp_path / f"run_{name}",
            f"ckpt_path={ckpt}",
            f"support={tmp_path / name}",
            f"query={tmp_path / 'queries'}",
        )
    (tmp_path / "no_images").mkdir()
    (tmp_path / "no_images" / "notes.txt").write_text("not an image")
    procs["no_queries"] = command(
        PREDICT, tmp_path / "run_nq", f"ckpt_path={proto}", f"support={good}", f"query={tmp_path / 'no_images'}"
    )
    cases["no_queries"] = (proto, {}, f"query={tmp_path / 'no_images'} is not allowed: it holds no readable images")
    (tmp_path / "text.ckpt").write_text("hello")
    procs["checkpoint"] = command(
        PREDICT,
        tmp_path / "run_ck",
        f"ckpt_path={tmp_path / 'text.ckpt'}",
        f"support={good}",
        f"query={tmp_path / 'queries'}",
    )
    cases["checkpoint"] = (proto, {}, "is not allowed: it is not a PyTorch checkpoint")
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    procs["out_dir"] = command(
        PREDICT, blocker / "run", f"ckpt_path={proto}", f"support={good}", f"query={tmp_path / 'queries'}"
    )
    cases["out_dir"] = (proto, {}, "the directory cannot be created (Not a directory)")
    procs["unset"] = command(PREDICT, tmp_path / "run_unset", f"ckpt_path={proto}")
    cases["unset"] = (proto, {}, "support is not set: metarun-predict needs ckpt_path=<.ckpt>")
    for name, proc in procs.items():
        done = finish(proc)
        assert done.returncode == 2, (name, done.stderr[-2000:])
        errors = [line for line in done.stderr.splitlines() if line.startswith("metarun: error:")]
        assert len(errors) == 1 and cases[name][2] in errors[0], (name, done.stderr[-2000:])
        assert_one_sentence(errors[0])
        assert "Traceback" not in done.stderr, name


def test_unreadable_files_are_skipped_and_colour_is_converted(omniglot, tmp_path):
    proto = omniglot["protonet"][0]
    support = tmp_path / "support"
    write_images(support / "a", 2, mode="RGB")  # colour images for a grey model
    write_images(support / "b", 2)
    (support / "b" / "broken.png").write_bytes(b"not a png at all")
    (support / "b" / "readme.txt").write_text("notes")
    write_images(tmp_path / "queries", 3)
    done = finish(
        command(PREDICT, tmp_path / "run", f"ckpt_path={proto}", f"support={support}", f"query={tmp_path / 'queries'}")
    )
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((tmp_path / "run" / "predict.json").read_text())
    assert report["support"] == {"a": 2, "b": 2} and report["queries"] == 3
    assert len(report["skipped"]) == 2 and report["converted"] == 2
    logged = done.stdout + done.stderr  # Hydra's log goes to the console and the run's log file
    assert "Skipped 2 files that are not readable images" in logged
    assert "Converted 2 images to grey" in logged
    assert "accuracy" not in report  # unlabelled queries
    assert len(predictions(tmp_path / "run")) == 3


def test_query_file_list(omniglot, tmp_path):
    ckpt, folder, _, _ = omniglot["protonet"]
    listing = tmp_path / "queries.txt"
    paths = sorted((folder / "query").rglob("*.png"))
    listing.write_text("\n".join(str(p) for p in paths) + f"\n{tmp_path / 'gone.png'}\n")
    done = finish(
        command(PREDICT, tmp_path / "run", f"ckpt_path={ckpt}", f"support={folder / 'support'}", f"query={listing}")
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert [r["path"] for r in predictions(tmp_path / "run")] == [str(p) for p in paths]
    assert json.loads((tmp_path / "run" / "predict.json").read_text())["skipped"] == [
        f"{tmp_path / 'gone.png'} (no such file)"
    ]


# ------------------------------------------------------------------ regression


@pytest.fixture(scope="module")
def sinusoid_checkpoints(tmp_path_factory):
    out = {}
    for algorithm in ("cnp", "maml"):
        run = tmp_path_factory.mktemp(algorithm)
        train(compose_config([*TINY, f"algorithm={algorithm}"], run))
        out[algorithm] = run / "checkpoints" / "last.ckpt"
    return out


def write_points(path: Path, x: np.ndarray, y: np.ndarray | None) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["x", "y"] if y is not None else ["x"])
        for i in range(len(x)):
            writer.writerow([x[i], y[i]] if y is not None else [x[i]])


@pytest.mark.parametrize("algorithm", ["cnp", "maml"])
def test_regression_points(sinusoid_checkpoints, tmp_path, algorithm):
    ckpt = sinusoid_checkpoints[algorithm]
    x = np.linspace(-4, 4, 5)
    write_points(tmp_path / "support.csv", x, 2 * np.sin(x - 0.5))
    xq = np.linspace(-5, 5, 11)
    write_points(tmp_path / "query.csv", xq, 2 * np.sin(xq - 0.5))
    done = predict_command(ckpt, tmp_path / "support.csv", tmp_path / "query.csv", tmp_path / "run")
    assert done.returncode == 0, done.stderr[-2000:]
    rows = predictions(tmp_path / "run")
    assert len(rows) == 11 and ("std0" in rows[0]) == (algorithm == "cnp")
    report = json.loads((tmp_path / "run" / "predict.json").read_text())
    assert report["mse"]["queries"] == 11
    assert (tmp_path / "run" / "predictions.png").stat().st_size > 5000
    # the same as the algorithm's own meta-test prediction of that task
    learner = load(ckpt)
    mean, std = learner.adapt(x[:, None], 2 * np.sin(x - 0.5)[:, None]).predict(xq[:, None])
    assert [float(r["y0"]) for r in rows] == pytest.approx(mean[:, 0].tolist(), abs=1e-6)
    if algorithm == "cnp":
        assert (std > 0).all()


def test_regression_csv_without_y_is_one_sentence(sinusoid_checkpoints, tmp_path):
    write_points(tmp_path / "support.csv", np.linspace(-1, 1, 3), None)
    done = predict_command(
        sinusoid_checkpoints["cnp"], tmp_path / "support.csv", tmp_path / "support.csv", tmp_path / "run"
    )
    assert done.returncode == 2
    assert (
        f"metarun: error: support={tmp_path / 'support.csv'} is not allowed: it has no rows "
        f"with columns x… and y… (found x)"
    ) in done.stderr


@pytest.fixture(scope="module")
def rgb_checkpoint(tmp_path_factory):
    """ProtoNet trained 3 steps on an RGB class folder (normalised by the dataset's mean/std)."""
    from tests.datasets.standins import image_folder

    root = image_folder(tmp_path_factory.mktemp("folder"), classes=9, per_class=4, size=20)
    run = tmp_path_factory.mktemp("rgb")
    cfg = compose_config(
        [
            *TINY,
            "dataset=image_folder",
            f"dataset.root={root}",
            "dataset.image_size=16",
            "algorithm=protonet",
            "sampler.ways=2",
            "sampler.queries=2",
        ],
        run,
    )
    cfg.paths.cache_dir = str(run / "cache")
    _, objects = train(cfg)
    return run / "checkpoints" / "last.ckpt", objects


def test_an_rgb_image_reads_back_as_its_normalised_training_tensor(rgb_checkpoint):
    ckpt, objects = rgb_checkpoint
    dataset = objects["dataset"]
    train_split = dataset.split("train")
    name = dataset.classes("train")[1]
    file = sorted((dataset.root / name).iterdir())[0]
    first = int((train_split.labels == 1).nonzero()[0])
    mean, std = torch.tensor(dataset.mean).view(3, 1, 1), torch.tensor(dataset.std).view(3, 1, 1)
    training = (train_split.images[first].float().div(255.0) - mean) / std
    learner = load(ckpt)
    assert learner.channels == 3
    torch.testing.assert_close(learner.image(file), training)


def test_grey_images_for_an_rgb_model_are_converted_and_counted(rgb_checkpoint):
    learner = load(rgb_checkpoint[0])
    grey = learner.image(Image.new("L", (10, 10), 128))
    assert grey.shape == (3, 16, 16) and learner.converted == 1
    learner.image(Image.new("RGB", (10, 10), (1, 2, 3)))
    assert learner.converted == 1  # an RGB image for an RGB model is not a conversion


def test_the_picture_shows_the_images_colours(rgb_checkpoint, tmp_path):
    """predictions.png of an RGB model (normalised by ImageNet's statistics) draws pink as pink
    and green as green, within quantisation (the normalisation undone)."""
    colours = {"pink": (255, 192, 203), "green": (40, 180, 60)}
    for part in ("support", "query"):
        for name, rgb in colours.items():
            (tmp_path / part / name).mkdir(parents=True)
            Image.new("RGB", (20, 20), rgb).save(tmp_path / part / name / "0.png")
    done = predict_command(rgb_checkpoint[0], tmp_path / "support", tmp_path / "query", tmp_path / "run")
    assert done.returncode == 0, done.stderr[-3000:]
    picture = np.asarray(Image.open(tmp_path / "run" / "predictions.png").convert("RGB")).astype(int)
    for name, rgb in colours.items():
        assert (np.abs(picture - np.array(rgb)).max(-1) <= 3).sum() > 500, name


@pytest.fixture(scope="module")
def sinusoid_checkpoint(tmp_path_factory):
    """MAML trained 3 steps on sinusoids: a regression checkpoint."""
    run = tmp_path_factory.mktemp("sine")
    train(compose_config(TINY, run))
    return run / "checkpoints" / "last.ckpt"


def test_what_users_point_at_is_read_or_named(rgb_checkpoint, sinusoid_checkpoint, tmp_path, monkeypatch):
    """A file list written from the working directory is read; a regression checkpoint given
    folders says so; a text file named .png and a 20000 x 20000 image are skipped and counted
    (no stream object in the reasons)."""
    from tests.datasets.test_image_folder import huge_png

    for name, rgb in (("red", (200, 30, 30)), ("blue", (30, 30, 200))):
        (tmp_path / "support" / name).mkdir(parents=True)
        Image.new("RGB", (20, 20), rgb).save(tmp_path / "support" / name / "0.png")
    queries = tmp_path / "queries"
    queries.mkdir()
    Image.new("RGB", (20, 20), (190, 40, 40)).save(queries / "a.png")
    (queries / "notes.png").write_text("not a picture")
    huge_png(queries / "scan.png", 20000, 20000)
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "list.txt").write_text(
        "queries/a.png\nqueries/notes.png\nqueries/scan.png\n"
    )  # from tmp_path
    monkeypatch.chdir(tmp_path)
    learner = load(rgb_checkpoint[0])
    from metarun.predict import read_queries, read_support

    skipped: list[str] = []
    images, labels = read_queries(learner, "lists/list.txt", ["red", "blue"], skipped)
    assert [p.name for p, _ in images] == ["a.png"] and labels is None
    assert skipped == [
        "queries/notes.png (it is not an image PIL can read (its contents are not PNG, JPEG or another image format))",
        "queries/scan.png (too large: 400,000,000 pixels, more than 89,478,485; dataset.max_image_pixels allows more)",
    ]
    with pytest.raises(metarun.errors.ConfigError, match=r"support=lists/list.txt is not allowed: it is a file, and"):
        read_support(learner, "lists/list.txt", [])
    # through the command: counted in predict.json
    done = predict_command(rgb_checkpoint[0], tmp_path / "support", queries, tmp_path / "run")
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "run" / "predict.json").read_text())
    assert report["queries"] == 1 and len(report["skipped"]) == 2 and "BytesIO" not in done.stderr
    # a regression checkpoint given image folders
    done = predict_command(sinusoid_checkpoint, tmp_path / "support", queries, tmp_path / "sine")
    assert done.returncode == 2 and done.stderr.strip().splitlines()[-1] == (
        f"metarun: error: support={tmp_path / 'support'} is not allowed: it is a folder, but this checkpoint "
        f"was trained on regression tasks, so give a CSV file with columns x... and y... (an image checkpoint "
        f"takes folders)."
    )


@pytest.mark.parametrize("algorithm", algorithms("classification"))
def test_every_learner_labels_a_users_examples_as_its_meta_test_does(algorithm, tmp_path):
    """For every classification learner in conf/ (derived, no list): `metarun.load`'s Learner, the
    code behind `metarun-predict`, rebuilt from a checkpoint of the learner, gives the labels
    and probabilities of the learner's own `predict` on the same 5-way 1-shot episode."""
    cfg = compose_config(
        [
            *TINY,
            "dataset=omniglot",
            "model.hidden=8",
            f"algorithm={algorithm}",
            *NEEDS.get((algorithm, "classification"), []),
        ],
        tmp_path,
    )
    objects = build_learner(cfg)
    algorithm_ = objects["module"].algorithm.eval()
    checkpoint = {
        "metarun_config": OmegaConf.to_container(cfg, resolve=True),
        "state_dict": objects["module"].state_dict(),
    }
    generator = torch.Generator().manual_seed(0)
    support = torch.rand(5, 1, 28, 28, generator=generator)  # one image of each of 5 classes
    queries = torch.rand(7, 1, 28, 28, generator=generator)
    names = [f"class_{i}" for i in range(5)]
    episode = EpisodeBatch(
        support[None],
        torch.arange(5)[None],
        queries[None],
        torch.zeros(1, 7, dtype=torch.long),
        None,
        torch.zeros(1, dtype=torch.long),
    )
    with torch.no_grad():
        expected = algorithm_.query_probabilities(algorithm_.predict(episode).query_logits)[0]  # [7, 5]
    labels, probabilities = Learner(checkpoint, "in memory").adapt(list(support), names).predict(list(queries))
    assert labels == [names[i] for i in expected.argmax(-1).tolist()]
    torch.testing.assert_close(probabilities, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("algorithm", algorithms("regression"))
def test_every_regression_learner_predicts_a_users_points_as_its_meta_test_does(algorithm, tmp_path):
    """The same for every regression learner: the Learner's mean (and std) on a user's points
    are the learner's own `predict` on the same sinusoid task."""
    cfg = compose_config([*TINY, f"algorithm={algorithm}", *NEEDS.get((algorithm, "regression"), [])], tmp_path)
    objects = build_learner(cfg)
    algorithm_ = objects["module"].algorithm.eval()
    checkpoint = {
        "metarun_config": OmegaConf.to_container(cfg, resolve=True),
        "state_dict": objects["module"].state_dict(),
    }
    x = torch.linspace(-5, 5, 15)[:, None]  # [15, 1]
    y = torch.sin(x)
    episode = EpisodeBatch(
        x[None, :10], y[None, :10], x[None, 10:], torch.zeros(1, 5, 1), None, torch.zeros(1, dtype=torch.long)
    )
    with torch.no_grad():
        expected = algorithm_.predict(episode)
    mean, std = Learner(checkpoint, "in memory").adapt(x[:10], y[:10]).predict(x[10:])
    torch.testing.assert_close(mean, expected.query_logits[0], rtol=0, atol=1e-6)
    assert (std is None) == (expected.query_std is None)
