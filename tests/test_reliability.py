"""Runs that survive: kills and signals, resume from any checkpoint, one run per directory,
divergence, safe loading, and one sentence for every bad input, through the real commands.

The interrupted runs are the default sinusoid run shrunk to 150 outer steps of 4 tasks
(validation every 40, a checkpoint every 20) on one thread, so a run is deterministic and a
resumed run must end with exactly the metrics of an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import json
import os
import random
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from omegaconf import open_dict

import metarun.tracking
from metarun.checkpoint_files import load_checkpoint
from metarun.cli import exit_on_config_error
from metarun.errors import ConfigError
from metarun.runner import train
from tests.conftest import EVAL, METARUN, TINY, compose_config, finish, launch, signal_when_saved, step_of
from tests.test_cli import assert_one_sentence

RUN = [
    "trainer.max_steps=150",
    "trainer.val_check_interval=40",
    "sampler.val_episodes=4",
    "sampler.test_episodes=8",
    "sampler.meta_batch_size=4",
    "trainer.enable_progress_bar=false",
    "checkpoint.every_n_steps=20",
    "trainer.log_every_n_steps=1",
]
EVERY_STEP_VALIDATES = ["trainer.max_steps=60", "trainer.val_check_interval=1"]

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


def rows(run_dir: Path) -> list[dict[str, str]]:
    """metrics.csv without its wall-clock column."""
    with open(run_dir / "csv" / "metrics.csv") as f:
        return [{k: v for k, v in r.items() if "tasks_per_second" not in k} for r in csv.DictReader(f)]


def interrupt(run_dir: Path, sig: int, at_step: int, *overrides: str) -> subprocess.CompletedProcess:
    """Start a run and send ``sig`` once its last.ckpt is at ``at_step`` or later."""
    proc = launch(run_dir, *RUN, *overrides)
    signal_when_saved(proc, run_dir / "checkpoints" / "last.ckpt", at_step, sig)
    return finish(proc)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Uninterrupted runs, by name: results.json and metrics.csv rows."""
    out = tmp_path_factory.mktemp("reference")
    cases = {"default": [], "every_step_validates": EVERY_STEP_VALIDATES}
    procs = {name: launch(out / name, *RUN, *extra) for name, extra in cases.items()}
    for proc in procs.values():
        done = finish(proc)
        assert done.returncode == 0, done.stderr[-2000:]
    return {name: (json.loads((out / name / "results.json").read_text()), rows(out / name)) for name in cases}


def resume_and_compare(run_dir: Path, reference: tuple[dict, list], *overrides: str) -> dict:
    done = finish(launch(run_dir, *RUN, *overrides, "ckpt_path=last"))
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads((run_dir / "results.json").read_text())
    expected, expected_rows = reference
    assert results["test"] == expected["test"]  # bit-identical
    assert results["val"]["best_mse"] == expected["val"]["best_mse"]
    assert results["val"]["best_step"] == expected["val"]["best_step"]
    assert results["train"]["steps"] == expected["train"]["steps"]
    assert rows(run_dir) == expected_rows  # earlier rows kept, none twice
    return results


# ------------------------------------------------------------------ kill, signal, resume


def test_sigkill_before_the_first_validation_then_resume_is_bit_identical(reference, tmp_path):
    at = random.Random(0).randint(21, 39)  # past the first checkpoint (20), before validation (40)
    done = interrupt(tmp_path, signal.SIGKILL, at)
    assert done.returncode == -signal.SIGKILL
    saved = step_of(tmp_path / "checkpoints" / "last.ckpt")
    assert 20 <= saved < 150 and not (tmp_path / "results.json").exists()
    results = resume_and_compare(tmp_path, reference["default"])
    assert results["train"]["resumed_from"] == str(tmp_path / "checkpoints" / "last.ckpt")


