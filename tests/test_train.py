"""The runner end to end: every config option, results.json, determinism, resume, W&B, sweeps.

Everything runs the default sinusoid + MLP configuration for a few outer steps on CPU.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from omegaconf import OmegaConf, open_dict

import metarun.tracking
from metarun.algorithms.protonet import ProtoNet
from metarun.build import build_learner, complete_config
from metarun.catalog import classes, preset_choice
from metarun.errors import ConfigError
from metarun.module import MetaLearningModule
from metarun.runner import train
from tests.conftest import CONFIG_DIR, FP32_HERE, ROOT, TINY, compose_config, finish, launch, on_standins

# TINY, plus: 4 outer steps (validation at 2 and 4), 2 evaluation episodes of 10 query
# points, 2 test-time inner steps (MAML).
FAST = [
    *TINY,
    "trainer.max_steps=4",
    "sampler.val_episodes=2",
    "sampler.test_episodes=2",
    "sampler.queries=10",
    "algorithm.test_inner_steps=2",
]


def run(directory: Path, *overrides: str):
    return train(compose_config([*FAST, *overrides], directory))


pytestmark = pytest.mark.usefixtures("one_thread")


def state(ckpt: Path) -> dict[str, torch.Tensor]:
    return torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    """The default configuration (MAML, CSV logger, CPU) for 4 steps."""
    out = tmp_path_factory.mktemp("default")
    cfg = compose_config([*FAST, "logger=csv"], out)
    results, objects = train(cfg)
    return results, objects, out, cfg


# ------------------------------------------------------------------ config groups


def test_default_run_is_maml_with_csv_on_cpu(default_run):
    results, objects, out, _ = default_run
    assert results["experiment"]["algorithm"] == "MAML"
    assert objects["algorithm"].first_order is False
    assert isinstance(objects["trainer"].logger, CSVLogger)
    with open(out / "csv" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert sum(1 for r in rows if r.get("train/loss")) == 4  # log_every_n_steps=1
    val = [float(r["val/mse"]) for r in rows if r.get("val/mse")]
    assert len(val) == 2  # steps 2 and 4
    # val block: the best of the two validations, and the step it happened at
    assert results["val"]["best_mse"] == pytest.approx(min(val), rel=1e-6)
    assert results["val"]["best_step"] == 2 * (val.index(min(val)) + 1)
    assert results["val"]["best_checkpoint"] == str(
        out / "checkpoints" / f"step_{results['val']['best_step']:06d}.ckpt"
    )
    test_rows = [r for r in rows if r.get("test/mse")]
    assert float(test_rows[-1]["test/mse"]) == pytest.approx(results["test"]["mse"]["mean"])
    env = results["environment"]
    assert (env["device"], env["precision"], env["world_size"]) == ("cpu", "32-true", 1)
    # last.ckpt is the latest state (step 4) even when the last validation was not the best
    assert torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["global_step"] == 4


def check_fomaml(results, objects):
    assert objects["algorithm"].first_order is True
    assert results["config"]["algorithm"]["first_order"] is True
    assert results["experiment"]["algorithm"] == "MAML"


def check_no_logger(results, objects):
    assert objects["trainer"].logger is None
    assert not (Path(results["config"]["paths"]["output_dir"]) / "csv").exists()


def check_bf16(results, objects):
    assert results["environment"]["precision"] == "bf16-mixed"
    assert objects["trainer"].precision == "bf16-mixed"
    assert next(objects["algorithm"].parameters()).dtype == torch.float32  # autocast only


@pytest.mark.parametrize(
    "override, check",
    [("algorithm=fomaml", check_fomaml), ("logger=none", check_no_logger), ("hardware=bf16", check_bf16)],
    ids=["fomaml", "logger_none", "bf16"],
)
def test_config_option_runs(tmp_path, override, check):
    results, objects = run(tmp_path, override)
    assert results["train"]["steps"] == 4
    assert results["test"]["mse"]["episodes"] == 2
    assert all(torch.isfinite(torch.tensor(v["mean"])) for v in results["test"].values())
    check(results, objects)


EXPERIMENTS = sorted(p.stem for p in (Path(CONFIG_DIR) / "experiment").glob("*.yaml"))


def leaves(node, prefix=""):
    """(dotted key, value) of every leaf of a plain dict."""
    for key, value in node.items():
        if isinstance(value, dict):
            yield from leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_preset_composes(tmp_path, name):
    cfg = compose_config([f"experiment={name}"], tmp_path)
    preset = yaml.safe_load((Path(CONFIG_DIR) / "experiment" / f"{name}.yaml").read_text())
    preset.pop("defaults", None)
    raw = dict(leaves(OmegaConf.to_container(cfg, resolve=False)))  # interpolations as written
    for key, value in leaves(preset):  # the preset's values win over the groups' defaults
        assert raw[key] == value, key
    for group in ("dataset", "sampler", "algorithm", "model", "trainer", "optimizer"):
        assert group in cfg
    OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
    # what the data decides stays with the data: a pinned 4112 broke dataset.train_on=train+val
    assert OmegaConf.select(cfg, "algorithm.num_train_classes", default="auto") == "auto"


def one_per_family(names: list[str]) -> list[str]:
    """One preset of each (algorithm, dataset, backbone), the one with the fewest ways (the
    quickest; then by name): the others differ in settings the composition test above checks
    key by key (shots, ways, lengths, rates)."""

    def ways(name: str) -> int:
        found = re.search(r"_(\d+)w\d+s$", name)
        return int(found.group(1)) if found else 0

    seen, out = set(), []
    for name in sorted(names, key=lambda n: (ways(n), n)):
        family = tuple(preset_choice(name, group) for group in ("algorithm", "dataset", "model"))
        if family not in seen:
            seen.add(family)
            out.append(name)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", one_per_family(EXPERIMENTS))
def test_experiment_preset_runs_a_few_steps(tmp_path, name, request):
    """One preset of each family, as written (in fp32 where this CPU's bf16 is emulated),
    trains 2 outer steps of 1 task (meta-batches are tested elsewhere, in float64) and tests 2
    episodes (image benchmarks on their stand-ins, with 1 query per class: 6 images per class;
    a ResNet-12 or R2-D2's network with 8 channels per stage, their sizes tested in tests/models/,
    and a Conv4 wider than 64 filters with 8)."""
    cfg = compose_config(
        [
            f"experiment={name}",
            *FP32_HERE,
            "trainer.max_steps=2",
            "trainer.val_check_interval=2",
            "sampler.meta_batch_size=1",
            "sampler.batch_size=8",
            "sampler.val_episodes=2",
            "sampler.test_episodes=2",
            "sampler.eval_batch_size=2",
            "trainer.enable_progress_bar=false",
            "logger=none",
        ],
        tmp_path,
    )
    if cfg.dataset._target_.endswith("Omniglot") and not Path(cfg.dataset.root).exists():
        pytest.skip("METARUN_DATA_DIR with omniglot/ is not set (.ci/run sets it)")
    on_standins(cfg, request)
    with open_dict(cfg):
        if "widths" in cfg.model:  # ResNet-12, R2-D2's network: the wiring, not the size
            cfg.model.widths = [8] * len(cfg.model.widths)  # (their sizes: tests/models/)
        if cfg.model._target_.endswith("Conv4") and cfg.model.hidden > 64:
            cfg.model.hidden = 8  # a wide Conv4 (CAVIA's 512 filters) likewise
    results, _ = train(cfg)
    assert results["status"] == "completed" and results["train"]["steps"] == 2
    assert all(math.isfinite(block["mean"]) for block in results["test"].values())


IMAGE_PRESETS = [n for n in EXPERIMENTS if preset_choice(n, "dataset") not in (None, "sinusoid")]


@pytest.mark.parametrize("model", ["resnet12", "timm"])
@pytest.mark.parametrize("name", one_per_family(IMAGE_PRESETS))
def test_a_preset_takes_another_backbone_or_says_why(tmp_path, name, model, request):
    """``experiment=<image preset> model=<other backbone>``: the learner builds (the memory
    layout, channels_last, is the runner's, for any backbone), or one sentence names the
    preset's setting the backbone does not take (a key it has not, or a value it has not: timm
    has no ``resnet10``)."""
    cfg = compose_config([f"experiment={name}", f"model={model}"], tmp_path)
    on_standins(cfg, request)  # a whole-class learner counts the training classes
    try:
        objects = build_learner(cfg)
    except ConfigError as error:
        assert str(error).startswith("model.") and (
            "is not allowed with model=" in str(error) or "is not allowed: timm has no such model" in str(error)
        )
        assert str(error).count(". ") == 0 and str(error).endswith(".")
    else:
        assert objects["algorithm"].model.__class__.__name__ in ("ResNet12", "TimmBackbone")


def test_swapping_the_backbone_of_a_preset_through_the_command(omniglot_available, tmp_path):
    """The fast-path preset (bf16 + channels_last) with ResNet-12 (8 channels per stage: the
    wiring) trains; with a timm model its batch-norm mode is one sentence (exit 2)."""
    common = [*TINY, f"paths.data_dir={omniglot_available}", "experiment=protonet_omniglot_5w1s", *FP32_HERE]
    resnet = finish(
        launch(tmp_path / "resnet12", *common, "model=resnet12", "model.widths=[8,8,8,8]", "sampler.train_ways=5")
    )
    assert resnet.returncode == 0, resnet.stderr[-3000:]
    assert json.loads((tmp_path / "resnet12" / "results.json").read_text())["train"]["steps"] == 3
    timm = finish(launch(tmp_path / "timm", *common, "model=timm"))
    assert timm.returncode == 2 and timm.stderr.strip().splitlines() == [
        "metarun: error: model.norm=running is not allowed with model=TimmBackbone: it takes no norm (it takes "
        "name, in_channels, image_size, out_features, weights), so drop that setting or choose a model that has it."
    ]


def test_protonet_on_omniglot(omniglot_available, tmp_path):
    overrides = [o for o in FAST if not o.startswith("algorithm.")]  # ProtoNet has no inner loop
    results, objects = train(
        compose_config(
            [
                *overrides,
                "dataset=omniglot",
                "algorithm=protonet",
                "model.hidden=8",
                "sampler.ways=3",
                "sampler.queries=2",
                "trainer.max_steps=2",
            ],
            tmp_path,
        )
    )
    assert (
        results["experiment"].items()
        >= {"algorithm": "ProtoNet", "dataset": "Omniglot", "ways": 3, "shots": 1, "queries": 2}.items()
    )
    assert objects["algorithm"].model.head is None
    acc = results["test"]["accuracy"]
    assert acc["episodes"] == 2 and 0.0 <= acc["mean"] <= 1.0
    assert "accuracy_before_adaptation" not in results["test"]
    assert not (tmp_path / "test_tasks.png").exists()  # plots are for regression only


# ------------------------------------------------------------------ results.json


def test_results_json_schema_and_plot(default_run):
    results, _, out, cfg = default_run
    saved = json.loads((out / "results.json").read_text())
    assert saved == {k: v for k, v in results.items() if k != "plot"}
    assert set(saved) == {"status", "experiment", "test", "val", "train", "environment", "config"}
    assert saved["status"] == "completed"
    assert (
        saved["experiment"].items()
        >= {"algorithm": "MAML", "dataset": "Sinusoid", "ways": 1, "shots": 10, "queries": 10, "seed": 0}.items()
    )
    assert set(saved["test"]) == {"mse", "mse_before_adaptation"}
    for block in saved["test"].values():
        assert set(block) == {"mean", "ci95", "episodes"}
        assert block["episodes"] == 2 and block["ci95"] > 0 and block["mean"] > 0
    assert {"best_mse", "best_step"} <= set(saved["val"])
    assert isinstance(saved["val"]["best_mse"], float) and saved["val"]["best_step"] in (2, 4)
    train_block = saved["train"]
    assert {"steps", "tasks", "tasks_per_second", "wall_seconds", "last_checkpoint"} <= set(train_block)
    assert train_block["last_checkpoint"] == str(out / "checkpoints" / "last.ckpt")
    assert (train_block["steps"], train_block["tasks"]) == (4, 8)  # meta_batch_size=2
    assert train_block["wall_seconds"] > 0
    assert train_block["tasks_per_second"] == pytest.approx(8 / train_block["wall_seconds"])
    assert (
        saved["environment"].items()
        >= {"torch": torch.__version__, "device": "cpu", "world_size": 1, "precision": "32-true"}.items()
    )
    assert saved["config"] == OmegaConf.to_container(cfg, resolve=True)
    plot = out / "test_tasks.png"
    assert results["plot"] == str(plot)
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 10_000


# ------------------------------------------------------------------ determinism


def test_same_seed_same_metrics_other_seed_other_metrics(default_run, tmp_path):
    reference, _, out, _ = default_run
    again, _ = run(tmp_path / "again", "logger=csv")
    assert again["test"] == reference["test"]
    assert again["val"]["best_mse"] == reference["val"]["best_mse"]
    for key, value in state(out / "checkpoints" / "last.ckpt").items():
        assert torch.equal(value, state(tmp_path / "again" / "checkpoints" / "last.ckpt")[key])
    other, _ = run(tmp_path / "other", "logger=csv", "seed=1")
    assert other["experiment"]["seed"] == 1
    assert other["test"]["mse"]["mean"] != reference["test"]["mse"]["mean"]
    assert other["val"]["best_mse"] != reference["val"]["best_mse"]


# ------------------------------------------------------------------ resume

RESUME = ["trainer.val_check_interval=2"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("A")
    results, _ = run(out, *RESUME, "trainer.max_steps=6")
    return results, out


@pytest.mark.parametrize("how", ["path", "last"])
def test_resume_equals_an_uninterrupted_run(uninterrupted, tmp_path, monkeypatch, how):
    a_results, a_dir = uninterrupted
    b_dir = tmp_path / "B"
    run(b_dir, *RESUME, "trainer.max_steps=4")  # interrupted after 4 of 6 steps
    last = b_dir / "checkpoints" / "last.ckpt"
    assert torch.load(last, map_location="cpu", weights_only=False)["global_step"] == 4
    steps = []
    original = MetaLearningModule.training_step

    def counting(self, batch, batch_idx):
        steps.append(self.global_step)
        return original(self, batch, batch_idx)

    monkeypatch.setattr(MetaLearningModule, "training_step", counting)
    ckpt = str(last) if how == "path" else "last"
    b_results, _ = run(b_dir, *RESUME, "trainer.max_steps=6", f"ckpt_path={ckpt}")
    assert steps == [4, 5]  # resumed: only the remaining two steps were trained
    assert b_results["train"]["resumed_from"] == str(last)
    assert b_results["train"]["steps"] == a_results["train"]["steps"] == 6
    assert b_results["train"]["tasks"] == 12  # meta_batch_size=2, all steps of the run
    assert b_results["train"]["tasks_per_second"] == pytest.approx(  # this process: 2 steps
        2 * 2 / b_results["train"]["wall_seconds"]
    )
    assert b_results["test"] == a_results["test"]
    assert (b_results["val"]["best_mse"], b_results["val"]["best_step"]) == (
        a_results["val"]["best_mse"],
        a_results["val"]["best_step"],
    )
    a_state, b_state = state(a_dir / "checkpoints" / "last.ckpt"), state(last)
    assert a_state.keys() == b_state.keys()
    for key in a_state:
        torch.testing.assert_close(b_state[key], a_state[key], rtol=0, atol=1e-6)


# ------------------------------------------------------------------ Weights & Biases


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    """No API key, no network, every W&B folder under tmp_path; WANDB_MODE restored."""
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_MODE", "unset")  # recorded, so teardown restores the original
    monkeypatch.delenv("WANDB_MODE")
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb_home" / var.lower()))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setattr(metarun.tracking, "_wandb_reachable", lambda *a, **k: False)


def wandb_records(run_dir: Path, timeout: float = 60.0) -> list:
    """The records of a finished offline run, waiting for W&B's service to write them all:
    `Run.finish` can return before the ``run-*.wandb`` file is flushed."""
    deadline = time.monotonic() + timeout
    while True:
        records = read_wandb_file(next(run_dir.glob("run-*.wandb")))
        if (records and records[-1].WhichOneof("record_type") == "exit") or time.monotonic() > deadline:
            return records
        time.sleep(0.2)


def read_wandb_file(path: Path) -> list:
    """The protobuf records of a ``run-*.wandb`` file (LevelDB log format)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert not data or data[:4] == b":W&B"
    records, pos, block, partial = [], 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # block trailer padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if pos + 7 + length > len(data):  # still being written
            break
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 0:
            continue
        partial = chunk if kind in (1, 2) else partial + chunk
        if kind in (1, 4):  # FULL or LAST
            record = wandb_internal_pb2.Record()
            record.ParseFromString(partial)
            records.append(record)
    return records


def test_wandb_offline_run_per_train_call(offline_wandb, tmp_path):
    for name, seed in (("first", 0), ("second", 1)):  # two runs in one process, like a sweep
        out = tmp_path / name
        results, objects = run(out, "logger=wandb", f"seed={seed}")
        assert isinstance(objects["trainer"].logger, WandbLogger)
        runs = list((out / "wandb").glob("offline-run-*"))
        assert len(runs) == 1, f"{name}: {runs}"  # its own run, not the previous one reused
        records = wandb_records(runs[0])
        config = {
            item.key or "/".join(item.nested_key): json.loads(item.value_json)
            for r in records
            if r.WhichOneof("record_type") == "config"
            for item in r.config.update
        }
        assert config["seed"] == seed and config["paths"]["output_dir"] == str(out)
        assert config["algorithm"]["_target_"] == "metarun.algorithms.maml.MAML"
        history = [
            {i.key or "/".join(i.nested_key): i.value_json for i in r.history.item}
            for r in records
            if r.WhichOneof("record_type") == "history"
        ]
        assert any("train/loss" in h for h in history)
        assert json.loads(next(h for h in history if "test/mse" in h)["test/mse"]) == (results["test"]["mse"]["mean"])
        assert any(h.get("test/_type") == '"table-file"' for h in history)
        assert records[-1].WhichOneof("record_type") == "exit"  # the run was finished
        tables = list(runs[0].glob("files/media/table/test_*.table.json"))
        assert len(tables) == 1
        assert json.loads(tables[0].read_text()) == {
            "columns": ["metric", "mean", "ci95", "episodes"],
            "data": [[k, v["mean"], v["ci95"], v["episodes"]] for k, v in results["test"].items()],
        }
        images = {p.name.split("_")[0] + "_" + p.name.split("_")[1] for p in runs[0].glob("files/media/images/*.png")}
        assert images == {"learning_curves", "test_tasks"}  # the run's pictures, as on disk
    assert "WANDB_MODE" not in os.environ  # offline mode did not leak into the process


def test_wandb_failure_falls_back_to_csv(offline_wandb, tmp_path, monkeypatch):
    class BrokenWandb(WandbLogger):
        def __init__(self, *args, **kwargs):
            raise RuntimeError("wandb cannot start")

    monkeypatch.setattr(metarun.tracking, "WandbLogger", BrokenWandb)
    results, objects = run(tmp_path, "logger=wandb")
    logger = objects["trainer"].logger
    assert isinstance(logger, CSVLogger) and not isinstance(logger, WandbLogger)
    metrics = Path(logger.log_dir) / "metrics.csv"
    assert metrics.parent.parent == tmp_path / "csv"
    with open(metrics) as f:
        rows = list(csv.DictReader(f))
    assert float(next(r for r in rows if r.get("test/mse"))["test/mse"]) == pytest.approx(
        results["test"]["mse"]["mean"]
    )
    assert (tmp_path / "results.json").exists() and not (tmp_path / "wandb").exists()


# ------------------------------------------------------------------ Hydra multirun


def test_multirun_sweep_from_the_command_line(tmp_path):
    sweep = tmp_path / "sweep"
    command = [
        str(Path(sys.executable).parent / "metarun"),
        "-m",
        "algorithm=maml,fomaml",
        "sampler.shots=5,10",
        "trainer.max_steps=2",
        "trainer.val_check_interval=2",
        "sampler.val_episodes=2",
        "sampler.test_episodes=2",
        "logger=none",
        "sampler.meta_batch_size=2",
        "algorithm.test_inner_steps=2",
        "trainer.enable_progress_bar=false",
        f"hydra.sweep.dir={sweep}",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and p.name.isdigit())
    assert [p.name for p in jobs] == ["0", "1", "2", "3"]
    seen = set()
    for job in jobs:
        overrides = yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text())
        chosen = dict(o.split("=", 1) for o in overrides)
        results = json.loads((job / "results.json").read_text())
        assert results["config"]["paths"]["output_dir"] == str(job)
        assert results["experiment"]["shots"] == int(chosen["sampler.shots"])
        assert results["config"]["algorithm"]["first_order"] == (chosen["algorithm"] == "fomaml")
        assert results["train"]["steps"] == 2 and results["test"]["mse"]["episodes"] == 2
        seen.add((chosen["algorithm"], results["experiment"]["shots"]))
    assert seen == {("maml", 5), ("maml", 10), ("fomaml", 5), ("fomaml", 10)}


