"""The errors the scripts turn into one `error:` line and an exit code (see `flags.main`)."""

from __future__ import annotations


class ConfigError(ValueError):
    """A bad flag or input: reported as one line, exit code 2, nothing written."""


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf: training stops before writing anything from the bad step."""


class CheckpointError(RuntimeError):
    """A checkpoint could not be saved or none could be loaded."""


class TrainingInterrupted(RuntimeError):
    """SIGTERM/SIGINT arrived: a checkpoint was saved and the message says how to resume.

    The process is expected to print that and exit: from here on it ignores SIGTERM (see `StopSignal.__exit__`).
    """

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


class StoppedAtOnce(BaseException):
    """SIGTERM/SIGINT outside the training steps (loading, the end phase): nothing to finish, the run stops now.

    A BaseException, like KeyboardInterrupt, so that libraries' `except Exception` cannot swallow or rewrap it.
    """

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


class OutOfMemory(RuntimeError):
    """A step did not fit in memory: reported as one line naming the flags to lower; the last checkpoint is kept."""