@pytest.mark.parametrize(
    "sig, name, case",
    [
        (signal.SIGTERM, "SIGTERM", "default"),
        (signal.SIGINT, "SIGINT", "default"),
        (signal.SIGTERM, "SIGTERM", "every_step_validates"),
    ],
)
def test_signal_saves_the_step_exits_128_plus_signal_and_resumes(reference, tmp_path, sig, name, case):
    extra = EVERY_STEP_VALIDATES if case == "every_step_validates" else []
    at = random.Random(int(sig)).randint(21, 50)
    done = interrupt(tmp_path, sig, at, *extra)
    assert done.returncode == 128 + sig, done.stderr[-2000:]
    saved = step_of(tmp_path / "checkpoints" / "last.ckpt")
    assert saved >= at
    assert (
        f"metarun: interrupted by {name} after step {saved}; the run state is saved in "
        f"{tmp_path / 'checkpoints' / 'last.ckpt'}"
    ) in done.stderr
    assert "Traceback" not in done.stderr
    resume_and_compare(tmp_path, reference[case], *extra)


def test_finished_run_leaves_a_checkpoint_to_continue_from(reference, tmp_path):
    short = finish(launch(tmp_path, *RUN, "trainer.max_steps=100"))
    assert short.returncode == 0, short.stderr[-2000:]
    assert step_of(tmp_path / "checkpoints" / "last.ckpt") == 100  # not the last validation's 80
    resume_and_compare(tmp_path, reference["default"])  # extended to 150 steps


# ------------------------------------------------------------------ which checkpoint resumes


def tiny(directory: Path, *overrides: str, log_dir: Path | None = None):
    cfg = compose_config([*TINY, *overrides], directory)
    if log_dir is not None:
        with open_dict(cfg):
            cfg.paths.log_dir = str(log_dir)
    return cfg


def test_last_resumes_only_this_run_or_one_with_the_same_settings(tmp_path):
    train(tiny(tmp_path / "a", "seed=0"))
    with pytest.raises(ConfigError) as caught:
        train(tiny(tmp_path / "b", "seed=1", "ckpt_path=last", log_dir=tmp_path))
    message = str(caught.value)
    assert_one_sentence(
        message,
        "ckpt_path=last is not allowed here",
        str(tmp_path / "b"),
        str(tmp_path / "a" / "checkpoints" / "last.ckpt"),
        "seed=0 there, not 1",
    )
    assert not (tmp_path / "b" / "results.json").exists()
    results, _ = train(tiny(tmp_path / "c", "seed=0", "ckpt_path=last", "trainer.max_steps=4", log_dir=tmp_path))
    assert results["train"]["resumed_from"] == str(tmp_path / "a" / "checkpoints" / "last.ckpt")
    assert results["train"]["steps"] == 4


def test_auto_resumes_this_directory_or_starts(tmp_path):
    first, _ = train(tiny(tmp_path, "ckpt_path=auto"))
    assert first["train"]["resumed_from"] is None and first["train"]["steps"] == 3
    again, _ = train(tiny(tmp_path, "ckpt_path=auto", "trainer.max_steps=5"))
    assert again["train"]["resumed_from"] == str(tmp_path / "checkpoints" / "last.ckpt")
    assert again["train"]["steps"] == 5


def test_resume_with_a_lower_learning_rate_is_allowed_another_model_is_not(tmp_path):
    train(tiny(tmp_path))
    results, objects = train(tiny(tmp_path, "ckpt_path=last", "optimizer.lr=0.0001", "trainer.max_steps=4"))
    assert results["train"]["steps"] == 4
    assert objects["trainer"].optimizers[0].param_groups[0]["lr"] == 0.0001  # not the saved 0.001
    with pytest.raises(ConfigError) as caught:
        train(tiny(tmp_path, "ckpt_path=last", "model.hidden=[8]", "trainer.max_steps=5"))
    assert_one_sentence(
        str(caught.value), "ckpt_path=", "another dataset, algorithm or model", "model.hidden=[40, 40] there, not [8]"
    )


