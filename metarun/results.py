"""What a run reports: results.json's blocks, the printed summary, the sweep objective."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from omegaconf import DictConfig

from metarun.algorithms.transductive import describe as describe_inference
from metarun.init_from import describe

if TYPE_CHECKING:
    import lightning as L


def experiment_block(cfg: DictConfig, sampler: Any) -> dict[str, Any]:
    """The ``experiment`` block of results.json (training and `metarun-eval`): what ran, on
    which dataset (and which meta-test dataset, cross-domain), with which episode shape."""
    block = {
        "algorithm": cfg.algorithm._target_.rsplit(".", 1)[-1],
        "dataset": cfg.dataset._target_.rsplit(".", 1)[-1],
        **sampler.shape(),
        "seed": cfg.seed,
        "inference": describe_inference(cfg.algorithm.get("transductive")),
    }
    if cfg.get("test_dataset"):
        block["test_dataset"] = cfg.test_dataset._target_.rsplit(".", 1)[-1]
    return block


def with_test_time(experiment: dict[str, Any], module: Any) -> dict[str, Any]:
    """``experiment`` with the test's fine-tuning settings when it fine-tuned (the rate that
    ``test_time.lr=auto`` chose, and what it measured)."""
    settings = module.test_time.settings()
    return experiment if settings is None else {**experiment, "test_time": settings}


def environment(trainer: L.Trainer) -> dict[str, Any]:
    return {
        "torch": torch.__version__,
        "device": str(trainer.strategy.root_device),
        "accelerator": type(trainer.accelerator).__name__,
        "world_size": trainer.world_size,
        "precision": str(trainer.precision),
    }


def test_block(metrics: dict[str, float], metric: str) -> dict[str, Any]:
    """The ``test`` block of results.json: every logged ``test/<name>`` with its ``_ci95``.

    The main metric comes first, then its value before adaptation and any per-task extra
    (e.g. a Neural Process's ``log_likelihood``), each as ``{mean, ci95, episodes}``.
    """
    episodes = int(metrics["test/episodes"])
    names = [metric] + sorted(
        k[len("test/") : -len("_ci95")]
        for k in metrics
        if k.startswith("test/") and k.endswith("_ci95") and k != f"test/{metric}_ci95" and "/source/" not in k
    )
    return {
        name: {"mean": metrics[f"test/{name}"], "ci95": metrics[f"test/{name}_ci95"], "episodes": episodes}
        for name in names
    }


def source_table(val: dict[str, float], test: dict[str, float], metric: str) -> dict[str, Any] | None:
    """The ``sources`` block of results.json (dataset=multi): each source's ``val`` (the last
    validation) and ``test`` metric as ``{mean, ci95, episodes}``; None for one source."""
    table: dict[str, Any] = {}
    for stage, metrics in (("val", val), ("test", test)):
        prefix = f"{stage}/source/"
        for key in metrics:
            if key.startswith(prefix) and key.endswith(f"/{metric}"):
                name = key[len(prefix) : -len(f"/{metric}")]
                table.setdefault(name, {})[stage] = {
                    "mean": metrics[key],
                    "ci95": metrics[f"{key}_ci95"],
                    "episodes": int(metrics[f"{prefix}{name}/episodes"]),
                }
    return table or None


def describe_test_time(settings: dict[str, Any]) -> str:
    """One line on how the test tasks were fine-tuned (`metarun.test_time`)."""
    lr = settings["lr"]
    line = (
        f"fine-tuned at test time: {settings['finetune_steps']} steps at lr {lr if isinstance(lr, str) else f'{lr:g}'}"
    )
    if settings.get("augment"):
        line += ", augmented"
    search = settings.get("lr_search")
    if search:
        tried = ", ".join(f"{float(r):g}: {100 * a:.1f}%" for r, a in search["accuracy"].items())
        line += f" (test_time.lr=auto on {search['episodes']} validation episodes: {tried})"
    return line


def write_results(output_dir: Path, results: dict[str, Any], name: str = "results.json") -> None:
    """``results`` as ``output_dir/name``, written atomically."""
    tmp = output_dir / f".{name}.tmp"
    tmp.write_text(json.dumps(results, indent=2))
    os.replace(tmp, output_dir / name)


def report(results: dict[str, Any], metric: str) -> None:
    started = describe(results.get("lineage"))
    if started:
        print(started)
    tuned = results["experiment"].get("test_time")
    if tuned:
        print(describe_test_time(tuned))
    inference = results["experiment"].get("inference", "inductive")
    if inference != "inductive":
        print(f"inference: {inference}: each task's queries were labelled together, from their own features")
    scale, unit = (100.0, "%") if metric == "accuracy" else (1.0, "")
    for name, value in results["test"].items():
        print(
            f"test {name}: {value['mean'] * scale:.4g}{unit} ± {value['ci95'] * scale:.2g}{unit} "
            f"(95% CI, {value['episodes']} episodes)"
        )
    for source, stages in (results.get("sources") or {}).items():
        if "test" in stages:
            value = stages["test"]
            print(
                f"  {source}: {value['mean'] * scale:.4g}{unit} ± {value['ci95'] * scale:.2g}{unit} "
                f"({value['episodes']} episodes)"
            )
    print(f"results: {results['config']['paths']['output_dir']}/results.json")


def objective(results: dict[str, Any]) -> float:
    """What a run returns to a sweeper: its best validation metric (accuracy or MSE), or
    the test metric when it never validated."""
    metric = "mse" if "mse" in results["test"] else "accuracy"
    best = results["val"].get(f"best_{metric}")
    return float(best if best is not None else results["test"][metric]["mean"])
