"""The ``metarun-reproduce`` command: run a preset for several seeds, test each seed's best
validation checkpoint on the fixed test episodes, and set the result beside the preset's
published number (``metarun/published.csv``) with a verdict.

The seeds run as one Hydra multirun of the ``metarun`` command (so any launcher works,
``hydra/launcher=submitit_slurm`` included), each in ``<out>/seed_<s>`` with
``ckpt_path=auto``: a seed whose ``results.json`` says ``completed`` is not run again, an
interrupted one continues from its own checkpoint. The report is ``reproduction.md``,
``reproduction.csv`` and ``reproduction.png`` in ``<out>``.
"""

from __future__ import annotations

import csv
import difflib
import json
import math
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from metarun.catalog import options
from metarun.errors import ConfigError
from metarun.published import Published, for_preset

HELP = """metarun-reproduce: run a preset for several seeds and compare it with its paper.

Each seed trains as `metarun experiment=<preset> seed=<s>` would (one Hydra multirun, in
<out>/seed_<s>, resumable: a finished seed is skipped, an interrupted one continues), its
best validation checkpoint is tested on the fixed test episodes, and the seeds are pooled
and set beside the published number of metarun/published.csv.

Usage:
  metarun-reproduce experiment=<preset> [seeds=3] [test_episodes=600] [out=<folder>] [override ...]

  experiment     a preset of conf/experiment (metarun --help lists them)
  seeds          how many seeds: 0, 1, ..., seeds-1 (default 3)
  test_episodes  fixed test episodes per seed (default 600; 10000 for a tighter interval)
  out            where the seeds and the report go (default reproductions/<preset>)
  override       any other metarun override, passed to every seed (hydra/launcher=... too);
                 an override makes the run differ from the preset, and the report says so

Examples:
  metarun-reproduce experiment=protonet_omniglot_5w1s
  metarun-reproduce experiment=protonet_omniglot_20w1s seeds=2 dataset.train_on=train+val
  metarun-reproduce experiment=maml_omniglot_5w1s seeds=5 test_episodes=10000
  metarun-reproduce experiment=maml_sinusoid seeds=2 trainer.max_steps=100
  metarun-reproduce experiment=protonet_mini_imagenet_5w1s hydra/launcher=submitit_slurm

Verdicts (accuracy against the published number, in points):
  inside the published CI   |ours - paper| <= the paper's 95% interval
  within 1 point            |ours - paper| <= 1
  above                     ours > paper + 1
  short                     ours < paper - 1
A preset without a published number (or a regression preset, measured in MSE) gets no verdict.

Outputs:
  <out>/seed_<s>/                   each seed's run (results.json, checkpoints, plots)
  <out>/reproduction.md|.csv|.png   per seed and pooled mean +- 95% CI, the paper, the verdict
"""

OWN_KEYS = ("experiment", "seeds", "test_episodes", "out")
CSV_COLUMNS = (
    "preset",
    "seed",
    "metric",
    "mean",
    "ci95",
    "episodes",
    "steps",
    "wall_seconds",
    "published",
    "published_ci95",
    "difference",
    "verdict",
    "source",
)


def fail(message: str, code: int = 2) -> None:
    print(f"metarun-reproduce: error: {message}", file=sys.stderr)
    sys.exit(code)


@dataclass(frozen=True)
class Request:
    """What the command line asks for."""

    preset: str
    seeds: int
    test_episodes: int
    out: Path
    overrides: tuple[str, ...]