def test_second_run_in_a_used_directory_refuses(tmp_path):
    train(tiny(tmp_path))
    with pytest.raises(ConfigError) as caught:
        train(tiny(tmp_path))
    assert str(caught.value) == (
        f"the run directory {tmp_path} (hydra.run.dir) is not allowed: it already holds a run "
        f"(results.json), so resume it with ckpt_path=last or choose another hydra.run.dir."
    )


def test_run_directory_in_use_by_another_process_refuses(tmp_path):
    tmp_path.mkdir(exist_ok=True)
    with open(tmp_path / ".metarun.lock", "w") as held:
        held.write("4242")
        held.flush()
        fcntl.lockf(held, fcntl.LOCK_EX)  # as a running metarun holds it
        done = finish(launch(tmp_path, *TINY))
    assert done.returncode == 2
    assert (
        f"metarun: error: the run directory {tmp_path} (hydra.run.dir) is not allowed: "
        f"another metarun process (pid 4242) is running there"
    ) in done.stderr


# ------------------------------------------------------------------ unwritable checkpoints


def check_unwritable(done: subprocess.CompletedProcess, reason: str) -> None:
    assert done.returncode == 2, done.stderr[-2000:]
    lines = [line for line in done.stderr.splitlines() if line.startswith("metarun: error:")]
    assert len(lines) == 1 and reason in lines[0], done.stderr[-2000:]
    assert_one_sentence(lines[0])
    assert "Traceback" not in done.stderr
    assert "train/loss" not in done.stdout + done.stderr


def test_checkpoint_folder_that_is_a_file(tmp_path):
    tmp_path.mkdir(exist_ok=True)
    (tmp_path / "checkpoints").write_text("not a folder")
    check_unwritable(finish(launch(tmp_path, *TINY)), "it cannot be written (File exists)")


def test_immutable_run_directory(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(run_dir)]).returncode:
        pytest.skip("chattr +i is not available here (needs root on ext4/xfs/tmpfs)")
    try:
        done = finish(launch(run_dir, *TINY))
    finally:
        subprocess.run(["chattr", "-i", str(run_dir)])
    check_unwritable(done, "cannot be written (Operation not permitted)")


@pytest.fixture
def full_disk(tmp_path):
    """A 32 KiB tmpfs: room for Hydra's files and the lock, not for a checkpoint."""
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32k", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("mounting a tmpfs needs root (CI runs as root)")
    yield mount
    subprocess.run(["umount", str(mount)])


def test_full_disk_is_found_before_training(full_disk):
    check_unwritable(finish(launch(full_disk / "run", *TINY)), "No space left on device")


# ------------------------------------------------------------------ divergence


def test_divergence_names_the_keys_and_the_last_good_checkpoint(tmp_path):
    done = finish(launch(tmp_path, *TINY, "optimizer.lr=1e10", "checkpoint.every_n_steps=1"))
    assert done.returncode == 2
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert (
        f"metarun: error: training diverged: the meta-loss is nan at step 1, so lower "
        f"optimizer.lr (now 10000000000.0) or algorithm.inner_lr (now 0.01) or set grad_clip "
        f"(now null) to a maximum meta-gradient norm such as 10; the last good checkpoint is "
        f"{last} (resume it with ckpt_path=last after the change)."
    ) in done.stderr
    assert "gradient_clip_val" not in done.stderr and "Traceback" not in done.stderr
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["status"] == "diverged"
    assert results["train"] == {"diverged_at_step": 1, "meta_loss": "nan", "last_good_checkpoint": str(last)}
    state = load_checkpoint(last)["state_dict"]
    assert all(torch.isfinite(v).all() for v in state.values())
    resumed, _ = train(tiny(tmp_path, "ckpt_path=last", "optimizer.lr=0.001"))  # after the fix
    assert resumed["status"] == "completed" and resumed["train"]["steps"] == 3


# ------------------------------------------------------------------ checkpoints users point at


