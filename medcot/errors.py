"""The errors medcot raises for a user to fix. The CLI prints each as one line and exits non-zero.

Every message names what to change: the config key, the file, row and field, or the request field.
Anything else that escapes is a bug in medcot and keeps its traceback.
"""

from __future__ import annotations


class MedcotError(Exception):
    """Base class: a problem the user can fix; `exit_code` is what the CLI exits with."""

    exit_code = 2


class ConfigError(MedcotError, ValueError):
    """A config file or override that cannot be used; the message lists every problem."""


class DataError(MedcotError, ValueError):
    """An input file or row that cannot be used. The message names the file, row and field."""


class ColumnsError(DataError):
    """The file lacks the mapped columns: a file-level problem that --skip-bad-rows cannot skip."""


class ContaminationError(DataError):
    """Training items overlap the configured eval benchmarks; the message gives the counts per benchmark."""


class ModelSetupError(MedcotError, RuntimeError):
    """The requested model setup cannot run on this machine; the message says what to change."""


class SetupError(MedcotError, RuntimeError):
    """Something outside the config stops the job before it starts: a missing optional package, an
    output folder that cannot be written, a run folder that already exists."""


class InsecureBindError(MedcotError, ValueError):
    """Serving beyond loopback without a usable API key."""


class TrainingDiverged(MedcotError, RuntimeError):
    """The loss or gradient became NaN/inf; the last good checkpoint is kept."""


class Interrupted(MedcotError):
    """Ctrl-C / SIGTERM: the message says what was kept and how to continue."""

    exit_code = 130


class Overloaded(MedcotError):
    """The generation queue is full; retry after `retry_after_s` seconds (the server answers 429)."""

    def __init__(self, message: str, retry_after_s: int):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class Unavailable(MedcotError):
    """A request was not served: it waited past its deadline, its client left, or the engine stopped
    (the server answers 503). `code` says which, for clients that branch on it."""

    def __init__(self, message: str, code: str = "server_busy", retry_after_s: int | None = None):
        super().__init__(message)
        self.code = code
        self.retry_after_s = retry_after_s
