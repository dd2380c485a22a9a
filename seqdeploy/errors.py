"""The one exception type that reaches users as a one-line message instead of a traceback."""
from __future__ import annotations


class SeqdeployError(Exception):
    """A problem the user can fix: bad input, missing artifact, engine not installed.

    The CLI prints ``error: <message>`` on one line and exits with ``exit_code``.
    """

    exit_code = 2

    def __init__(self, message: str, exit_code: int | None = None):
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class EngineUnavailable(SeqdeployError):
    """The requested engine cannot run on this machine (not installed, no CUDA device...)."""


class ArtifactError(SeqdeployError):
    """An artifact is missing, truncated, edited or otherwise unusable."""


class InputError(SeqdeployError):
    """Inputs do not match the model's declared IO (names, shapes, dtypes, finiteness)."""
