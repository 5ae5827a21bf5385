"""Meta-test a checkpoint on the fixed test episodes: mean accuracy (or MSE) ± 95% CI.

``metarun-eval ckpt_path=<path> [sampler.ways=5 sampler.shots=1 ...]`` rebuilds the run
from the config stored in the checkpoint, applies the value overrides, and writes the same
``test`` block as training to ``results.json`` in its own run directory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from metarun.build import build
from metarun.catalog import CONFIG_DIR
from metarun.checkpoint_files import load_checkpoint, load_weights
from metarun.cli import exit_on_config_error, run_command
from metarun.errors import ConfigError
from metarun.results import (
    environment,
    experiment_block,
    report,
    source_table,
    test_block,
    with_test_time,
    write_results,
)

OWN_KEYS = ("ckpt_path", "hardware", "trainer", "paths", "task_name", "hydra")


def checkpoint_config(ckpt_path: str, overrides: list[str]) -> tuple[DictConfig, dict[str, Any]]:
    """The training config stored in the checkpoint, with ``key=value`` overrides applied.

    The checkpoint is loaded with ``weights_only=True`` (`metarun.checkpoints.load_checkpoint`):
    a file that would run code when unpickled is refused, never executed.
    """
    checkpoint = load_checkpoint(ckpt_path)
    cfg = OmegaConf.create(checkpoint["metarun_config"])
    for item in overrides:
        key = item.lstrip("+").split("=", 1)[0]
        group = "." not in key and (key not in cfg or OmegaConf.is_dict(cfg[key]))  # e.g. algorithm=protonet
        if "=" not in item or group:
            raise ConfigError(
                f"override {item.lstrip('+')!r} is not allowed for metarun-eval: it "
                f"tests the checkpoint's own algorithm and model, so give key=value "
                f"overrides of the trained config, such as sampler.ways=5."
            )
        value = OmegaConf.select(OmegaConf.from_dotlist([item.lstrip("+")]), key)
        OmegaConf.update(cfg, key, value, merge=True)
    return cfg, checkpoint


def evaluate(cfg: DictConfig, overrides: list[str]) -> dict[str, Any]:
    """Rebuild the checkpoint's run, load its weights, test, and write results.json."""
    run_cfg, checkpoint = checkpoint_config(cfg.ckpt_path, overrides)
    run_cfg.paths = cfg.paths
    objects = build(run_cfg, initialise=False)  # the checkpoint's weights replace any model.init_from
    module = objects["module"]
    load_weights(
        module,
        checkpoint,
        f"ckpt_path={cfg.ckpt_path} is not allowed with the overrides "
        f"({' '.join(overrides) or 'none'}): its weights do not fit the model they build",
        "drop the overrides that change the model",
    )
    trainer = instantiate(cfg.trainer, logger=False, callbacks=[])
    tested = trainer.test(module, datamodule=objects["datamodule"], verbose=False)
    metrics = {k: float(v) for k, v in tested[0].items()}
    sampler = objects["sampler"]
    results = {
        "experiment": {
            **with_test_time(experiment_block(run_cfg, sampler), module),
            "checkpoint": str(cfg.ckpt_path),
            "trained_steps": checkpoint.get("global_step"),
        },
        "test": test_block(metrics, module.metric),
        "environment": environment(trainer),
        "config": OmegaConf.to_container(run_cfg, resolve=True),
    }
    sources = source_table({}, metrics, module.metric)
    if sources:  # dataset=multi: each source's test
        results["sources"] = sources
    if checkpoint.get("metarun_lineage"):
        results["lineage"] = checkpoint["metarun_lineage"]
    if trainer.is_global_zero:
        out = Path(cfg.paths.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        write_results(out, results)
        report(results, module.metric)
    return results


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="eval")
@exit_on_config_error
def hydra_main(cfg: DictConfig) -> None:
    overrides = [
        o for o in HydraConfig.get().overrides.task if o.lstrip("+~").split("=", 1)[0].split(".", 1)[0] not in OWN_KEYS
    ]
    evaluate(cfg, overrides)


def main() -> None:
    """The ``metarun-eval`` command: ``sampler.shots=5`` overrides the trained config as is."""
    run_command(hydra_main, append_unless=OWN_KEYS)


if __name__ == "__main__":
    main()