class RunsCode:
    """Unpickling this runs a shell command (what a crafted .ckpt can do without weights_only)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def bad_checkpoints(tmp_path_factory):
    """{name: path} of files users might pass as ckpt_path, and a real checkpoint."""
    d = tmp_path_factory.mktemp("ckpts")
    real_dir = d / "real"
    train(compose_config([*TINY], real_dir))
    real = real_dir / "checkpoints" / "last.ckpt"
    data = real.read_bytes()
    (d / "empty.ckpt").write_bytes(b"")
    (d / "truncated.ckpt").write_bytes(data[: len(data) // 2])
    (d / "text.ckpt").write_text("hello, not a checkpoint\n")
    (d / "folder.ckpt").mkdir()
    torch.save({"state_dict": {}}, d / "foreign.ckpt")
    newer = torch.load(real, weights_only=True)
    newer["metarun_format"] = 99
    torch.save(newer, d / "newer.ckpt")
    torch.save({"metarun_config": {}, "payload": RunsCode(d / "pwned")}, d / "evil.ckpt")
    return d, real


BAD = {
    "empty": "the file is empty",
    "truncated": "it is truncated or corrupt",
    "text": "it is not a PyTorch checkpoint (it starts with b'hell', not a zip or pickle header)",
    "folder": "it is a directory",
    "missing": "no such file",
    "foreign": "it holds no metarun config",
    "newer": "it was written by a newer metarun (checkpoint format 99; this version reads up to",
    "evil": "it holds Python objects that a safe load refuses",
}


@pytest.mark.parametrize("name", BAD)
def test_bad_checkpoint_is_one_sentence(bad_checkpoints, tmp_path, capsys, name):
    """Every bad file, through `load_checkpoint` and the command's own error wrapper."""
    folder, _ = bad_checkpoints
    with pytest.raises(SystemExit) as exited:
        exit_on_config_error(train)(compose_config([f"ckpt_path={folder / name}.ckpt"], tmp_path / "run"))
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"metarun: error: ckpt_path={folder / name}.ckpt is not allowed: {BAD[name]}"), err
    assert err.count("\n") == 1
    assert_one_sentence(err.strip())
    assert not (folder / "pwned").exists()  # the crafted file's code never ran


# Both commands read a checkpoint through the one load_checkpoint: through each installed
# command, the two files that reach furthest into it (a corrupt archive, and code that a safe
# load refuses).
@pytest.mark.parametrize("command", [METARUN, EVAL], ids=["metarun", "metarun-eval"])
def test_bad_checkpoint_is_one_sentence_through_the_command(bad_checkpoints, tmp_path, command):
    folder, _ = bad_checkpoints
    names = ["truncated", "evil"]
    procs = {name: launch(tmp_path / name, f"ckpt_path={folder / name}.ckpt", command=command) for name in names}
    for name, proc in procs.items():
        done = finish(proc)
        assert done.returncode == 2, (name, done.stderr[-2000:])
        line = f"metarun: error: ckpt_path={folder / name}.ckpt is not allowed: {BAD[name]}"
        assert line in done.stderr, (name, done.stderr[-2000:])
        errors = [x for x in done.stderr.splitlines() if x.startswith("metarun: error:")]
        assert len(errors) == 1 and "Traceback" not in done.stderr, name
        assert_one_sentence(errors[0])
    assert not (folder / "pwned").exists()  # the crafted file's code never ran


def test_checkpoint_of_another_algorithm_is_one_sentence(bad_checkpoints, tmp_path):
    _, real = bad_checkpoints  # MAML on sinusoids
    done = finish(launch(tmp_path, *TINY, "algorithm=cnp", f"ckpt_path={real}"))
    assert done.returncode == 2
    assert (
        f"metarun: error: ckpt_path={real} is not allowed: it holds another dataset, "
        f"algorithm or model (algorithm._target_='metarun.algorithms.maml.MAML' there, not "
        f"'metarun.algorithms.cnp.CNP'"
    ) in done.stderr
    other = finish(launch(tmp_path / "other", f"ckpt_path={real}", "algorithm=protonet", command=EVAL))
    assert other.returncode == 2
    assert (
        "metarun: error: override 'algorithm=protonet' is not allowed for metarun-eval: it "
        "tests the checkpoint's own algorithm and model"
    ) in other.stderr
    shape = finish(launch(tmp_path / "eval", f"ckpt_path={real}", "model.hidden=[8]", command=EVAL))
    assert shape.returncode == 2
    assert (
        f"metarun: error: ckpt_path={real} is not allowed with the overrides "
        f"(+model.hidden=[8]): its weights do not fit the model they build"
    ) in shape.stderr


