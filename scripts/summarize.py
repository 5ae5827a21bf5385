"""Summarise a multirun directory: one row per run, as a markdown table and a CSV file, and
a plot of the test metric against the swept values.

    python scripts/summarize.py outputs/train/multiruns/<date> [--csv out.csv]

Each row: the run's overrides, its inference (inductive, or which transductive method labelled
the test queries), the test metric mean ± 95% CI, and training tasks/s. The plot
(``summary.png`` in the sweep directory) puts the first numeric swept key on the x axis
(e.g. ``sampler.shots``) and draws one line per value of the other swept keys (e.g. one per
algorithm), with the 95% CI as error bars.
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
        out.append(
            {
                "run": str(run.relative_to(sweep_dir)),
                "overrides": " ".join(overrides),
                "metric": metric,
                "mean": f"{value['mean'] * scale:.2f}",
                "ci95": f"{value['ci95'] * scale:.2f}",
                "result": f"{value['mean'] * scale:.2f} ± {value['ci95'] * scale:.2f}",
                "episodes": str(value["episodes"]),
                "inference": results.get("experiment", {}).get("inference", "inductive"),
                "tasks_per_second": "" if tps is None else f"{tps:.1f}",
            }
        )
    return out


def _number(value: str | None) -> bool:
    try:
        float(value)  # type: ignore[arg-type]
        return True
    except (TypeError, ValueError):
        return False


def plot(table: list[dict[str, str]], path: Path) -> dict | None:
    """The metric against the swept values; returns what was drawn, or None if nothing varies."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [dict(o.lstrip("+").split("=", 1) for o in row["overrides"].split() if "=" in o) for row in table]
    swept = [k for k in sorted({k for r in runs for k in r}) if len({r.get(k) for r in runs}) > 1]
    if not swept:
        return None
    numeric = [k for k in swept if all(_number(r.get(k)) for r in runs)]
    x_key = numeric[0] if numeric else swept[0]
    others = [k for k in swept if k != x_key]
    lines: dict[str, list[tuple]] = {}
    for run, row in zip(runs, table):
        label = ", ".join(f"{k}={run.get(k)}" for k in others) or row["metric"]
        x = float(run[x_key]) if numeric else str(run.get(x_key))
        lines.setdefault(label, []).append((x, float(row["mean"]), float(row["ci95"])))
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, points in sorted(lines.items()):
        points.sort(key=lambda p: p[0])
        ax.errorbar(
            [p[0] for p in points],
            [p[1] for p in points],
            yerr=[p[2] for p in points],
            marker="o",
            capsize=3,
            label=label,
        )
    unit = " (%)" if table[0]["metric"] == "accuracy" else ""
    ax.set_xlabel(x_key)
    ax.set_ylabel(f"test {table[0]['metric']}{unit}, 95% CI")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return {"x": x_key, "lines": sorted(lines), "path": str(path)}


def markdown(table: list[dict[str, str]]) -> str:
    lines = ["| run | overrides | inference | test | tasks/s |", "|---|---|---|---|---|"]
    for r in table:
        lines.append(
            f"| {r['run']} | {r['overrides']} | {r['inference']} | {r['metric']} {r['result']} "
            f"({r['episodes']} ep.) | {r['tasks_per_second']} |"
        )
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
    drawn = plot(table, args.sweep_dir / "summary.png")
    if drawn:
        print(f"wrote {drawn['path']} ({table[0]['metric']} against {drawn['x']}, {len(drawn['lines'])} lines)")


if __name__ == "__main__":
    main()
