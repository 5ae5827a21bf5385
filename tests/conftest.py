"""Shared fixtures: compose the real Hydra config the way the `metarun` command does."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from metarun.catalog import learners_for
from metarun.cli import translate
from tests.grouping import pytest_collection_modifyitems  # noqa: F401  (a pytest hook)

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = str(ROOT / "conf")
os.environ.setdefault("METARUN_CACHE_DIR", str(ROOT / ".cache"))
if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs one pytest worker per core: two intra-op threads each would put four
    # spinning OpenMP threads on two cores, which slows small steps many times over.
    torch.set_num_threads(1)

# Small enough for a 2-core CPU: a few outer steps, a few evaluation episodes.
TINY = [
    "trainer.max_steps=3",
    "trainer.val_check_interval=2",
    "trainer.enable_progress_bar=false",
    "trainer.log_every_n_steps=1",
    "sampler.val_episodes=4",
    "sampler.test_episodes=4",
    "sampler.eval_batch_size=2",
    "sampler.meta_batch_size=2",
    "logger=none",
]


# This CPU's bf16 kernels: native (AVX-512 BF16 / AMX) or emulated, slower and less exact. The
# presets' fast CPU path (bf16 + channels_last) is measured and toleranced on native ones only;
# elsewhere the tests that run a preset run it in fp32.
NATIVE_BF16 = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
FP32_HERE = [] if NATIVE_BF16 else ["hardware=cpu", "channels_last=false"]

# Two CPU processes over gloo, launched as a user launches them: Lightning re-executes the
# `metarun` command once per extra rank (strategy=ddp). (`ddp_spawn` from inside pytest left
# spawned test workers aborting at exit, "terminate called without an active exception",
# in about 1 run in 10 on this 2-core machine.)
DDP = ["hardware=ddp", "trainer.accelerator=cpu", "trainer.devices=2"]
BIN = Path(sys.executable).parent
METARUN, EVAL, PREDICT = (str(BIN / name) for name in ("metarun", "metarun-eval", "metarun-predict"))
# The installed commands run as a user runs them: no traceback switch, no leftover DDP
# variables, one intra-op thread (deterministic and quick on a busy machine).
COMMAND_ENV = {
    **{k: v for k, v in os.environ.items() if k not in ("HYDRA_FULL_ERROR", "LOCAL_RANK", "RANK", "MASTER_PORT")},
    "OMP_NUM_THREADS": "1",
}


def launch(run_dir: Path, *overrides: str, command: str = METARUN) -> subprocess.Popen:
    """Start an installed metarun command writing into ``run_dir``."""
    return subprocess.Popen(
        [command, *overrides, f"hydra.run.dir={run_dir}"],
        cwd=ROOT,
        env=COMMAND_ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(proc: subprocess.Popen, timeout: float = 300) -> subprocess.CompletedProcess:
    """Wait for a launched command; its exit code and output."""
    out, err = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def step_of(checkpoint: Path) -> int:
    """The global step a checkpoint file was saved at."""
    return torch.load(checkpoint, map_location="cpu", weights_only=True)["global_step"]


def signal_when_saved(proc: subprocess.Popen, last: Path, at_step: int, sig: int, timeout: float = 240) -> None:
    """Send ``sig`` to ``proc`` once ``last`` (a run's last.ckpt) is at ``at_step`` or later."""
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            if last.exists() and step_of(last) >= at_step:
                proc.send_signal(sig)
                return
        except (RuntimeError, EOFError, OSError):  # replaced while we read it: try again
            pass
        time.sleep(0.01)


def run_metarun(run_dir: Path, *overrides: str) -> dict:
    """The installed `metarun` command on ``overrides``; its results.json."""
    if data_dir() is not None:
        overrides = (f"paths.data_dir={data_dir()}", *overrides)
    done = finish(launch(run_dir, *overrides))
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((run_dir / "results.json").read_text())


# Settings an algorithm needs on a kind of task beyond its config's defaults (the small
# Omniglot episodes of the hardware tests, the sinusoid MLP). Every other algorithm config
# in conf/algorithm/ runs as it is: a new file is covered without editing a list.
NEEDS = {
    ("anil", "regression"): ["algorithm.head_prefix=net.4."],  # the MLP's last layer
    ("maml_plus_plus", "regression"): ["algorithm.per_step_bn=false"],  # the MLP has no batch norm
}


def algorithms(kind: str) -> list[str]:
    """Every config in conf/algorithm/ (and METARUN_CONFIG_PATH) whose algorithm solves
    ``kind`` tasks ("classification" or "regression", the class's ``tasks``)."""
    return learners_for(kind)


def data_dir() -> Path | None:
    """The real data folder from METARUN_DATA_DIR (relative paths are from the repo root)."""
    value = os.environ.get("METARUN_DATA_DIR")
    return None if not value else (ROOT / value).resolve()


def compose_config(overrides: list[str], output_dir: Path, config_name: str = "train") -> DictConfig:
    """The composed config for ``overrides``, writing into ``output_dir``."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name, overrides=translate(list(overrides)), return_hydra_config=True)
    HydraConfig().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.root_dir = str(ROOT)
        cfg.paths.output_dir = str(output_dir)
        cfg.paths.log_dir = str(output_dir)
        if data_dir() is not None:
            cfg.paths.data_dir = str(data_dir())
        del cfg.hydra
    return cfg


def untrained_and_trained(settings: list[str], output_dir: Path, steps: int) -> tuple[dict, dict]:
    """results.json of the same run untrained (one step at a vanishing rate) and trained for
    ``steps`` steps, both tested on the same fixed test episodes: a learning test's pair."""
    from metarun.runner import train

    untrained, _ = train(compose_config([*settings, "trainer.max_steps=1", "optimizer.lr=1e-12"], output_dir / "u"))
    trained, _ = train(compose_config([*settings, f"trainer.max_steps={steps}"], output_dir / "run"))
    return untrained, trained


@pytest.fixture
def make_config(tmp_path):
    """``make_config(*overrides)`` -> a tiny composed config writing into tmp_path."""

    def make(*overrides: str, tiny: bool = True) -> DictConfig:
        return compose_config([*(TINY if tiny else []), *overrides], tmp_path)

    return make


@pytest.fixture
def omniglot_available():
    """Skip unless METARUN_DATA_DIR points at the Omniglot archives."""
    root = data_dir()
    if root is None or not (root / "omniglot" / "images_background.zip").exists():
        pytest.skip("METARUN_DATA_DIR with omniglot/ is not set (.ci/run sets it)")
    return root


@pytest.fixture(scope="module")
def one_thread():
    """Small models: one intra-op thread is faster than two on a busy 2-core machine.
    A module opts in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def image_standins(tmp_path_factory) -> Path:
    """A data folder with 84x84 stand-ins of every image benchmark (6 images per class)."""
    from tests.datasets import standins

    root = tmp_path_factory.mktemp("standin_data")
    standins.mini_imagenet_csv(root / "mini_imagenet", per_class=6, size=84)
    standins.tiered_folders(root / "tiered_imagenet", per_class=6, size=84)
    standins.cifar_archive(root / "cifar100", train_per_class=4, test_per_class=2)
    standins.cub_folder(root / "cub", per_class=6, size=84)
    standins.bscd_fsl(root / "bscd_fsl", per_class=6, size=84)  # the meta-test sets of cross-domain presets
    return root


def on_standins(cfg: DictConfig, request: pytest.FixtureRequest) -> None:
    """Point a composed image-benchmark config at the stand-ins (`image_standins`) with 1 query
    per class and at most 5 shots (6 images per class); Omniglot and sinusoid configs are left
    as they are."""
    if cfg.dataset._target_.endswith(("Omniglot", "Sinusoid")):
        return
    root = request.getfixturevalue("image_standins")
    with open_dict(cfg):
        cfg.paths.data_dir = str(root)
        cfg.paths.cache_dir = str(root / "cache")
        if "queries" in cfg.sampler:  # the episodic sampler (sampler=variable sizes its own)
            cfg.sampler.queries = 1
            cfg.sampler.train_queries = 1
        for key in ("shots", "train_shots"):
            if isinstance(cfg.sampler.get(key), int) and cfg.sampler[key] > 5:
                cfg.sampler[key] = 5
