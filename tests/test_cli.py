"""Bad input stops before training with one sentence naming the key, the value and what is allowed.

Most cases call `metarun.train.build` in-process; a few run the real `metarun` command to
check the exit code, the ``metarun: error:`` line and that no traceback is shown (unless
``HYDRA_FULL_ERROR=1``).
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException
from PIL import Image

from metarun.build import build
from metarun.errors import ConfigError
from metarun.runner import train
from tests.conftest import CONFIG_DIR, ROOT, TINY, compose_config

METARUN = str(Path(sys.executable).parent / "metarun")


def assert_one_sentence(message: str, *parts: str) -> None:
    """One line ending in a full stop, naming every part (key, value, what is allowed)."""
    assert "\n" not in message and message.endswith("."), message
    for part in parts:
        assert part in message, (part, message)


def build_error(tmp_path: Path, *overrides: str) -> str:
    cfg = compose_config([*TINY, *overrides], tmp_path / "run")
    with pytest.raises(ConfigError) as caught:
        build(cfg)
    return str(caught.value)


# ------------------------------------------------------------------ episode shapes and settings


@pytest.mark.parametrize(
    "override, message",
    [
        (
            "sampler.ways=2",
            "sampler.ways=2 is not allowed for sinusoid regression: a task is one function, so ways must be 1.",
        ),
        ("sampler.ways=0", "sampler.ways=0 is not allowed: it must be a positive integer."),
        ("sampler.ways=-5", "sampler.ways=-5 is not allowed: it must be a positive integer."),
        ("sampler.shots=0", "sampler.shots=0 is not allowed: it must be a positive integer."),
        ("sampler.shots=-1", "sampler.shots=-1 is not allowed: it must be a positive integer."),
        ("sampler.meta_batch_size=0", "sampler.meta_batch_size=0 is not allowed: it must be a positive integer."),
        ("algorithm.inner_lr=0", "algorithm.inner_lr=0 is not allowed: it must be a positive number."),
        ("algorithm.inner_lr=-0.01", "algorithm.inner_lr=-0.01 is not allowed: it must be a positive number."),
        ("algorithm.inner_steps=0", "algorithm.inner_steps=0 is not allowed: it must be a positive integer."),
        (
            "dataset._target_=collections.OrderedDict",
            "dataset._target_=collections.OrderedDict is not allowed: it is not a subclass of "
            "metarun.datasets.base.Dataset, so name one.",
        ),
    ],
)
def test_bad_setting_is_one_sentence(tmp_path, override, message):
    got = build_error(tmp_path, override)
    assert got == message
    assert_one_sentence(got, override)


def test_bad_setting_stops_before_training(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match=r"^algorithm\.inner_steps=0 is not allowed"):
        train(compose_config([*TINY, "algorithm.inner_steps=0"], out))
    assert not (out / "checkpoints").exists() and not (out / "results.json").exists()


def test_too_many_ways_for_real_omniglot(omniglot_available, tmp_path):
    got = build_error(tmp_path, "dataset=omniglot", "sampler.ways=1000")
    assert got == (
        "sampler.ways=1000 is not allowed: split omniglot/vinyals/val has only 688 "
        "classes, so ways must be at most 688."
    )


def test_too_many_shots_and_queries_for_real_omniglot(omniglot_available, tmp_path):
    got = build_error(tmp_path, "dataset=omniglot", "sampler.shots=10", "sampler.queries=15")
    assert got == (
        "sampler.shots + sampler.queries = 10 + 15 = 25 is not allowed: split "
        "omniglot/vinyals/val has only 20 images in its smallest class (Hebrew/character01/rot000), "
        "so lower sampler.shots or sampler.queries to a sum of at most 20, or give that class more images."
    )


# ------------------------------------------------------------------ Omniglot files on disk


def png(size: int = 12) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (size, size), 255).save(buffer, format="PNG")
    return buffer.getvalue()


def write_archive(path: Path, part: str, alphabets: list[str], characters: int, drawings: int):
    image = png()
    with zipfile.ZipFile(path, "w") as archive:
        for alphabet in alphabets:
            for c in range(1, characters + 1):
                for d in range(1, drawings + 1):
                    archive.writestr(f"{part}/{alphabet}/character{c:02d}/{c:04d}_{d:02d}.png", image)


@pytest.fixture
def small_omniglot(tmp_path) -> list[str]:
    """Official-layout archives, Lake's split: train 8 classes, val 20, test 8; 3 drawings each."""
    root = tmp_path / "data" / "omniglot"
    root.mkdir(parents=True)
    write_archive(
        root / "images_background.zip",
        "images_background",
        [f"Background{i}" for i in range(7)],
        characters=1,
        drawings=3,
    )
    write_archive(root / "images_evaluation.zip", "images_evaluation", ["Evaluation"], characters=2, drawings=3)
    # dataset.root, not paths.data_dir: compose_config sets paths.data_dir from METARUN_DATA_DIR
    return [
        "dataset=omniglot",
        "dataset.split_scheme=lake",
        "dataset.download=false",
        f"dataset.root={root}",
        f"paths.cache_dir={tmp_path / 'cache'}",
    ]


