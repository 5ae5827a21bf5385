"""metarun-eval re-scores a checkpoint on the fixed test episodes."""

from __future__ import annotations

import pytest

from metarun.errors import ConfigError
from metarun.evaluate import evaluate
from metarun.runner import train
from tests.conftest import compose_config


def test_reevaluating_the_best_checkpoint_reproduces_the_test_block(make_config, tmp_path):
    results, _ = train(make_config())
    ckpt = results["val"]["best_checkpoint"]
    cfg = compose_config(
        [f"ckpt_path={ckpt}", "trainer.enable_progress_bar=false"], tmp_path / "eval", config_name="eval"
    )
    again = evaluate(cfg, ["sampler.test_episodes=4"])
    assert again["test"] == results["test"]
    more = evaluate(cfg, ["sampler.test_episodes=6", "sampler.shots=5"])
    assert more["test"]["mse"]["episodes"] == 6 and more["experiment"]["shots"] == 5
    assert (tmp_path / "eval" / "results.json").exists()


def test_bad_checkpoint_and_overrides(make_config, tmp_path):
    cfg = compose_config([f"ckpt_path={tmp_path}/missing.ckpt"], tmp_path / "eval", config_name="eval")
    with pytest.raises(ConfigError, match="ckpt_path=.*missing.ckpt"):
        evaluate(cfg, [])
    results, _ = train(make_config())
    cfg = compose_config([f"ckpt_path={results['val']['best_checkpoint']}"], tmp_path / "eval", config_name="eval")
    with pytest.raises(ConfigError, match="algorithm=protonet"):
        evaluate(cfg, ["algorithm=protonet"])