# ------------------------------------------------------------------ output in a log file


def test_progress_is_plain_lines_when_stdout_is_not_a_terminal(tmp_path):
    from tests.conftest import finish, launch

    done = finish(
        launch(
            tmp_path,
            "trainer.max_steps=20",
            "trainer.log_every_n_steps=5",
            "trainer.val_check_interval=10",
            "sampler.val_episodes=2",
            "sampler.test_episodes=2",
            "logger=none",
        )
    )  # stdout is a pipe here
    assert done.returncode == 0, done.stderr[-2000:]
    output = done.stdout + done.stderr
    assert "\r" not in output  # no progress-bar updates
    steps = [
        line.split(" - ", 1)[1].split(" |")[0]
        for line in output.splitlines()
        if "metarun.tracking" in line and " - step " in line
    ]
    assert steps == ["step 5/20", "step 10/20", "step 15/20", "step 20/20"]
    assert sum("validation at step" in line for line in output.splitlines()) == 2
    assert len(output) < 5000


# ------------------------------------------------------------------ pictures and TensorBoard


def is_png(path: Path, min_size: int = 5000) -> bool:
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > min_size


def test_learning_curves_keep_the_whole_run_when_the_test_restores_an_earlier_best_checkpoint():
    """The test loads the best checkpoint, and Lightning restores the callbacks' state with it:
    the history saved at that (earlier) step must not replace the run's; a resume still does."""
    from metarun.tracking import RunPictures

    pictures = RunPictures("accuracy", 50)
    pictures.load_state_dict({"train": [[50, 1.2]], "val": [[1000, 0.90]]})  # a resume: the run so far
    pictures.val += [[2000, 0.95], [3000, 0.93]]
    pictures.on_fit_end(None, None)
    pictures.load_state_dict({"train": [[50, 1.2]], "val": [[1000, 0.90], [2000, 0.95]]})  # the best, at 2000
    assert pictures.val == [[1000, 0.90], [2000, 0.95], [3000, 0.93]] and pictures.train == [[50, 1.2]]


