"""Every `metarun` (and `metarun-reproduce`) command of the README and the docs composes and builds its learner as
written (no data is read, nothing trains): a renamed key or group would fail here first."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from metarun.build import build_learner
from metarun.reproduce import OWN_KEYS
from tests.conftest import compose_config, on_standins

ROOT = Path(__file__).resolve().parents[1]
REPRODUCE_KEYS = [k for k in OWN_KEYS if k != "experiment"]  # metarun-reproduce's own, not the runs'


def readme_commands() -> list[list[str]]:
    """The overrides of each ``metarun ...`` line in the bash blocks of the README and the docs
    (a sweep's first value of each swept key; lines with a ``<placeholder>`` are left out)."""
    text = "\n".join(p.read_text() for p in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))])
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].strip()
            if not line.startswith(("metarun ", "metarun-reproduce ")) or "<" in line or "..." in line:
                continue
            words = [w for w in shlex.split(line)[1:] if w != "-m" and not w.startswith("hydra/")]
            if line.startswith("metarun-reproduce "):  # the preset and overrides each seed runs
                words = [w for w in words if w.split("=", 1)[0] not in REPRODUCE_KEYS]
            # a sweep's first value; a list or dict value ([a,b], {k: v}) is one value
            words = [w if "(" in w or re.match(r"[^=]+=[\[{]", w) else re.sub(r"=([^,]*),.*", r"=\1", w) for w in words]
            # a path on the user's machine ($HOME/...) is theirs: the rest of the line is checked
            out.append(
                [w for w in words if not w.startswith(("hydra.", "'")) and "interval(" not in w and "$HOME" not in w]
            )
    return list({tuple(o): o for o in out}.values())


@pytest.mark.parametrize("overrides", readme_commands(), ids=" ".join)
def test_readme_command_composes_and_builds(overrides, tmp_path, request):
    cfg = compose_config(overrides, tmp_path)
    on_standins(cfg, request)  # a whole-class learner counts the training classes
    objects = build_learner(cfg)
    assert objects["algorithm"] is not None


def runnable(overrides: list[str]) -> bool:
    """A README command this machine can run as written, at tiny sizes: its data is here
    (sinusoids, or Omniglot through METARUN_DATA_DIR), no GPU, one process, no tracker."""
    text = " ".join(overrides)
    needs = (
        "hardware=gpu",
        "hardware=ddp",
        "hardware=fp16",
        "logger=wandb",
        "imagenet",
        "image_folder",
        "cifar",
        "fc100",
        "cub",
    )
    return "ckpt_path" not in text and not any(n in text for n in needs)


@pytest.mark.slow
@pytest.mark.parametrize("overrides", [o for o in readme_commands() if runnable(o)], ids=" ".join)
def test_readme_command_runs_at_tiny_size(overrides, tmp_path, request):
    """The runnable README commands train 3 steps and test (the others compose and build above;
    DDP, GPUs and the image benchmarks have their own tests)."""
    from metarun.runner import train
    from tests.conftest import TINY, data_dir

    cfg = compose_config([*overrides, *TINY], tmp_path)
    if cfg.dataset._target_.endswith("Omniglot"):
        if data_dir() is None:
            pytest.skip("METARUN_DATA_DIR with omniglot/ is not set (.ci/run sets it)")
        cfg.paths.data_dir = str(data_dir())
    if cfg.model._target_.endswith("Conv4"):
        cfg.model.hidden = 8  # tiny: the command's wiring at 1/8 of its width (bf16 is emulated on some CPUs)
    results, _ = train(cfg)
    assert results["status"] == "completed" and results["train"]["steps"] == 3
