"""The exceptions that end a run with one sentence instead of a traceback."""

from __future__ import annotations

import signal


class ConfigError(ValueError):
    """A user-fixable problem: bad override, missing data, impossible episode shape.

    The message is one sentence naming the key, the value and what is allowed. The
    command-line entry points print it and exit with code 2, without a traceback.
    """


class Interrupted(Exception):
    """Training stopped by SIGTERM or SIGINT after saving its state at a step boundary.

    The command exits with 128 + the signal's number (143 for SIGTERM, 130 for SIGINT), so
    a scheduler or a ``&&`` chain sees that the run did not finish.

    Args:
        signum: the signal received.
        step: outer steps done, the step the saved checkpoint resumes from.
        checkpoint: the checkpoint written.
    """

    def __init__(self, signum: int, step: int, checkpoint: str) -> None:
        self.signum, self.step, self.checkpoint = int(signum), step, checkpoint
        self.exit_code = 128 + int(signum)
        name = signal.Signals(signum).name
        super().__init__(
            f"interrupted by {name} after step {step}; the run state is saved in "
            f"{checkpoint}, so continue it with ckpt_path=last and the same "
            f"hydra.run.dir."
        )


class NonFiniteLoss(FloatingPointError):
    """The meta-loss of an outer step is NaN or infinite (raised by the module, before the
    update, so the weights are those of the last good step)."""

    def __init__(self, step: int, value: float) -> None:
        self.step, self.value = step, value
        super().__init__(f"the meta-loss is {value} at step {step}")
