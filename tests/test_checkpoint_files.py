"""A checkpoint written before task_batching moved to the top level (format 2) still loads:
its config is brought to today's keys, and metarun-eval and metarun.load use it as before."""

from __future__ import annotations

import torch

from metarun.checkpoint_files import FORMAT, load_checkpoint
from metarun.evaluate import evaluate
from metarun.predict import load
from metarun.runner import train
from tests.conftest import compose_config


def test_a_format_2_checkpoint_is_migrated(make_config, tmp_path):
    results, _ = train(make_config("task_batching=loop"))
    new = torch.load(results["val"]["best_checkpoint"], weights_only=True)
    assert new["metarun_format"] == FORMAT == 3 and new["metarun_config"]["task_batching"] == "loop"
    old = dict(new, metarun_format=2)  # as metarun wrote it before: algorithm.task_batching
    config = {k: v for k, v in new["metarun_config"].items() if k != "task_batching"}
    config["algorithm"] = {**config["algorithm"], "task_batching": "loop"}
    old["metarun_config"] = config
    torch.save(old, tmp_path / "old.ckpt")

    migrated = load_checkpoint(tmp_path / "old.ckpt")["metarun_config"]
    assert migrated["task_batching"] == "loop" and "task_batching" not in migrated["algorithm"]
    assert load(tmp_path / "old.ckpt").algorithm.task_batching == "loop"
    cfg = compose_config([f"ckpt_path={tmp_path / 'old.ckpt'}"], tmp_path / "eval", config_name="eval")
    assert evaluate(cfg, [])["test"] == results["test"]
    # a top-level setting of the trained run may be overridden too (not a group)
    assert evaluate(cfg, ["task_batching=vmap"])["config"]["task_batching"] == "vmap"