def test_regression_run_draws_learning_curves_and_test_tasks(default_run):
    _, _, out, _ = default_run
    assert is_png(out / "learning_curves.png") and is_png(out / "test_tasks.png")


def test_classification_run_on_tensorboard_gets_scalars_pictures_and_test_table(omniglot_available, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    overrides = [o for o in FAST if not o.startswith("algorithm.")]
    results, _ = train(
        compose_config(
            [
                *overrides,
                "dataset=omniglot",
                "algorithm=protonet",
                "model.hidden=8",
                "sampler.ways=3",
                "sampler.queries=2",
                "logger=tensorboard",
            ],
            tmp_path,
        )
    )
    assert is_png(tmp_path / "learning_curves.png") and is_png(tmp_path / "test_episode.png")
    tags = {"scalars": set(), "images": set(), "tensors": set()}
    for events in (tmp_path / "tensorboard").glob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events), size_guidance={"images": 0, "tensors": 0})
        acc.Reload()
        for kind in tags:
            tags[kind] |= set(acc.Tags()[kind])
    assert {"train/loss", "val/accuracy", "test/accuracy"} <= tags["scalars"]
    assert tags["images"] == {"learning_curves", "test_episode"}
    assert "test/text_summary" in tags["tensors"]  # the test table
    assert results["status"] == "completed"


