"""Sweeps and launches through Hydra's plugins, run as a user runs them (the installed command).

- hydra/sweeper=tune: Optuna (hydra-optuna-sweeper) with an in-memory study; `metarun`
  returns each trial's best validation metric and the study optimises it in the dataset's
  direction (minimise MSE, maximise accuracy).
- hydra/launcher=local: submitit's local executor, the SLURM launcher's code path, each job
  in its own process.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir

from tests.conftest import CONFIG_DIR, METARUN, ROOT, TINY

pytestmark = pytest.mark.slow  # launches processes

QUICK = [o for o in TINY if not o.startswith("sampler.meta_batch_size")] + [
    "sampler.meta_batch_size=2",
    "algorithm.test_inner_steps=2",
]


def multirun(sweep: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run(
        [METARUN, "-m", *overrides, f"hydra.sweep.dir={sweep}"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def jobs(sweep: Path) -> list[Path]:
    return sorted((p for p in sweep.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))


def test_optuna_sweep_of_three_trials_minimises_the_validation_mse(tmp_path):
    sweep = tmp_path / "sweep"
    done = multirun(
        sweep, "hydra/sweeper=tune", "hydra.sweeper.n_trials=3", "optimizer.lr=interval(0.0001, 0.01)", *QUICK
    )
    assert done.returncode == 0, done.stderr[-3000:]
    trials = jobs(sweep)
    assert len(trials) == 3
    values = {}
    for job in trials:
        results = json.loads((job / "results.json").read_text())
        lr = results["config"]["optimizer"]["lr"]
        assert 0.0001 <= lr <= 0.01
        values[lr] = results["val"]["best_mse"]
    assert len(values) == 3  # three different draws
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert best["best_value"] == pytest.approx(min(values.values()))
    assert best["best_params"]["optimizer.lr"] == pytest.approx(min(values, key=values.get))


def test_the_sweep_direction_follows_the_metric():
    with initialize_config_dir(CONFIG_DIR, version_base="1.3"):
        for dataset, direction in (("sinusoid", "minimize"), ("omniglot", "maximize")):
            cfg = compose("train", overrides=[f"dataset={dataset}", "hydra/sweeper=tune"], return_hydra_config=True)
            assert cfg.hydra.sweeper.direction == direction


def test_submitit_local_launcher_runs_each_job_in_its_own_process(tmp_path):
    sweep = tmp_path / "sweep"
    done = multirun(sweep, "hydra/launcher=local", "seed=0,1", *QUICK)
    assert done.returncode == 0, done.stderr[-3000:]
    runs = jobs(sweep)
    assert [p.name for p in runs] == ["0", "1"]
    seeds = set()
    for job in runs:
        results = json.loads((job / "results.json").read_text())
        assert results["status"] == "completed" and results["train"]["steps"] == 3
        seeds.add(results["config"]["seed"])
    assert seeds == {0, 1}
    logs = list((sweep / ".submitit").rglob("*_log.out"))
    assert len(logs) == 2  # submitit's own per-job logs: the jobs went through its executor


def test_the_slurm_preset_asks_for_one_task_and_gpu_per_device_on_each_node():
    """SLURM is not available here: the preset is checked as it composes."""
    with initialize_config_dir(CONFIG_DIR, version_base="1.3"):
        cfg = compose(
            "train",
            overrides=["hydra/launcher=slurm", "hardware=ddp", "trainer.devices=4", "trainer.num_nodes=2"],
            return_hydra_config=True,
        )
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.nodes, launcher.tasks_per_node, launcher.gpus_per_task) == (2, 4, 1)
    assert launcher.max_num_timeout > 0 and launcher.timeout_min > 0
