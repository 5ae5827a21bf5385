"""The ``metarun`` command: compose the config with Hydra, run it (`metarun.runner.train`),
and return the sweep objective."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from metarun.build import CONFIG_DIR
from metarun.cli import exit_on_config_error, run_command
from metarun.results import objective
from metarun.runner import train  # no Lightning until a run's settings are checked (metarun.fit)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
@exit_on_config_error
def hydra_main(cfg: DictConfig) -> float:
    return objective(train(cfg)[0])


def main() -> None:
    """The ``metarun`` command."""
    run_command(hydra_main)


if __name__ == "__main__":
    main()