def test_cross_domain_run_meta_tests_on_the_other_dataset(tmp_path):
    """dataset=mini_imagenet test_dataset=cub: trained and validated on mini-ImageNet, tested
    on CUB's test classes (prepared at the training size), both named in results.json."""
    from tests.datasets import standins

    standins.mini_imagenet_pickles(tmp_path / "data" / "mini_imagenet", per_class=3)
    standins.cub_folder(tmp_path / "data" / "cub", per_class=3)
    cfg = compose_config(
        [
            *TINY,
            "dataset=mini_imagenet",
            "dataset.image_size=16",
            "test_dataset=cub",
            "algorithm=protonet",
            "sampler.queries=2",
        ],
        tmp_path / "run",
    )
    with open_dict(cfg):
        cfg.paths.data_dir = str(tmp_path / "data")
        cfg.paths.cache_dir = str(tmp_path / "cache")
    results, objects = train(cfg)
    assert results["experiment"]["dataset"] == "MiniImageNet" and results["experiment"]["test_dataset"] == "CUB"
    assert results["config"]["test_dataset"]["image_size"] == 16
    splits = objects["datamodule"].splits
    assert splits["train"].name == "mini_imagenet/train" and splits["val"].name == "mini_imagenet/val"
    assert splits["test"].name == "cub/test" and splits["test"].num_classes == 50
    assert results["test"]["accuracy"]["episodes"] == 4


