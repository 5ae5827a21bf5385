"""Summarise a multirun directory: one row per run, as a markdown table and a CSV file.

    python scripts/summarize.py outputs/train/multiruns/<date> [--csv out.csv]

Each row: the run's overrides, the test metric mean ± 95% CI, and training tasks/s.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import yaml


def rows(sweep_dir: Path) -> list[dict[str, str]]:
    out = []
    for results_file in sorted(sweep_dir.rglob("results.json")):
        run = results_file.parent
        results = json.loads(results_file.read_text())
        overrides_file = run / ".hydra" / "overrides.yaml"
        overrides = yaml.safe_load(overrides_file.read_text()) if overrides_file.exists() else []
        metric, value = next(iter(results["test"].items()))
        scale = 100.0 if metric == "accuracy" else 1.0
        tps = results.get("train", {}).get("tasks_per_second")
        out.append({
            "run": str(run.relative_to(sweep_dir)),
            "overrides": " ".join(overrides),
            "metric": metric,
            "mean": f"{value['mean'] * scale:.2f}",
            "ci95": f"{value['ci95'] * scale:.2f}",
            "result": f"{value['mean'] * scale:.2f} ± {value['ci95'] * scale:.2f}",
            "episodes": str(value["episodes"]),
            "tasks_per_second": "" if tps is None else f"{tps:.1f}",
        })
    return out


def markdown(table: list[dict[str, str]]) -> str:
    lines = ["| run | overrides | test | tasks/s |", "|---|---|---|---|"]
    for r in table:
        lines.append(f"| {r['run']} | {r['overrides']} | {r['metric']} {r['result']} "
                     f"({r['episodes']} ep.) | {r['tasks_per_second']} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", type=Path)
    parser.add_argument("--csv", type=Path, default=None, help="default: <sweep_dir>/summary.csv")
    args = parser.parse_args()
    table = rows(args.sweep_dir)
    if not table:
        raise SystemExit(f"summarize: error: no results.json under {args.sweep_dir}")
    print(markdown(table))
    path = args.csv or args.sweep_dir / "summary.csv"
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(table[0]))
        writer.writeheader()
        writer.writerows(table)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
