"""Meta-train, validate and test one composed configuration: `train(cfg)`.

`train` does the work and returns ``(results, objects)``; the ``metarun`` command
(`metarun.train`) and the tests call it. Every setting is checked and the learner built
before Lightning is imported (`metarun.fit`), so a mistake is reported in seconds.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from metarun.build import build_data, build_learner
from metarun.checks import check_hardware, check_run_settings
from metarun.resume import resolve_resume
from metarun.run_directory import RunDirectory, SignalFlag, launching_rank

log = logging.getLogger(__name__)


@contextlib.contextmanager
def restored_environment(*names: str) -> Iterator[None]:
    """Put environment variables back as they were. Lightning leaves ``MASTER_PORT`` set
    after a DDP launch; without this the next run in the same process (a sweep's next job)
    would rendezvous on the previous run's port instead of picking its own."""
    saved = {name: os.environ.get(name) for name in names}
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def train(cfg: DictConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """Fit on training episodes, keep the best validation checkpoint, test it, write results.

    The resumable state is written to ``checkpoints/last.ckpt`` (see `RunCheckpoints`);
    ``ckpt_path`` resumes it (`metarun.checkpoints.resolve_resume`).
    """
    output_dir = Path(cfg.paths.output_dir)
    check_hardware(cfg.trainer)
    check_run_settings(cfg)
    learner = build_learner(cfg)  # every setting checked before the disk is touched
    resolved = OmegaConf.to_container(cfg, resolve=True)
    ckpt_path, resumed = resolve_resume(
        cfg.get("ckpt_path"), output_dir, Path(cfg.paths.log_dir), resolved, OmegaConf.to_container(cfg, resolve=False)
    )
    if ckpt_path:
        log.info("Resuming from %s", ckpt_path)
    directory = (
        RunDirectory(output_dir, resuming=ckpt_path is not None) if launching_rank() else contextlib.nullcontext()
    )
    with SignalFlag() as signals, directory, restored_environment("MASTER_PORT"):
        version = (resumed or {}).get("metarun_logger_version")  # the resumed run's tracker run
        from metarun.fit import fit  # Lightning, imported once every setting is known to be good

        return fit(cfg, build_data(cfg, learner), output_dir, resolved, ckpt_path, signals, version)