def test_eval_takes_plain_overrides_of_the_trained_config(bad_checkpoints, tmp_path):
    _, real = bad_checkpoints
    done = finish(launch(tmp_path, f"ckpt_path={real}", "sampler.shots=5", "sampler.test_episodes=3", command=EVAL))
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["experiment"]["shots"] == 5 and results["test"]["mse"]["episodes"] == 3


# ------------------------------------------------------------------ bad settings, via the command

BAD_SETTINGS = {
    "optimizer.lr=-1": "optimizer.lr=-1 is not allowed: it must be a positive number.",
    "optimizer.lr=abc": "optimizer.lr='abc' is not allowed: it must be a positive number.",
    "seed=notanumber": "seed='notanumber' is not allowed: it must be an integer from 0 to 2**63 - 1.",
    "seed=-1": "seed=-1 is not allowed: it must be an integer from 0 to 2**63 - 1.",
    "trainer.max_steps=-5": (
        "trainer.max_steps=-5 is not allowed: it must be a positive integer "
        "(or -1 for no limit, with trainer.max_time set)."
    ),
    "checkpoint.every_n_steps=0": ("checkpoint.every_n_steps=0 is not allowed: it must be a positive integer or null."),
    "grad_clip=-1": "grad_clip=-1 is not allowed: it must be a positive number or null.",
    "sampler.batch_size=0": "sampler.batch_size=0 is not allowed: it must be a positive integer.",
    "test_time.lr=-1": "test_time.lr=-1 is not allowed: it must be a positive number or auto.",
    "task_chunk=0": ("task_chunk=0 is not allowed: it must be a positive integer (tasks per backward pass) or null."),
    "task_batching=batched": ("task_batching='batched' is not allowed: choose one of loop, vmap, auto."),
    # an old command line: the key moved to the top level
    "algorithm.task_batching=vmap": (
        "algorithm.task_batching=vmap is not allowed: how a meta-batch's tasks run is a hardware "
        "choice, set beside task_chunk, so write task_batching=vmap."
    ),
    "model.channels_last=true": (
        "model.channels_last=true is not allowed: the memory layout is a hardware choice that every "
        "backbone takes, so write channels_last=true."
    ),
    "objective_direction=up": (
        "objective_direction='up' is not allowed: choose maximize or minimize (the direction "
        "a sweeper optimises the validation metric in)."
    ),
    # the model is checked before any data is looked for or decoded
    "dataset=omniglot model.norm=bogus": (
        "model.norm='bogus' is not allowed: choose one of transductive, running, tasknorm, support, none."
    ),
    "dataset=omniglot algorithm=protonet model.norm=running task_batching=vmap": (
        "task_batching=vmap is not allowed for ProtoNet: its batch norm "
        "model.features.1 keeps running statistics (model.norm=running), which are "
        "updated in place and cannot be carried per task under vmap, so use "
        "task_batching=loop or another model.norm."
    ),
    # each learner's own settings, checked by its constructor before any data
    "dataset=omniglot algorithm=r2d2 algorithm.ridge=0": (
        "algorithm.ridge=0 is not allowed: it must be a positive number."
    ),
    "dataset=omniglot algorithm=metaoptnet algorithm.kernel_ridge=-1": (
        "algorithm.kernel_ridge=-1 is not allowed: it must be a number >= 0."
    ),
    "dataset=omniglot algorithm=protonet algorithm.transductive=tta": (
        "algorithm.transductive='tta' is not allowed: choose one of none, bd_cspn, tim, pt_map."
    ),
    "dataset=omniglot algorithm=cavia algorithm.context_layer=features.99": (
        "algorithm.context_layer='features.99' is not allowed: it must name a layer of the backbone "
        "(features.0, features.1, features.2, features.3, features.4, features.5, features.6, features.7, ...)."
    ),
    "dataset=omniglot algorithm=feat algorithm.dropout=1": (
        "algorithm.dropout=1 is not allowed: it must be a number in [0, 1)."
    ),
    "dataset=omniglot algorithm=imaml algorithm.prox=0": (
        "algorithm.prox=0 is not allowed: it must be a positive number."
    ),
    "dataset=omniglot dataset.train_on=val": (
        "dataset.train_on='val' is not allowed: use one of train, train+val (train+val: the training split "
        "also holds the validation classes, as Snell et al. 2017)."
    ),
    "dataset=omniglot algorithm=r2d2 model=r2d2net model.drop_rate=1": (
        "model.drop_rate=1 is not allowed: it must be a number in [0, 1)."
    ),
    "dataset=omniglot sampler=variable algorithm=maml": (
        "algorithm=MAML is not allowed with sampler=variable's episodes of 5 to 50 ways: its classifier head has "
        "a fixed number of outputs, so set sampler.min_ways equal to sampler.max_ways, or choose a learner "
        "without a head (e.g. protonet)."
    ),
    "dataset=omniglot sampler=variable algorithm=relation_net": (
        "algorithm=RelationNet is not allowed with sampler=variable: it sums each class's shots (Sung et al. "
        "2018), and sums over different numbers of shots are not comparable across classes, so use "
        "sampler=episodic or a learner that averages them (protonet)."
    ),
    "dataset=omniglot sampler=variable algorithm=feat": (
        "algorithm.balance=0.01 is not allowed with sampler=variable: FEAT's contrastive term splits each "
        "class's support and query images into sets of one size, which class-imbalanced supports do not "
        "have, so set algorithm.balance=0."
    ),
    "dataset=omniglot sampler=variable algorithm=protonet sampler.min_ways=9 sampler.max_ways=8": (
        "sampler.min_ways=9 is not allowed with sampler.max_ways=8: it must be at most max_ways."
    ),
    "dataset=multi dataset.sources=[omniglot,sinusoid]": (
        "dataset.sources entry 'sinusoid' is not allowed: a source is an image dataset option (cifar_fs, cub, "
        "fc100, image_folder, mini_imagenet, omniglot, tiered_imagenet), or {name: <option>, <key>: <value>} "
        "with that option's keys."
    ),
    "dataset=multi dataset.sources=[omniglot,omniglot]": (
        "dataset.sources names omniglot twice, which is not allowed: each source is one dataset."
    ),
    "dataset=multi dataset.weights=[1]": (
        "dataset.weights=[1] is not allowed: it must be 2 numbers >= 0, one per source (omniglot, image_folder), "
        "not all 0, or null for uniform."
    ),
    "dataset=bscd_fsl": (
        "dataset=BSCDFSL is not allowed as the training dataset: it is a meta-test set only, so train on another "
        "dataset and meta-test on it with test_dataset."
    ),
    "sampler=variable": (
        "sampler=VariableEpisodeSampler is not allowed with dataset=Sinusoid: it draws classification "
        "episodes only, so use sampler=episodic or another dataset."
    ),
}

