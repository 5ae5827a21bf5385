"""model.init_from: a backbone starts from another run (or a weights file) exactly, the lineage
is kept and shown, and a source that does not fit is one sentence through the command."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from metarun.build import build_learner
from metarun.runner import train
from tests.conftest import EVAL, PREDICT, TINY, compose_config, data_dir, finish, launch

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

SMALL = ["dataset=omniglot", "model.hidden=8", "sampler.ways=3", "sampler.queries=2"]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    """A finished 3-step ``algorithm=pretrain`` run on Omniglot (Conv4, 8 channels)."""
    root = data_dir()
    if root is None or not (root / "omniglot" / "images_background.zip").exists():
        pytest.skip("METARUN_DATA_DIR with omniglot/ is not set (.ci/run sets it)")
    run = tmp_path_factory.mktemp("pretrain")
    train(compose_config([*TINY, *SMALL, "algorithm=pretrain", "sampler.batch_size=16"], run))
    return run


def backbone_of(ckpt: Path) -> dict[str, torch.Tensor]:
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    return {k.removeprefix("algorithm.model."): v for k, v in state.items() if k.startswith("algorithm.model.")}


def test_every_backbone_tensor_is_copied_bitwise_from_a_run_a_checkpoint_or_a_file(pretrained, tmp_path):
    best = Path(json.loads((pretrained / "results.json").read_text())["val"]["best_checkpoint"])
    source = backbone_of(best)
    torch.save(source, tmp_path / "conv4.pth")
    for init_from, file in ((pretrained, best), (best, best), (tmp_path / "conv4.pth", tmp_path / "conv4.pth")):
        cfg = compose_config([*TINY, *SMALL, "algorithm=maml", f"model.init_from={init_from}"], tmp_path)
        learner = build_learner(cfg)
        state = learner["algorithm"].model.state_dict()
        assert set(source) == {k for k in state if not k.startswith("head.")}
        for key, value in source.items():
            assert torch.equal(state[key], value), key
        # MAML's 3-way head is its own, freshly initialised: never the source's
        fresh = build_learner(compose_config([*TINY, *SMALL, "algorithm=maml"], tmp_path))["algorithm"].model
        assert torch.equal(state["head.weight"], fresh.state_dict()["head.weight"])
        lineage = learner["lineage"]
        assert lineage["init_from"] == str(file.resolve())
        assert lineage["sha256"] == hashlib.sha256(file.read_bytes()).hexdigest()
        assert (lineage["source_config"] or {}).get("algorithm", {}).get("_target_", "").endswith(
            "Pretrain"
        ) == file.suffix.endswith("ckpt")


def test_a_torchvision_state_dict_fills_the_wrapped_model(tmp_path):
    import torchvision

    imagenet = torchvision.models.resnet18()
    torch.save(imagenet.state_dict(), tmp_path / "resnet18.pth")
    cfg = compose_config(
        [
            *TINY,
            "dataset=mini_imagenet",
            "algorithm=protonet",
            "model=torchvision",
            f"model.init_from={tmp_path}/resnet18.pth",
        ],
        tmp_path,
    )
    model = build_learner(cfg)["algorithm"].model
    for key, value in imagenet.state_dict().items():
        if not key.startswith("fc."):
            assert torch.equal(model.features.state_dict()[key], value), key


def test_lineage_is_in_results_and_shown_by_eval_and_predict(pretrained, tmp_path):
    from tests.test_predict import write_images

    run = tmp_path / "meta_baseline"
    results, _ = train(compose_config([*TINY, *SMALL, "algorithm=meta_baseline", f"model.init_from={pretrained}"], run))
    assert results["lineage"]["source_config"]["algorithm"]["_target_"].endswith("Pretrain")
    for name in ("a", "b"):
        write_images(tmp_path / "support" / name, 1)
    write_images(tmp_path / "query", 2)
    ckpt = run / "checkpoints" / "last.ckpt"
    evaluated = launch(tmp_path / "eval", f"ckpt_path={ckpt}", "sampler.test_episodes=2", command=EVAL)
    predicted = launch(
        tmp_path / "predict",
        f"ckpt_path={ckpt}",
        f"support={tmp_path / 'support'}",
        f"query={tmp_path / 'query'}",
        command=PREDICT,
    )
    shown = f"backbone initialised from {results['lineage']['init_from']} (Pretrain on Omniglot)"
    for proc, out, name in ((evaluated, "eval", "results.json"), (predicted, "predict", "predict.json")):
        done = finish(proc)
        assert done.returncode == 0, done.stderr[-3000:]
        assert shown in done.stdout
        assert json.loads((tmp_path / out / name).read_text())["lineage"] == results["lineage"]


def test_a_source_that_does_not_fit_is_one_sentence_through_the_command(pretrained, tmp_path):
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7)}, tmp_path / "other.pth")
    cases = {
        "architecture": (
            ["model=resnet12", "model.widths=[4,4,4,4]", f"model.init_from={pretrained}"],
            f"model.init_from={pretrained} is not allowed: its weights do not fit the ResNet12 built from model.* "
            "(it lacks features.0.conv1.weight, ",
        ),
        "file": (
            ["model.hidden=8", f"model.init_from={tmp_path / 'other.pth'}"],
            f"model.init_from={tmp_path / 'other.pth'} is not allowed: its weights do not fit the Conv4 built from "
            "model.* (it lacks features.0.weight, features.0.bias, features.1.weight (and ",
        ),
        "missing": (
            [f"model.init_from={tmp_path / 'nope'}"],
            f"model.init_from={tmp_path / 'nope'} is not allowed: no such file or directory, so give a metarun run "
            "directory, a .ckpt file or a weights file.",
        ),
        "unfinished": (
            [f"model.init_from={tmp_path}"],
            f"model.init_from={tmp_path} is not allowed: the directory holds no finished metarun run",
        ),
    }
    procs = {
        name: launch(tmp_path / name, *TINY, "dataset=omniglot", "algorithm=protonet", *overrides)
        for name, (overrides, _) in cases.items()
    }
    for name, proc in procs.items():
        done = finish(proc)
        assert done.returncode == 2, (name, done.stderr[-2000:])
        assert f"metarun: error: {cases[name][1]}" in done.stderr, (name, done.stderr[-2000:])
        assert "Traceback" not in done.stderr
