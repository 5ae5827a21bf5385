"""The README's results tables: every algorithm on Omniglot and on sinusoids, one budget each.

    python scripts/bench_grid.py omniglot [--time 00:00:01:30] [--episodes 100] [--jobs 2] [--algos maml protonet]
    python scripts/bench_grid.py sinusoid [--time 00:00:02:00]
    python scripts/bench_grid.py table    # print both markdown tables from what has been run

Each cell is one `metarun` run in ``<out>/<grid>/<algo>/<shape>/`` with a wall-clock
training budget (``trainer.max_time``) and no validation during training, so the whole
budget goes to training and the final weights are tested on the fixed test episodes
(``--episodes``, 100 by default). Runs go ``--jobs`` at a time, each on one CPU thread. A cell whose
``results.json`` exists is skipped, so an interrupted grid picks up where it stopped.

An Omniglot cell uses the paper preset ``experiment=<algo>_omniglot_<shape>`` when there is
one, else the preset of the same ways with ``sampler.shots=5``, else the 5-way preset with
``sampler.ways=20`` (see ``omniglot_overrides``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from metarun.catalog import learners_for
from metarun.published import lookup

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = ROOT / "conf" / "experiment"
SHAPES = ("5w1s", "5w5s", "20w1s", "20w5s")

# Display names of the learners, and the Omniglot rows that are variants of one learner's
# preset (README name, preset prefix, extra overrides). Every other classification learner
# in conf/algorithm/ gets a row of its own, named after its config, with the preset
# ``<name>_omniglot_<shape>``: a new learner needs no edit here.
NAMES = {
    "maml": "MAML",
    "anil": "ANIL",
    "meta_sgd": "Meta-SGD",
    "maml_plus_plus": "MAML++",
    "reptile": "Reptile (transductive)",
    "lstm_optimizer": "LSTM optimiser",
    "protonet": "ProtoNet",
    "matching_net": "Matching Nets",
    "relation_net": "Relation Net",
}
VARIANTS = {
    "fomaml": [("fomaml", "FOMAML", "maml", ["algorithm.first_order=true"])],
    "finetune": [
        ("baseline", "Baseline (fine-tuning)", "finetune", []),
        ("baseline_pp", "Baseline++ (fine-tuning)", "finetune_pp", []),
    ],
}


def omniglot_rows() -> dict[str, tuple[str, str, list[str]]]:
    """row key -> (README name, preset prefix, extra overrides), from conf/algorithm/."""
    rows: dict[str, tuple[str, str, list[str]]] = {}
    for algo in learners_for("classification"):
        for key, name, prefix, extra in VARIANTS.get(algo, [(algo, NAMES.get(algo, algo), algo, [])]):
            rows[key] = (name, prefix, extra)
    return rows


OMNIGLOT = omniglot_rows()


def paper(algo: str, shape: str) -> str | None:
    """The published Omniglot accuracy of a row at ``shape`` (metarun/published.csv), as printed."""
    ways, shots = shape.rstrip("s").split("w")
    found = lookup(algo, "omniglot", int(ways), int(shots))
    return None if found is None else found.printed.split(" ")[0]


# Relation Net's training query counts per shape (Sung et al. 2018, section 4.1).
RELATION_QUERIES = {"5w1s": 19, "5w5s": 15, "20w1s": 10, "20w5s": 5}

SINUSOID = {
    "maml": ("MAML", ["experiment=maml_sinusoid"]),
    "fomaml": ("FOMAML", ["experiment=maml_sinusoid", "algorithm.first_order=true"]),
    "reptile": ("Reptile", ["algorithm=reptile"]),
    "meta_sgd": ("Meta-SGD", ["algorithm=meta_sgd"]),
    "cnp": ("CNP", ["experiment=cnp_sinusoid"]),
    "np": ("NP", ["experiment=np_sinusoid"]),
}
SINUSOID_SHOTS = (5, 10)


def omniglot_overrides(algo: str, shape: str) -> list[str]:
    """The paper preset for this cell, adapted to its shape when no exact preset exists."""
    _, prefix, extra = OMNIGLOT[algo]
    ways, shots = shape.split("w")
    shots = shots.rstrip("s")
    for name, adapt in (
        (f"{prefix}_omniglot_{shape}", []),
        (f"{prefix}_omniglot_{ways}w1s", [f"sampler.shots={shots}"]),
        (f"{prefix}_omniglot_5w1s", [f"sampler.ways={ways}", f"sampler.shots={shots}"]),
        (f"{prefix}_omniglot_20w1s", [f"sampler.ways={ways}", f"sampler.shots={shots}"]),
    ):
        if (EXPERIMENTS / f"{name}.yaml").exists():
            out = [f"experiment={name}", *adapt, *extra]
            if algo == "relation_net":
                out.append(f"sampler.train_queries={RELATION_QUERIES[shape]}")
            if ways == "20" and name.endswith("5w1s") and algo not in ("baseline", "baseline_pp"):
                out.append("sampler.meta_batch_size=16")  # as maml_omniglot_20w1s
            return out
    # no paper preset: the learner's own config on Omniglot at this shape
    return ["dataset=omniglot", f"algorithm={prefix}", f"sampler.ways={ways}", f"sampler.shots={shots}", *extra]


def cells(grid: str, algos: list[str]) -> list[tuple[str, str, list[str]]]:
    if grid == "omniglot":
        return [(a, s, omniglot_overrides(a, s)) for a in algos for s in SHAPES]
    return [
        (a, f"k{k}", [*SINUSOID[a][1], f"sampler.shots={k}", "trainer.max_steps=70000"])
        for a in algos
        for k in SINUSOID_SHOTS
    ]


def run_cell(out: Path, overrides: list[str], budget: str, episodes: int) -> str:
    if (out / "results.json").exists():
        return f"skip {out} (results.json exists)"
    out.mkdir(parents=True, exist_ok=True)
    (out / "failed.txt").unlink(missing_ok=True)
    command = [
        sys.executable,
        "-m",
        "metarun.train",
        *overrides,
        f"trainer.max_time={budget}",
        "trainer.val_check_interval=100000000",
        f"sampler.test_episodes={episodes}",
        "trainer.enable_progress_bar=false",
        "logger=csv",
        f"hydra.run.dir={out}",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    start = time.perf_counter()
    with (out / "bench.log").open("w") as log:
        log.write(" ".join(command) + "\n")
        log.flush()
        rc = subprocess.call(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    if rc != 0:  # shown in the table instead of a number; rc -9 is a SIGKILL (e.g. out of memory)
        (out / "failed.txt").write_text(f"rc={rc}\n")
    return f"{'done' if rc == 0 else f'FAILED rc={rc}'} {out} ({time.perf_counter() - start:.0f} s)"


def cell_result(out: Path) -> dict | None:
    path = out / "results.json"
    return json.loads(path.read_text()) if path.exists() else None


def failure(out: Path) -> str:
    """What a cell without results shows: "not run", or how its run ended."""
    failed = out / "failed.txt"
    if not failed.exists():
        return "not run"
    rc = failed.read_text().strip()
    return "killed, out of memory" if rc == "rc=-9" else f"failed ({rc})"


def fmt_steps(steps: int) -> str:
    return f"{steps} step" if steps == 1 else f"{steps} steps"


def omniglot_table(root: Path) -> str:
    lines = ["| Algorithm | 5-way 1-shot | 5-way 5-shot | 20-way 1-shot | 20-way 5-shot |", "|---|---|---|---|---|"]
    for algo, (name, _, _) in OMNIGLOT.items():
        row = [name]
        for shape in SHAPES:
            published = paper(algo, shape)
            paper_text = "—" if published is None else published
            result = cell_result(root / "omniglot" / algo / shape)
            if result is None:
                row.append(f"{failure(root / 'omniglot' / algo / shape)} ({paper_text})")
                continue
            acc = result["test"]["accuracy"]
            steps = result["train"]["steps"]
            row.append(f"{100 * acc['mean']:.1f} ± {100 * acc['ci95']:.1f} ({paper_text}) <br>{fmt_steps(steps)}")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def sinusoid_table(root: Path) -> str:
    lines = ["| Algorithm | K = 5 | K = 10 |", "|---|---|---|"]  # test MSE (and log-likelihood)
    for algo, (name, _) in SINUSOID.items():
        row = [name]
        for k in SINUSOID_SHOTS:
            result = cell_result(root / "sinusoid" / algo / f"k{k}")
            if result is None:
                row.append(failure(root / "sinusoid" / algo / f"k{k}"))
                continue
            mse, steps = result["test"]["mse"], result["train"]["steps"]
            text = f"{mse['mean']:.3f} ± {mse['ci95']:.3f}"
            if "log_likelihood" in result["test"]:  # the neural processes' predictive density
                ll = result["test"]["log_likelihood"]
                text += f" <br>log-lik. {ll['mean']:.2f} ± {ll['ci95']:.2f}"
            row.append(f"{text} <br>{fmt_steps(steps)}")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("grid", choices=("omniglot", "sinusoid", "table"))
    parser.add_argument("--time", default="00:00:01:30", help="training budget per cell, DD:HH:MM:SS")
    parser.add_argument(
        "--episodes", type=int, default=100, help="fixed test episodes per cell (the first N of the same list)"
    )
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time, one thread each")
    parser.add_argument("--algos", nargs="*", default=None, help="default: every algorithm")
    parser.add_argument("--shapes", nargs="*", default=None, help="Omniglot shapes, e.g. 5w1s")
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "bench")
    args = parser.parse_args(argv)
    if args.grid == "table":
        print(omniglot_table(args.out), sinusoid_table(args.out), sep="\n\n")
        return
    known = OMNIGLOT if args.grid == "omniglot" else SINUSOID
    algos = args.algos or list(known)
    unknown = [a for a in algos if a not in known]
    if unknown:
        raise SystemExit(f"bench_grid: error: unknown {args.grid} algorithm(s) {unknown}; choose from {sorted(known)}")
    todo = [
        c
        for c in cells(args.grid, algos)
        if args.shapes is None or c[1] in args.shapes or c[1].lstrip("k") in args.shapes
    ]
    with ThreadPoolExecutor(args.jobs) as pool:
        for line in pool.map(
            lambda c: run_cell(args.out / args.grid / c[0] / c[1], c[2], args.time, args.episodes), todo
        ):
            print(line, flush=True)


if __name__ == "__main__":
    main()
