"""The ``metarun`` command: compose the config with Hydra, run it (`metarun.runner.train`),
and return the sweep objective."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from metarun.build import CONFIG_DIR
from metarun.cli import exit_on_config_error, run_command
from metarun.results import objective


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
@exit_on_config_error
def hydra_main(cfg: DictConfig) -> float:
    from metarun.runner import train  # here, so that `metarun --help` needs no Lightning

    return objective(train(cfg)[0])


def main() -> None:
    """The ``metarun`` command."""
    run_command(hydra_main)


if __name__ == "__main__":
    main()
