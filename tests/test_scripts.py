"""scripts/summarize.py and scripts/benchmark.py."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.core.global_hydra import GlobalHydra

from metarun.catalog import learners_for

ROOT = Path(__file__).resolve().parents[1]


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fake_run(root: Path, num: int, overrides: list[str], mean: float, ci: float, inference: str | None = None) -> None:
    run = root / str(num)
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    results = {"test": {"accuracy": {"mean": mean, "ci95": ci, "episodes": 600}}, "train": {"tasks_per_second": 12.5}}
    if inference:  # results.json before the inference was recorded has none: inductive
        results["experiment"] = {"inference": inference}
    (run / "results.json").write_text(json.dumps(results))


def test_summarize_prints_a_markdown_table_and_writes_csv(tmp_path):
    fake_run(tmp_path, 0, ["algorithm=maml", "sampler.shots=1"], 0.9512, 0.0061)
    fake_run(tmp_path, 1, ["algorithm=protonet", "sampler.shots=5"], 0.9876, 0.0023, "transductive (TIM-GD)")
    out = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "summarize.py"), str(tmp_path)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "| 0 | algorithm=maml sampler.shots=1 | inductive | accuracy 95.12 ± 0.61 (600 ep.) | 12.5 |" in out
    assert (
        "| 1 | algorithm=protonet sampler.shots=5 | transductive (TIM-GD) | accuracy 98.76 ± 0.23 (600 ep.) | 12.5 |"
        in out
    )
    lines = (tmp_path / "summary.csv").read_text().splitlines()
    assert lines[0].startswith("run,overrides,metric,mean,ci95") and len(lines) == 3


def test_summarize_plots_the_metric_against_the_swept_values(tmp_path):
    for num, (algorithm, shots, mean) in enumerate(
        [("maml", 1, 0.90), ("maml", 5, 0.97), ("protonet", 1, 0.93), ("protonet", 5, 0.99)]
    ):
        fake_run(tmp_path, num, [f"algorithm={algorithm}", f"sampler.shots={shots}", "seed=0"], mean, 0.01)
    summarize = load_script("summarize")
    drawn = summarize.plot(summarize.rows(tmp_path), tmp_path / "summary.png")
    assert drawn["x"] == "sampler.shots"  # the numeric swept key; seed did not vary
    assert drawn["lines"] == ["algorithm=maml", "algorithm=protonet"]
    png = tmp_path / "summary.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    out = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "summarize.py"), str(tmp_path)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "accuracy against sampler.shots, 2 lines" in out


def test_summarize_refuses_an_empty_folder(tmp_path):
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "summarize.py"), str(tmp_path)], capture_output=True, text=True
    )
    assert done.returncode != 0 and "no results.json" in done.stderr


def test_benchmark_reports_throughput_and_memory(capsys):
    GlobalHydra.instance().clear()
    result = load_script("benchmark").main(["bench.steps=2", "bench.warmup=1", "sampler.meta_batch_size=4"])
    GlobalHydra.instance().clear()
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line == result
    assert line["tasks_per_second"] > 0 and line["peak_memory_mb"] > 0
    assert line["meta_batch_size"] == 4 and line["steps"] == 2
    # the plain-PyTorch reference computes the same meta-gradient, and is timed beside it
    assert line["reference_grad_relative_difference"] < 1e-6
    assert line["ratio"] == pytest.approx(line["seconds_per_step"] / line["reference_seconds_per_step"])


def test_bench_grid_picks_the_paper_preset_for_every_cell():
    """Each Omniglot cell composes: the exact preset where one exists, else the same-ways
    preset with sampler.shots=5, else the 5-way preset with 20 ways."""
    grid = load_script("bench_grid")
    assert grid.omniglot_overrides("reptile", "20w5s") == ["experiment=reptile_omniglot_20w5s"]
    assert grid.omniglot_overrides("maml", "20w5s") == ["experiment=maml_omniglot_20w1s", "sampler.shots=5"]
    assert grid.omniglot_overrides("fomaml", "5w1s") == ["experiment=maml_omniglot_5w1s", "algorithm.first_order=true"]
    assert grid.omniglot_overrides("lstm_optimizer", "20w1s") == [
        "experiment=lstm_optimizer_omniglot_5w1s",
        "sampler.ways=20",
        "sampler.shots=1",
        "sampler.meta_batch_size=16",
    ]
    assert "sampler.train_queries=5" in grid.omniglot_overrides("relation_net", "20w5s")
    cells = grid.cells("omniglot", list(grid.OMNIGLOT))
    assert len(cells) == 4 * len(grid.OMNIGLOT) == 4 * (len(learners_for("classification")) + 1)  # finetune: 2 rows
    GlobalHydra.instance().clear()
    from hydra import compose, initialize_config_dir

    from metarun.catalog import CONFIG_DIR

    with initialize_config_dir(CONFIG_DIR, version_base="1.3"):
        for algo, shape, overrides in cells + grid.cells("sinusoid", list(grid.SINUSOID)):
            cfg = compose("train", overrides=overrides)
            if shape[0].isdigit():
                ways, shots = shape.rstrip("s").split("w")
                assert (cfg.sampler.ways, cfg.sampler.shots) == (int(ways), int(shots)), algo
            else:
                assert cfg.sampler.shots == int(shape[1:]), algo


def test_bench_grid_tables_say_not_run_and_never_copy_a_number(tmp_path):
    grid = load_script("bench_grid")
    cell = tmp_path / "omniglot" / "protonet" / "20w1s"
    cell.mkdir(parents=True)
    (cell / "results.json").write_text(
        json.dumps(
            {
                "test": {"accuracy": {"mean": 0.9248, "ci95": 0.0026, "episodes": 100}},
                "train": {"steps": 838, "wall_seconds": 1200.0},
            }
        )
    )
    table = grid.omniglot_table(tmp_path)
    row = next(line for line in table.splitlines() if line.startswith("| ProtoNet "))
    assert row == ("| ProtoNet | not run (98.8) | not run (99.7) | 92.5 ± 0.3 (96.0) <br>838 steps | not run (98.9) |")
    assert "| ANIL | not run (—) | not run (—) | not run (96.2) | not run (98.0) |" in table
    assert "| MAML | not run | not run |" in grid.sinusoid_table(tmp_path)
    (tmp_path / "sinusoid" / "maml" / "k5").mkdir(parents=True)
    (tmp_path / "sinusoid" / "maml" / "k5" / "failed.txt").write_text("rc=-9\n")
    (tmp_path / "sinusoid" / "maml" / "k10").mkdir(parents=True)
    (tmp_path / "sinusoid" / "maml" / "k10" / "failed.txt").write_text("rc=1\n")
    assert "| MAML | killed, out of memory | failed (rc=1) |" in grid.sinusoid_table(tmp_path)
    cell = tmp_path / "sinusoid" / "np" / "k5"
    cell.mkdir(parents=True)
    (cell / "results.json").write_text(
        json.dumps(
            {
                "test": {
                    "mse": {"mean": 0.4123, "ci95": 0.05, "episodes": 100},
                    "log_likelihood": {"mean": -1.234, "ci95": 0.1, "episodes": 100},
                },
                "train": {"steps": 1},
            }
        )
    )
    assert "| NP | 0.412 ± 0.050 <br>log-lik. -1.23 ± 0.10 <br>1 step | not run |" in grid.sinusoid_table(tmp_path)


def test_bench_grid_refuses_an_unknown_algorithm():
    grid = load_script("bench_grid")
    with pytest.raises(SystemExit, match=r"unknown omniglot algorithm\(s\) \['nope'\]"):
        grid.main(["omniglot", "--algos", "maml", "nope"])
