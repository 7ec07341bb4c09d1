"""Errors meant for people: each names the file, column, row or config key and what to do."""


class ClickclipError(Exception):
    """Base class; the CLI prints these as one clear message instead of a traceback."""


class ConfigError(ClickclipError):
    """A config file is missing, malformed, or has an unknown or invalid key."""


class DataContractError(ClickclipError):
    """An input source does not match the events/images data contract."""


class StageError(ClickclipError):
    """A stage cannot run, e.g. because an upstream stage's outputs are missing."""


class NothingServes(StageError):
    """No promoted version has a published index yet (the gates have refused every run so far):
    search has nothing to answer with. Not a fault of the command: `clickclip search` exits 3."""


class LeakError(ClickclipError):
    """The split audit found a group straddling train/val/test."""


class Stopped(BaseException):
    """SIGTERM or SIGINT arrived (a scheduler stopping the task, or Ctrl-C): not a success.

    A BaseException, like KeyboardInterrupt, so no library's `except Exception` swallows it; the
    CLI turns it into exit status 128 + the signal number (143 for SIGTERM, 130 for SIGINT)."""

    def __init__(self, signum: int, stage: str | None = None):
        super().__init__(signum, stage)
        self.signum, self.stage = signum, stage

    @property
    def exit_code(self) -> int:
        return 128 + self.signum
