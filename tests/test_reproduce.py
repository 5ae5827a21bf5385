"""metarun-reproduce: seeds as one resumable multirun, pooled, beside the published number."""

from __future__ import annotations

import csv
import json
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from metarun.published import Published, for_preset
from metarun.reproduce import CSV_COLUMNS, Measured, Request, pooled, report, setting, verdict
from metarun.stats import mean_ci95
from tests.conftest import COMMAND_ENV, ROOT, compose_config, finish, signal_when_saved

REPRODUCE = str(Path(sys.executable).parent / "metarun-reproduce")
TINY_SINUSOID = [
    "experiment=maml_sinusoid",
    "seeds=2",
    "test_episodes=4",
    "trainer.max_steps=60",
    "trainer.val_check_interval=20",
    "checkpoint.every_n_steps=10",
    "sampler.val_episodes=2",
    "sampler.meta_batch_size=2",
    "logger=none",
    "trainer.enable_progress_bar=false",
]


def paper(accuracy: float, ci95: float | None) -> Published:
    printed = f"{accuracy}" + (f" ± {ci95}" if ci95 is not None else "")
    return Published("protonet", "omniglot", 5, 1, accuracy, ci95, False, None, "a paper", printed)


def test_verdict_on_hand_made_numbers():
    assert verdict(98.5, paper(98.8, 0.4)) == "inside the published CI"
    assert verdict(98.4, paper(98.8, 0.4)) == "inside the published CI"  # on the edge
    assert verdict(98.0, paper(98.8, 0.4)) == "within 1 point"
    assert verdict(99.7, paper(98.8, 0.4)) == "within 1 point"
    assert verdict(97.7, paper(98.8, 0.4)) == "short"
    assert verdict(95.46, paper(96.0, None)) == "within 1 point"  # no published interval
    assert verdict(94.9, paper(96.0, None)) == "short"
    assert verdict(97.2, paper(96.0, None)) == "above"
    assert verdict(97.2, None) is None


def test_pooled_is_the_interval_of_all_episodes_together():
    """From each seed's mean, half-width and count alone, the pool equals `mean_ci95` of all
    the episodes (seeds of different sizes and means)."""
    g = torch.Generator().manual_seed(0)
    samples = [
        (torch.rand(n, generator=g) * 0.3 + shift).tolist() for n, shift in ((600, 0.6), (600, 0.65), (250, 0.5))
    ]
    seeds = [Measured(f"seed {i}", *mean_ci95(s), len(s)) for i, s in enumerate(samples)]
    pool = pooled(seeds)
    mean, ci = mean_ci95([v for s in samples for v in s])
    assert pool.episodes == 1450
    assert pool.mean == pytest.approx(mean, rel=1e-12) and pool.ci95 == pytest.approx(ci, rel=1e-12)