# Through the installed command: one of each way a mistake reaches the user (a value check,
# a value Hydra cannot parse as a number, an old key rewritten by the command line's own
# translation, a constructor's refusal inside Hydra's instantiate, the vmap refusal, a learner's
# setting, a dataset's setting, a learner refusing a sampler). Every one of BAD_SETTINGS also
# runs in this process through the same `exit_on_config_error` that wraps the command, which is
# where its message is made; the other ways of the same kinds are not launched again.
THROUGH_THE_COMMAND = (
    "optimizer.lr=abc",
    "algorithm.task_batching=vmap",
    "dataset=omniglot model.norm=bogus",
    "dataset=omniglot algorithm=protonet model.norm=running task_batching=vmap",
    "dataset=omniglot algorithm=cavia algorithm.context_layer=features.99",
    "dataset=omniglot dataset.train_on=val",
    "dataset=omniglot sampler=variable algorithm=maml",
)


@pytest.mark.parametrize("setting", BAD_SETTINGS)
def test_bad_setting_is_one_sentence(setting, tmp_path, capsys):
    """The command line's translation (an old key) refuses while the config is composed."""
    empty = tmp_path / "no_data"
    empty.mkdir()
    paths = [f"paths.data_dir={empty}", f"paths.cache_dir={tmp_path / 'cache'}"]
    with pytest.raises(SystemExit) as exited:
        exit_on_config_error(train)(compose_config([*setting.split(), *paths], tmp_path))
    assert exited.value.code == 2
    assert capsys.readouterr().err == f"metarun: error: {BAD_SETTINGS[setting]}\n"
    assert not (tmp_path / "cache").exists()


