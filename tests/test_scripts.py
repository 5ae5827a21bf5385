"""scripts/summarize.py and scripts/benchmark.py."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

from hydra.core.global_hydra import GlobalHydra

ROOT = Path(__file__).resolve().parents[1]


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fake_run(root: Path, num: int, overrides: list[str], mean: float, ci: float) -> None:
    run = root / str(num)
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    (run / "results.json").write_text(json.dumps({
        "test": {"accuracy": {"mean": mean, "ci95": ci, "episodes": 600}},
        "train": {"tasks_per_second": 12.5}}))


def test_summarize_prints_a_markdown_table_and_writes_csv(tmp_path):
    fake_run(tmp_path, 0, ["algorithm=maml", "sampler.shots=1"], 0.9512, 0.0061)
    fake_run(tmp_path, 1, ["algorithm=protonet", "sampler.shots=5"], 0.9876, 0.0023)
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "summarize.py"), str(tmp_path)],
                         capture_output=True, text=True, check=True).stdout
    assert "| 0 | algorithm=maml sampler.shots=1 | accuracy 95.12 ± 0.61 (600 ep.) | 12.5 |" in out
    assert "| 1 | algorithm=protonet sampler.shots=5 | accuracy 98.76 ± 0.23 (600 ep.) | 12.5 |" in out
    lines = (tmp_path / "summary.csv").read_text().splitlines()
    assert lines[0].startswith("run,overrides,metric,mean,ci95") and len(lines) == 3


def test_summarize_refuses_an_empty_folder(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "summarize.py"), str(tmp_path)],
                          capture_output=True, text=True)
    assert done.returncode != 0 and "no results.json" in done.stderr


def test_benchmark_reports_throughput_and_memory(capsys):
    GlobalHydra.instance().clear()
    result = load_script("benchmark").main(["bench.steps=2", "bench.warmup=1",
                                            "sampler.meta_batch_size=4"])
    GlobalHydra.instance().clear()
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line == result
    assert line["tasks_per_second"] > 0 and line["peak_memory_mb"] > 0
    assert line["meta_batch_size"] == 4 and line["steps"] == 2
