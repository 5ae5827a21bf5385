"""The package installed as a user installs it (`pip install .`), used from another directory.

The wheel of this checkout is installed, without its dependencies, into a fresh virtual
environment that borrows the project environment's packages (torch, Lightning, ...) through a
``.pth`` file, so nothing is downloaded; metarun itself then comes from the wheel alone (the
editable install's finder is not loaded), config groups included.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from tests.conftest import ROOT


def run(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    done = subprocess.run(list(args), cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (args, done.stdout[-2000:], done.stderr[-2000:])
    return done


@pytest.mark.slow
def test_installed_package_runs_from_another_directory(tmp_path):
    source = tmp_path / "source"  # a copy: building writes build/ next to the sources
    for name in ("metarun", "conf"):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    wheels = tmp_path / "wheels"
    built = run(
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "-q",
        "--no-deps",
        "--no-build-isolation",
        "-w",
        str(wheels),
        str(source),
        cwd=tmp_path,
    )
    ours = [line for line in (built.stdout + built.stderr).splitlines() if "Location 'file:" not in line]
    assert not [line for line in ours if "Warning" in line or "absent from" in line], ours[:20]  # a quiet build
    venv = tmp_path / "fresh"
    run(sys.executable, "-m", "venv", "--without-pip", str(venv), cwd=tmp_path)
    python = venv / "bin" / "python"
    site = run(
        str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", cwd=tmp_path
    ).stdout.strip()
    (Path(site) / "project_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    run(
        sys.executable,
        "-m",
        "pip",
        "--python",
        str(python),
        "install",
        "-q",
        "--no-deps",
        str(next(wheels.glob("metarun-*.whl"))),
        cwd=tmp_path,
    )  # with its console scripts
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "HYDRA_FULL_ERROR")}
    env["OMP_NUM_THREADS"] = "1"
    where = run(
        str(python), "-c", "import metarun.train as t; print(t.__file__); print(t.CONFIG_DIR)", cwd=elsewhere, env=env
    ).stdout.split()
    assert where == [f"{site}/metarun/train.py", f"{site}/metarun/conf"]  # not the checkout
    run(
        str(venv / "bin" / "metarun"),
        "trainer.max_steps=2",
        "trainer.val_check_interval=2",
        "sampler.val_episodes=2",
        "sampler.test_episodes=2",
        "trainer.enable_progress_bar=false",
        "logger=none",
        "hydra.run.dir=run",
        cwd=elsewhere,
        env=env,
    )
    results = json.loads((elsewhere / "run" / "results.json").read_text())
    assert results["status"] == "completed" and results["train"]["steps"] == 2
    run(
        str(venv / "bin" / "metarun-eval"),
        "ckpt_path=run/checkpoints/last.ckpt",
        "sampler.test_episodes=3",
        "hydra.run.dir=eval",
        cwd=elsewhere,
        env=env,
    )
    assert json.loads((elsewhere / "eval" / "results.json").read_text())["test"]["mse"]["episodes"] == 3
    run(
        str(venv / "bin" / "metarun-reproduce"),
        "experiment=maml_sinusoid",
        "seeds=1",
        "test_episodes=2",
        "out=reproduced",
        "trainer.max_steps=2",
        "trainer.val_check_interval=2",
        "sampler.val_episodes=2",
        "trainer.enable_progress_bar=false",
        "logger=none",
        cwd=elsewhere,
        env=env,
    )  # the preset from the wheel's conf/, each seed through the installed `metarun`
    assert (elsewhere / "reproduced" / "seed_0" / "results.json").is_file()
    assert (elsewhere / "reproduced" / "reproduction.csv").read_text().count("\n") == 3  # header, seed, pool


def test_every_folder_of_data_files_is_a_listed_package():
    """pyproject.toml lists every folder under conf/ and metarun/ as a package (else
    setuptools warns at every install): a new folder fails here, by name."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    conf = {"metarun.conf." + ".".join(p.relative_to(ROOT / "conf").parts) for p in (ROOT / "conf").rglob("*")}
    code = {"metarun." + ".".join(p.relative_to(ROOT / "metarun").parts) for p in (ROOT / "metarun").rglob("*")}
    folders = {name for name in conf | code if "__pycache__" not in name}
    on_disk = {
        name
        for name in folders
        if (
            ROOT.joinpath("conf", *name.split(".")[2:])
            if name.startswith("metarun.conf.")
            else ROOT.joinpath(*name.split("."))
        ).is_dir()
    }
    assert not on_disk - listed, sorted(on_disk - listed)