@pytest.mark.parametrize("name", [n for n, cls in classes("dataset").items() if cls.takes_images])
def test_every_image_dataset_mounts_as_test_dataset_at_the_training_size(tmp_path, name):
    """The dataset group mounted a second time (no copies): the test set takes the training
    dataset's size, channels and normalisation when the learner is built."""
    cfg = compose_config(["dataset=cifar_fs", f"test_dataset={name}"], tmp_path)
    complete_config(cfg, ProtoNet)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    assert resolved["test_dataset"]["image_size"] == 32 and resolved["test_dataset"]["channels"] == 3
    assert resolved["test_dataset"]["mean"] == resolved["dataset"]["mean"]
    assert cfg.test_dataset._target_.startswith(f"metarun.datasets.{name}.")


def test_wandb_logs_the_best_checkpoint_as_an_artifact_when_asked(offline_wandb, tmp_path):
    def model_artifacts(out: Path) -> list:
        records = wandb_records(next((out / "wandb").glob("offline-run-*")))
        return [r.artifact for r in records if r.WhichOneof("record_type") == "artifact" and r.artifact.type == "model"]

    results, _ = run(tmp_path / "with", "logger=wandb", "logger.log_checkpoint=true")
    assert model_artifacts(tmp_path / "with") and results["val"]["best_checkpoint"]
    run(tmp_path / "without", "logger=wandb")  # opt-in: checkpoints are large
    assert not model_artifacts(tmp_path / "without")