def positive(key: str, value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise ConfigError(f"{key}={value} is not allowed: it must be a positive integer.")
    return number


def parse(argv: list[str]) -> Request:
    """``key=value`` arguments -> a `Request`; every mistake is one `ConfigError` sentence."""
    own: dict[str, str] = {}
    overrides = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if sep and key in OWN_KEYS:
            own[key] = value
        elif sep:
            overrides.append(arg)
        else:
            raise ConfigError(f"{arg!r} is not allowed: give key=value arguments (metarun-reproduce --help).")
    presets = options("experiment")
    if "experiment" not in own:
        raise ConfigError("experiment is not set: give experiment=<preset> (metarun-reproduce --help).")
    preset = own["experiment"]
    if preset not in presets:
        close = (
            difflib.get_close_matches(preset, list(presets), n=5, cutoff=0.6)
            or [name for name in presets if name.split("_")[0] == preset.split("_")[0]][:5]
        )
        hint = f"choose one of {', '.join(close)}" if close else "choose a preset"
        raise ConfigError(
            f"experiment={preset} is not allowed: conf/experiment has no such preset, so {hint} "
            f"(metarun --help lists all {len(presets)})."
        )
    for key in ("seed", "ckpt_path", "sampler.test_episodes", "hydra.sweep.dir", "hydra.sweep.subdir"):
        if any(o.split("=", 1)[0].lstrip("+") == key for o in overrides):
            raise ConfigError(
                f"{key} is not allowed here: metarun-reproduce sets it for each seed "
                f"(use seeds=, test_episodes= and out=)."
            )
    return Request(
        preset=preset,
        seeds=positive("seeds", own.get("seeds", "3")),
        test_episodes=positive("test_episodes", own.get("test_episodes", "600")),
        out=Path(own.get("out", f"reproductions/{preset}")).expanduser().resolve(),
        overrides=tuple(overrides),
    )


def seed_dir(request: Request, seed: int) -> Path:
    return request.out / f"seed_{seed}"


def run_overrides(request: Request) -> list[str]:
    """What every seed's run is given, besides its seed and Hydra's own keys."""
    return [
        f"experiment={request.preset}",
        "ckpt_path=auto",
        f"sampler.test_episodes={request.test_episodes}",
        *request.overrides,
    ]


def settings(overrides: list[str]) -> dict[str, Any]:
    """Overrides as {key: value}, parsed as Hydra parses them (``false`` and ``False`` alike),
    without the seed and Hydra's own keys."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    return {
        o.get_key_element(): o.value()
        for o in parsed
        if o.key_or_group != "seed" and not o.key_or_group.startswith("hydra")
    }


def check_same_run(request: Request, seed: int) -> None:
    """A seed folder that an earlier command started must have been given the same settings,
    so that finished and continued seeds are one reproduction."""
    saved = seed_dir(request, seed) / ".hydra" / "overrides.yaml"
    if not saved.is_file():
        return
    import yaml

    before, now = settings(yaml.safe_load(saved.read_text()) or []), settings(run_overrides(request))
    if before != now:
        changed = sorted(k for k in before.keys() | now.keys() if before.get(k, "unset") != now.get(k, "unset"))
        shown = ", ".join(f"{k}={before.get(k, 'unset')} there, {now.get(k, 'unset')} now" for k in changed[:3])
        raise ConfigError(
            f"out={request.out} is not allowed: its {seed_dir(request, seed).name} was run with other settings "
            f"({shown}), so give the same overrides as before or another out=."
        )


def finished(request: Request, seed: int) -> dict[str, Any] | None:
    """The seed's results.json if it completed with this request's test episodes."""
    path = seed_dir(request, seed) / "results.json"
    if not path.is_file():
        return None
    results = json.loads(path.read_text())
    tested = next(iter(results.get("test", {}).values()), {})
    if results.get("status") != "completed" or tested.get("episodes") != request.test_episodes:
        return None
    return results


def multirun(request: Request, seeds: list[int]) -> int:
    """Run ``seeds`` as one multirun of the installed ``metarun`` command; the exit code.
    SIGTERM / SIGINT are passed on, so each run saves its state and the command can resume."""
    command = [
        str(Path(sys.executable).parent / "metarun"),
        "-m",
        *run_overrides(request),
        f"seed={','.join(map(str, seeds))}",
        f"hydra.sweep.dir={request.out}",
        "hydra.sweep.subdir=seed_${seed}",
    ]
    proc = subprocess.Popen(command)

    def forward(signum: int, _frame: Any) -> None:
        proc.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        return proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


# ------------------------------------------------------------------ the numbers


@dataclass(frozen=True)
class Measured:
    """One seed's test result (or the pooled one): the metric's mean and 95% half-width,
    in % for accuracy, as is for MSE."""

    label: str
    mean: float
    ci95: float
    episodes: int
    steps: int | None = None
    wall_seconds: float | None = None


def measured(seed: int, results: dict[str, Any], metric: str) -> Measured:
    scale = 100.0 if metric == "accuracy" else 1.0
    test = results["test"][metric]
    return Measured(
        label=f"seed {seed}",
        mean=test["mean"] * scale,
        ci95=test["ci95"] * scale,
        episodes=int(test["episodes"]),
        steps=results["train"]["steps"],
        wall_seconds=results["train"].get("wall_seconds"),
    )


def pooled(seeds: list[Measured]) -> Measured:
    """All seeds' test episodes as one sample: its mean and 1.96·s/√N, from each seed's mean,
    half-width and episode count (each half-width is 1.96·s_i/√n_i, s_i with n_i − 1)."""
    total = sum(m.episodes for m in seeds)
    mean = sum(m.mean * m.episodes for m in seeds) / total
    squares = sum(
        (m.episodes - 1) * (m.ci95 / 1.96) ** 2 * m.episodes + m.episodes * (m.mean - mean) ** 2 for m in seeds
    )
    ci95 = 1.96 * math.sqrt(squares / (total - 1) / total) if total > 1 else 0.0
    return Measured("pooled", mean, ci95, total)


def verdict(ours: float, paper: Published | None) -> str | None:
    """How an accuracy (%) compares with the published one; None without a published number."""
    if paper is None:
        return None
    difference = ours - paper.accuracy
    if paper.ci95 is not None and abs(difference) <= paper.ci95:
        return "inside the published CI"
    if abs(difference) <= 1.0:
        return "within 1 point"
    return "above" if difference > 0 else "short"


# ------------------------------------------------------------------ what the run was


def setting(config: dict[str, Any], experiment: dict[str, Any]) -> list[tuple[str, str]]:
    """The settings a paper states, read from a seed's composed config (not typed here)."""
    dataset, model, trainer = config["dataset"], config["model"], config["trainer"]
    data = f"{experiment['dataset']}"
    if "split_scheme" in dataset:
        data += f", {dataset['split_scheme']} split"
    if dataset.get("train_on", "train") != "train":
        data += f", trained on {dataset['train_on']}"
    if config.get("test_dataset"):  # cross-domain: meta-tested on another dataset
        test = config["test_dataset"]
        data += f", meta-tested on {experiment['test_dataset']}" + (f" {test['domain']}" if "domain" in test else "")
    width = next((f"{k} {model[k]}" for k in ("hidden", "widths", "name") if k in model), "")
    shape = f"{experiment['ways']}-way {experiment['shots']}-shot"
    if (experiment.get("train_ways"), experiment.get("train_shots")) != (experiment["ways"], experiment["shots"]):
        shape += f" (trained {experiment.get('train_ways')}-way {experiment.get('train_shots')}-shot)"
    rows = [
        ("data", data),
        ("episodes", shape),
        ("training steps", f"{trainer['max_steps']:,}"),
        ("backbone", f"{model['_target_'].rsplit('.', 1)[-1]} {width}".strip()),
    ]
    if "norm" in model:
        rows.append(("batch norm", str(model["norm"])))
    if "mean" in dataset:  # an image dataset
        normalised = dataset["mean"] is not None
        rows.append(
            ("normalisation", f"mean {dataset['mean']}, std {dataset['std']}" if normalised else "pixels in [0, 1]")
        )
    return [*rows, ("precision", str(trainer["precision"])), ("inference", experiment.get("inference", "inductive"))]


def preset_comment(preset: str) -> list[str]:
    """The preset file's opening comment: its source and what differs from the paper."""
    lines = []
    for line in options("experiment")[preset].read_text().splitlines():
        if not line.startswith("#"):
            break
        if not line.startswith("# @package"):
            lines.append(line.lstrip("# ").rstrip())
    return lines


# ------------------------------------------------------------------ the report


def report(request: Request, results: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """Write reproduction.md / .csv / .png in ``request.out``; the pooled row."""
    first = results[min(results)]
    metric = "mse" if "mse" in first["test"] else "accuracy"
    unit = "%" if metric == "accuracy" else ""
    paper = for_preset(request.preset) if metric == "accuracy" else None
    seeds = [measured(seed, results[seed], metric) for seed in sorted(results)]
    pool = pooled(seeds)
    judged = verdict(pool.mean, paper)
    rows = []
    for seed, m in zip(sorted(results), seeds, strict=True):
        rows.append(row(request, str(seed), metric, m, paper, verdict(m.mean, paper)))
    rows.append(row(request, "pooled", metric, pool, paper, judged))
    with open(request.out / "reproduction.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    picture(request, seeds, pool, paper, metric)
    lines = [f"# Reproduction: `{request.preset}`", ""]
    lines += [
        f"{len(seeds)} seed(s), each tested with its best validation checkpoint on {request.test_episodes} "
        f"fixed test episodes; {metric}, mean ± 95% CI.",
        "",
        "| run | " + metric + " | episodes | steps | wall (s) |",
        "|---|---|---|---|---|",
    ]
    for m in [*seeds, pool]:
        wall = f"{m.wall_seconds:.1f}" if m.wall_seconds is not None else ""
        lines.append(f"| {m.label} | {m.mean:.2f} ± {m.ci95:.2f}{unit} | {m.episodes} | {m.steps or ''} | {wall} |")
    lines.append("")
    if paper is not None:
        lines += [
            f"Published: **{paper.text}%** ({paper.source}).",
            f"Ours (pooled): **{pool.mean:.2f} ± {pool.ci95:.2f}%**, difference {pool.mean - paper.accuracy:+.2f} "
            f"points: **{judged}**.",
        ]
    elif metric == "mse":
        lines.append("No verdict: published.csv holds accuracies, and this preset is measured in MSE.")
    else:
        lines.append(
            "No verdict: this preset has no published number in metarun/published.csv, so there is "
            "nothing to compare with."
        )
    lines += ["", "## The setting (read from the seeds' composed config)", "", "| | |", "|---|---|"]
    lines += [f"| {key} | {value} |" for key, value in setting(first["config"], first["experiment"])]
    lines += [""]
    if request.overrides:
        lines += [
            "Changed from the preset (so from the paper's setting that it encodes): "
            + ", ".join(f"`{o}`" for o in request.overrides)
            + ".",
            "",
        ]
    else:
        lines += ["Run as the preset is written: no override.", ""]
    comment = preset_comment(request.preset)
    if comment:
        lines += ["The preset says:", "", *[f"> {line}" for line in comment], ""]
    lines += ["![reproduction](reproduction.png)", ""]
    (request.out / "reproduction.md").write_text("\n".join(lines))
    return rows[-1]


def row(
    request: Request, seed: str, metric: str, m: Measured, paper: Published | None, judged: str | None
) -> dict[str, Any]:
    return {
        "preset": request.preset,
        "seed": seed,
        "metric": metric,
        "mean": f"{m.mean:.4f}",
        "ci95": f"{m.ci95:.4f}",
        "episodes": m.episodes,
        "steps": m.steps if m.steps is not None else "",
        "wall_seconds": f"{m.wall_seconds:.1f}" if m.wall_seconds is not None else "",
        "published": paper.accuracy if paper else "",
        "published_ci95": paper.ci95 if paper and paper.ci95 is not None else "",
        "difference": f"{m.mean - paper.accuracy:+.4f}" if paper else "",
        "verdict": judged or "",
        "source": paper.source if paper else "",
    }


def picture(request: Request, seeds: list[Measured], pool: Measured, paper: Published | None, metric: str) -> Path:
    """Each seed and the pool as a point with its 95% interval; the paper as a line and band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [*seeds, pool]
    fig, ax = plt.subplots(figsize=(1.2 * len(runs) + 4.5, 3.6))
    for i, m in enumerate(runs):
        colour = "#1f4e79" if m is pool else "#5b9bd5"
        ax.errorbar(i, m.mean, yerr=m.ci95, fmt="o", color=colour, capsize=4, markersize=6 if m is pool else 4)
    if paper is not None:
        ax.axhline(paper.accuracy, color="#c55a11", lw=1.5, label=f"published {paper.text}%")
        if paper.ci95:
            ax.axhspan(paper.accuracy - paper.ci95, paper.accuracy + paper.ci95, color="#c55a11", alpha=0.15)
        # beside the axes, not on them: inside, it hid the end of an interval
        ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8, borderaxespad=0.0)
    ax.set_xticks(range(len(runs)), [m.label for m in runs])
    ax.set_ylabel("test accuracy (%)" if metric == "accuracy" else "test MSE")
    ax.set_title(f"{request.preset}: {len(seeds)} seed(s), {request.test_episodes} test episodes each", fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path = request.out / "reproduction.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def reproduce(request: Request) -> dict[str, Any]:
    """Run the seeds that have not finished, then write the report; the pooled row."""
    for seed in range(request.seeds):
        check_same_run(request, seed)
    request.out.mkdir(parents=True, exist_ok=True)
    todo = [seed for seed in range(request.seeds) if finished(request, seed) is None]
    for seed in range(request.seeds):
        if seed not in todo:
            print(f"metarun-reproduce: seed {seed} finished earlier ({seed_dir(request, seed)}): not run again")
    if todo:
        code = multirun(request, todo)
        if code > 128:  # a signal: each run saved its state (its own line says how to resume it alone)
            print(
                "metarun-reproduce: interrupted, so run the same command again to continue: finished seeds "
                "are not run again and the interrupted one continues from its checkpoint.",
                file=sys.stderr,
            )
        if code != 0:
            sys.exit(code)  # the run printed why
    results = {}
    for seed in range(request.seeds):
        done = finished(request, seed)
        if done is None:
            raise ConfigError(
                f"seed {seed} did not finish in {seed_dir(request, seed)}, so run the same command again "
                f"to continue it."
            )
        results[seed] = done
    pooled_row = report(request, results)
    print(f"metarun-reproduce: {request.out / 'reproduction.md'}")
    verdict_text = f": {pooled_row['verdict']}" if pooled_row["verdict"] else " (no published number: no verdict)"
    print(
        f"metarun-reproduce: {request.preset}, {request.seeds} seed(s): {pooled_row['metric']} "
        f"{float(pooled_row['mean']):.2f} ± {float(pooled_row['ci95']):.2f}{verdict_text}"
    )
    return pooled_row


def main() -> None:
    argv = sys.argv[1:]
    if any(a in ("-h", "--help") for a in argv):
        print(HELP, end="")
        return
    try:
        reproduce(parse(argv))
    except ConfigError as err:
        fail(str(err))


if __name__ == "__main__":
    main()