def test_too_many_ways_for_a_split(tmp_path, small_omniglot):
    got = build_error(tmp_path, *small_omniglot, "sampler.ways=9", "sampler.shots=1", "sampler.queries=1")
    assert got == (
        "sampler.ways=9 is not allowed: split omniglot/lake/test has only 8 classes, so ways must be at most 8."
    )


def test_too_many_shots_and_queries_for_a_class(tmp_path, small_omniglot):
    got = build_error(tmp_path, *small_omniglot, "sampler.ways=2", "sampler.shots=2", "sampler.queries=2")
    assert got == (
        "sampler.shots + sampler.queries = 2 + 2 = 4 is not allowed: split "
        "omniglot/lake/val has only 3 images in its smallest class (Background2/character01/rot000), "
        "so lower sampler.shots or sampler.queries to a sum of at most 3, or give that class more images."
    )


def test_missing_data_directory(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    got = build_error(
        tmp_path,
        "dataset=omniglot",
        f"dataset.root={empty / 'omniglot'}",
        f"paths.cache_dir={tmp_path / 'cache'}",
        "dataset.download=false",
    )
    assert_one_sentence(
        got, f"dataset.root={empty / 'omniglot'}", "images_background.zip", "dataset.download=false", "METARUN_DATA_DIR"
    )
    assert not (tmp_path / "cache").exists()


def test_corrupt_archive(tmp_path, small_omniglot):
    archive = tmp_path / "data" / "omniglot" / "images_background.zip"
    data = archive.read_bytes()
    archive.write_bytes(data[: len(data) // 2])  # an interrupted download
    got = build_error(tmp_path, *small_omniglot)
    assert_one_sentence(
        got, f"dataset.root={archive.parent}", str(archive), "is truncated or corrupt", "BadZipFile", "delete it"
    )


# ------------------------------------------------------------------ unknown group options


@pytest.mark.parametrize("group", ["algorithm", "dataset"])
def test_unknown_option_lists_the_choices(tmp_path, group):
    with pytest.raises(ConfigCompositionException) as caught:
        compose_config([f"{group}=nope"], tmp_path)
    message = str(caught.value)
    assert f"Could not find '{group}/nope'" in message
    options = sorted(p.stem for p in (Path(CONFIG_DIR) / group).glob("*.yaml"))
    assert f"Available options in '{group}':\n\t" + "\n\t".join(options) in message


# ------------------------------------------------------------------ the real command


class Commands:
    """Bad ``metarun`` commands, started together when this module starts: each pays ~6 s of
    imports, which then overlap the in-process tests above."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        (tmp / "empty").mkdir()
        cases = {
            "missing_data": (
                [
                    "dataset=omniglot",
                    f"paths.data_dir={tmp / 'empty'}",
                    f"paths.cache_dir={tmp / 'cache'}",
                    "dataset.download=false",
                ],
                {},
            ),
            "inner_lr_full_error": (["algorithm.inner_lr=0"], {"HYDRA_FULL_ERROR": "1"}),
            "unknown_algorithm": (["algorithm=nope"], {}),
        }
        env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
        env["OMP_NUM_THREADS"] = "1"
        self.procs = {
            name: subprocess.Popen(
                [METARUN, *overrides, "logger=none", f"hydra.run.dir={tmp / name}"],
                cwd=ROOT,
                env=env | extra,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for name, (overrides, extra) in cases.items()
        }
        self.done: dict[str, subprocess.CompletedProcess] = {}

    def __getitem__(self, name: str) -> subprocess.CompletedProcess:
        if name not in self.done:
            proc = self.procs[name]
            stdout, stderr = proc.communicate(timeout=300)
            self.done[name] = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
        return self.done[name]

    def close(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
            proc.communicate()


@pytest.fixture(scope="module", autouse=True)
def commands(tmp_path_factory):
    started = Commands(tmp_path_factory.mktemp("cli"))
    yield started
    started.close()


def test_command_prints_one_error_line_and_no_traceback(commands):
    run = commands["missing_data"]
    assert run.returncode == 2, run.stderr
    sentence = (
        f"dataset.root={commands.tmp / 'empty' / 'omniglot'} has no images_background.zip "
        f"(nor an extracted images_background/ folder) and dataset.download=false, so "
    )
    assert f"metarun: error: {sentence}" in run.stderr
    error_lines = [line for line in run.stderr.splitlines() if "error" in line.lower()]
    assert len(error_lines) == 1 and error_lines[0].startswith("metarun: error: ")
    assert_one_sentence(error_lines[0])
    assert "Traceback" not in run.stderr + run.stdout
    assert not list((commands.tmp / "missing_data").rglob("*.ckpt"))
    assert not (commands.tmp / "missing_data" / "results.json").exists()


def test_command_shows_the_traceback_with_hydra_full_error(commands):
    run = commands["inner_lr_full_error"]
    assert run.returncode != 0
    assert "Traceback" in run.stderr
    assert "ConfigError: algorithm.inner_lr=0 is not allowed: it must be a positive number." in run.stderr
    assert "metarun: error:" not in run.stderr


def test_command_with_unknown_algorithm_lists_the_choices(commands):
    run = commands["unknown_algorithm"]
    assert run.returncode != 0
    assert "Could not find 'algorithm/nope'" in run.stderr
    options = sorted(p.stem for p in (Path(CONFIG_DIR) / "algorithm").glob("*.yaml"))
    assert "Available options in 'algorithm':\n\t" + "\n\t".join(options) in run.stderr
    assert "Traceback" not in run.stderr + run.stdout


def test_help_of_each_command_says_what_it_does_with_examples():
    """--help: what the command does, copy-paste examples, the groups (from conf/), the outputs."""
    from metarun.catalog import options
    from tests.conftest import COMMAND_ENV, EVAL, METARUN, PREDICT

    texts = {}
    for exe in (METARUN, EVAL, PREDICT):
        done = subprocess.run([exe, "--help"], env=COMMAND_ENV, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        assert "powered by Hydra" not in done.stdout and "Examples:" in done.stdout and "Outputs:" in done.stdout
        texts[Path(exe).name] = done.stdout
    assert texts["metarun"].startswith("metarun: meta-train, validate and test")
    assert texts["metarun"].count("\n  metarun ") >= 5
    for name in [*options("algorithm"), *options("dataset"), *options("experiment")]:
        assert name in texts["metarun"], name
    assert texts["metarun-eval"].count("\n  metarun-eval ") >= 4
    predict = texts["metarun-predict"]
    assert "Formats:" in predict and "support/<class>/<image>" in predict and predict.count("\n  metarun-predict ") >= 4
    assert "dataset" not in predict.split("Formats:")[0]  # no unrelated groups


def test_a_failed_command_leaves_no_run_directory_and_names_what_to_do(tmp_path):
    """metarun-eval with no arguments, a bad value, and Hydra's own advice for a typo
    (+sampler.way=5): one sentence each, exit 2, and no leftover run directory."""
    from tests.conftest import COMMAND_ENV, EVAL, METARUN

    cases = {
        "eval": ([EVAL], "metarun: error: ckpt_path is not set: give ckpt_path=<value> (see --help for examples)."),
        "value": ([METARUN, "algorithm.inner_lr=0"], "metarun: error: algorithm.inner_lr=0 is not allowed: it must be"),
        "typo": (
            [METARUN, "+sampler.way=5"],
            "metarun: error: sampler.way=5 is not allowed with sampler=EpisodeSampler: it takes no way (it takes "
            "ways, shots, queries",
        ),
    }
    for name, (argv, message) in cases.items():
        done = subprocess.run(
            [*argv, f"hydra.run.dir={tmp_path / name}"], env=COMMAND_ENV, capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 2 and done.stderr.strip().splitlines()[-1].startswith(message), (name, done.stderr)
        assert "Traceback" not in done.stderr and not (tmp_path / name).exists(), name


def test_a_run_prints_the_run_and_no_library_noise(tmp_path):
    """No advertisement, no deprecation warning of a library, and the progress line says its
    speed is the step's (results.json's is the run's mean)."""
    from tests.conftest import COMMAND_ENV, METARUN, TINY

    done = subprocess.run(
        [METARUN, *TINY, "trainer.enable_progress_bar=true", f"hydra.run.dir={tmp_path}"],
        env=COMMAND_ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    output = done.stdout + done.stderr
    assert "Tip" not in output and "LeafSpec" not in output and "Warning" not in output, output[-2000:]
    assert output.count("GPU available:") == 1, output[-2000:]  # Lightning's lines once, not twice
    assert "tasks/s (this step)" in output and "test mse:" in output