def test_bad_settings_are_one_sentence_through_the_command(tmp_path):
    empty = tmp_path / "no_data"
    empty.mkdir()
    data = [f"paths.data_dir={empty}", f"paths.cache_dir={tmp_path / 'cache'}"]
    procs = {o: launch(tmp_path / str(i), *o.split(), *data) for i, o in enumerate(THROUGH_THE_COMMAND)}
    parent = tmp_path / "a_file"
    parent.write_text("")
    procs["run_dir"] = launch(parent / "run")
    expected = {
        **BAD_SETTINGS,
        "run_dir": (
            f"hydra.run.dir={parent / 'run'} is not allowed: the directory cannot "
            f"be created (Not a directory), so choose a writable path."
        ),
    }
    for key, proc in procs.items():
        done = finish(proc)
        assert done.returncode == 2, (key, done.stderr[-2000:])
        assert f"metarun: error: {expected[key]}" in done.stderr, (key, done.stderr[-2000:])
        assert "Traceback" not in done.stderr, key
    assert not (tmp_path / "cache").exists()


# ------------------------------------------------------------------ tracking and DDP


def test_wandb_server_comes_from_wandb_base_url(monkeypatch):
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:8080")
    assert metarun.tracking.wandb_endpoint() == ("127.0.0.1", 8080)
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example.org")
    assert metarun.tracking.wandb_endpoint() == ("wandb.example.org", 443)
    monkeypatch.delenv("WANDB_BASE_URL")
    assert metarun.tracking.wandb_endpoint() == ("api.wandb.ai", 443)


def test_wandb_online_with_an_unreachable_server_logs_offline_quickly(tmp_path, monkeypatch):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{port}")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / var.lower()))
    monkeypatch.setenv("WANDB_SILENT", "true")
    started = time.monotonic()
    assert not metarun.tracking._wandb_reachable()
    assert time.monotonic() - started < metarun.tracking.REACH_TIMEOUT_S + 1
    results, objects = train(tiny(tmp_path / "run", "logger=wandb", "logger.mode=online"))
    assert list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert time.monotonic() - started < 60  # W&B's own online fallback waits about 90 s
    assert results["status"] == "completed"


# ------------------------------------------------------------------ kill -9 during the first decode


def children_of(pid: int) -> list[int]:
    """The pids of ``pid``'s children (Linux /proc)."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            found += [int(c) for c in (task / "children").read_text().split()]
    return found


def alive(pid: int) -> bool:
    """A process that exists and is not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.slow
