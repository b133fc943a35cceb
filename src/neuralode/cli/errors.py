"""The exceptions the command line reports as one line ``neuralode: error: ...`` (no traceback)."""

from __future__ import annotations

__all__ = ["CLIError", "TrainingError", "one_line"]


class CLIError(Exception):
    """Bad input from the user (arguments, data, run directory): exit status 2."""

    exit_code = 2


class TrainingError(CLIError):
    """Training could not go on (e.g. a solve failed): exit status 1, checkpoints kept."""

    exit_code = 1


def one_line(message: object) -> str:
    """``message`` as a single line (newlines and runs of spaces collapsed)."""
    return " ".join(str(message).split())