def run(out: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [REPRODUCE, *TINY_SINUSOID, f"out={out}", *args],
        cwd=ROOT,
        env=COMMAND_ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def table(out: Path) -> list[dict[str, str]]:
    """reproduction.csv without its wall-clock column."""
    with open(out / "reproduction.csv") as f:
        return [{k: v for k, v in r.items() if k != "wall_seconds"} for r in csv.DictReader(f)]


@pytest.mark.slow
@pytest.mark.parametrize(
    "domain, published", [("crop_diseases", 79.72), ("eurosat", 73.29), ("isic", 39.57), ("chestx", 24.05)]
)
def test_a_cross_domain_preset_is_judged_on_its_meta_test_domain(tmp_path, domain, published):
    """BSCD-FSL's presets train on mini-ImageNet and meta-test on one domain each: the report's
    setting names that domain, and each preset has its own published number (Guo et al. 2020)."""
    preset = f"protonet_bscd_{domain}_5w5s"
    config = OmegaConf.to_container(compose_config([f"experiment={preset}"], tmp_path), resolve=True)
    experiment = {"dataset": "MiniImageNet", "test_dataset": "BSCDFSL", "ways": 5, "shots": 5}
    rows = dict(setting(config, {**experiment, "train_ways": 5, "train_shots": 5}))
    assert rows["data"] == f"MiniImageNet, meta-tested on BSCDFSL {domain}"
    assert rows["backbone"] == "TorchvisionBackbone name resnet10" and rows["training steps"] == "40,000"
    row = for_preset(preset)
    assert row is not None and (row.dataset, row.shots, row.accuracy) == (f"bscd_fsl/{domain}", 5, published)
    assert row.source.startswith("Guo et al. 2020, ProtoNet")


def test_two_seeds_report_and_resume_after_sigterm_without_rerunning_a_finished_seed(tmp_path):
    reference = run(tmp_path / "reference")
    resumed = tmp_path / "resumed"
    proc = run(resumed)
    signal_when_saved(
        proc, resumed / "seed_1" / "checkpoints" / "last.ckpt", random.Random(0).randint(11, 49), signal.SIGTERM
    )
    stopped = finish(proc)
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr[-2000:]
    assert "metarun: interrupted by SIGTERM" in stopped.stderr
    assert stopped.stderr.strip().splitlines()[-1] == (  # the reproduction's way on, not the single run's
        "metarun-reproduce: interrupted, so run the same command again to continue: finished seeds are not run "
        "again and the interrupted one continues from its checkpoint."
    )
    first = resumed / "seed_0" / "results.json"
    assert json.loads(first.read_text())["status"] == "completed"
    assert not (resumed / "seed_1" / "results.json").exists() and not (resumed / "reproduction.csv").exists()
    written = first.stat().st_mtime_ns

    again = finish(run(resumed))
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"seed 0 finished earlier ({resumed / 'seed_0'}): not run again" in again.stdout
    assert first.stat().st_mtime_ns == written
    assert json.loads((resumed / "seed_1" / "results.json").read_text())["train"]["resumed_from"]
    done = finish(reference)
    assert done.returncode == 0, done.stderr[-2000:]

    rows = table(resumed)
    assert rows == table(tmp_path / "reference")  # the interrupted reproduction ends identical
    assert list(rows[0]) == [c for c in CSV_COLUMNS if c != "wall_seconds"]
    assert [r["seed"] for r in rows] == ["0", "1", "pooled"] and rows[-1]["episodes"] == "8"
    assert all(r["metric"] == "mse" and r["verdict"] == "" for r in rows)
    page = (resumed / "reproduction.md").read_text()
    assert "No verdict: published.csv holds accuracies, and this preset is measured in MSE." in page
    assert "| training steps | 60 |" in page and "`trainer.max_steps=60`" in page
    assert (resumed / "reproduction.png").stat().st_size > 10_000
    assert "metarun-reproduce: maml_sinusoid, 2 seed(s): mse" in again.stdout

    # run again as it was: nothing is run, the same report; with another setting: refused
    repeat = finish(run(resumed))
    assert repeat.returncode == 0 and repeat.stdout.count("finished earlier") == 2, repeat.stderr[-2000:]
    assert table(resumed) == rows
    other = finish(run(resumed, "trainer.max_steps=61"))
    assert other.returncode == 2 and other.stderr.startswith(
        f"metarun-reproduce: error: out={resumed} is not allowed: its seed_0 was run with other settings "
        "(trainer.max_steps=60 there, 61 now), so give the same overrides as before or another out=."
    ), other.stderr

    # the same seeds as an accuracy preset: with a published number, a verdict; without, a sentence
    results = {s: json.loads((resumed / f"seed_{s}" / "results.json").read_text()) for s in (0, 1)}
    for r in results.values():
        r["test"] = {"accuracy": {"mean": 0.985, "ci95": 0.004, "episodes": 4}}
    (tmp_path / "judged").mkdir()
    judged = report(Request("maml_omniglot_5w1s", 2, 4, tmp_path / "judged", ()), results)
    assert judged["verdict"] == "inside the published CI" and judged["published"] == 98.7
    assert (
        "Published: **98.7 ± 0.4%** (Finn et al. 2017, table 1)."
        in (tmp_path / "judged" / "reproduction.md").read_text()
    )
    (tmp_path / "unjudged").mkdir()
    unjudged = report(Request("cavia_omniglot_5w1s", 2, 4, tmp_path / "unjudged", ()), results)
    assert unjudged["verdict"] == "" and unjudged["published"] == ""
    assert (
        "No verdict: this preset has no published number in metarun/published.csv"
        in (tmp_path / "unjudged" / "reproduction.md").read_text()
    )


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "experiment is not set: give experiment=<preset> (metarun-reproduce --help)."),
        (
            ["experiment=protonet_omniglot_5w2s"],
            "experiment=protonet_omniglot_5w2s is not allowed: conf/experiment has no such preset, so choose one of "
            "protonet_",
        ),
        (
            ["experiment=bogus"],
            "experiment=bogus is not allowed: conf/experiment has no such preset, so choose a preset",
        ),
        (["experiment=maml_sinusoid", "seeds=0"], "seeds=0 is not allowed: it must be a positive integer."),
        (["experiment=maml_sinusoid", "seeds=two"], "seeds=two is not allowed: it must be a positive integer."),
        (["experiment=maml_sinusoid", "test_episodes=-1"], "test_episodes=-1 is not allowed: it must be a positive"),
        (["experiment=maml_sinusoid", "seed=3"], "seed is not allowed here: metarun-reproduce sets it for each seed"),
        (["experiment=maml_sinusoid", "fast"], "'fast' is not allowed: give key=value arguments"),
    ],
    ids=["no-preset", "unknown-preset", "nothing-close", "seeds-0", "seeds-word", "episodes", "seed", "not-key-value"],
)
def test_bad_input_is_one_sentence_through_the_command(args, message, tmp_path):
    done = subprocess.run(
        [REPRODUCE, *args, f"out={tmp_path / 'out'}"], cwd=ROOT, env=COMMAND_ENV, capture_output=True, text=True
    )
    assert done.returncode == 2 and done.stderr.startswith(f"metarun-reproduce: error: {message}"), done.stderr
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert not (tmp_path / "out").exists()


def test_help_says_what_it_does_with_examples():
    done = subprocess.run([REPRODUCE, "--help"], env=COMMAND_ENV, capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.startswith("metarun-reproduce: run a preset for several seeds")
    assert "Examples:" in done.stdout and "Outputs:" in done.stdout and "Verdicts" in done.stdout
    assert done.stdout.count("\n  metarun-reproduce experiment=") >= 4