def test_kill_9_during_the_first_decode_leaves_nothing_behind(tmp_path):
    """SIGKILL while two workers decode an image folder: the workers end with it (no live
    process after 10 s), and the rerun in the same run directory removes the partial cache,
    takes the lock over and completes."""
    from PIL import Image

    root = tmp_path / "folder"
    g = torch.Generator().manual_seed(0)
    for c in range(16):  # 12 training classes of 700: 8,400 images, enough for 2 decode workers
        (root / f"class_{c:02d}").mkdir(parents=True)
        noise = torch.randint(0, 256, (700, 48, 48), generator=g, dtype=torch.uint8).numpy()
        for i in range(700):
            Image.fromarray(noise[i], mode="L").save(root / f"class_{c:02d}" / f"{i}.png")
    cache = tmp_path / "cache"
    run = [*TINY, "dataset=image_folder", f"dataset.root={root}", "dataset.image_size=16"]
    run += ["dataset.split_ratio=[0.75,0.125,0.125]"]
    run += ["algorithm=protonet", "sampler.ways=2", "sampler.queries=2", f"paths.cache_dir={cache}"]
    proc = launch(tmp_path / "run", *run)
    deadline = time.monotonic() + 240
    while not (list(cache.glob(".*.tmp")) and len(children_of(proc.pid)) >= 2):
        assert proc.poll() is None and time.monotonic() < deadline, "the decode never started"
        time.sleep(0.02)
    workers = children_of(proc.pid)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 10
    while any(alive(w) for w in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(alive(w) for w in workers)
    assert list(cache.glob(".*.tmp"))  # the killed run's partial cache, until the rerun
    done = finish(launch(tmp_path / "run", *run))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "the partial cache of process" in done.stdout + done.stderr and not list(cache.glob(".*.tmp"))
    assert json.loads((tmp_path / "run" / "results.json").read_text())["status"] == "completed"


def wandb_env(tmp_path: Path) -> dict[str, str]:
    """A command's environment with W&B offline (no key) and its folders under tmp_path."""
    env = {k: v for k, v in os.environ.items() if k not in ("WANDB_API_KEY", "WANDB_MODE", "HYDRA_FULL_ERROR")}
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        env[var] = str(tmp_path / "wandb_home" / var.lower())
    return {**env, "WANDB_SILENT": "true", "OMP_NUM_THREADS": "1"}


def offline_runs(folder: Path) -> list[Path]:
    return sorted(folder.rglob("offline-run-*"))


@pytest.mark.slow
def test_wandb_continues_the_same_run_after_sigterm_and_groups_a_multirun(tmp_path):
    """logger=wandb offline: a run stopped by SIGTERM and resumed writes both parts under one
    W&B run id; the jobs of a multirun share a group named after the sweep."""
    from tests.test_train import read_wandb_file

    run = tmp_path / "run"
    common = [*RUN, "logger=wandb", f"hydra.run.dir={run}"]
    proc = subprocess.Popen([METARUN, *common], env=wandb_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    signal_when_saved(proc, run / "checkpoints" / "last.ckpt", 20, signal.SIGTERM)
    assert proc.wait(timeout=240) == 128 + signal.SIGTERM
    done = subprocess.run([METARUN, *common, "ckpt_path=last"], env=wandb_env(tmp_path), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    parts = offline_runs(run / "wandb")
    ids = {p.name.rsplit("-", 1)[1] for p in parts}
    assert len(parts) == 2 and len(ids) == 1, parts  # two sittings, one W&B run
    sweep = tmp_path / "sweep"
    done = subprocess.run(
        [
            METARUN,
            "-m",
            *[o for o in TINY if not o.startswith("logger=")],
            "logger=wandb",
            "seed=0,1",
            f"hydra.sweep.dir={sweep}",
        ],
        env=wandb_env(tmp_path),
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    groups = set()
    for part in offline_runs(sweep):
        records = read_wandb_file(next(part.glob("run-*.wandb")))
        groups |= {r.run.run_group for r in records if r.WhichOneof("record_type") == "run"}
    assert len(offline_runs(sweep)) == 2 and groups == {f"train-{sweep.name}"}
