"""What can go wrong in a run, as types: the errors timm-drloc raises and the exit status each ends with.

Callers decide by type, never by message text: the command-line entry points map each error class to
one `ExitCode`, and the README's exit-status table is this enum.
"""
from enum import IntEnum


class ExitCode(IntEnum):
    """Exit status of `train_drloc.py` and the `timm-drloc` commands."""
    OK = 0
    EXPORT_FAILED = 1  # --push-to-hub / export: the Hub folder could not be written
    BAD_INPUT = 2  # a flag, config, file or model that cannot work; refused before training
    NON_FINITE_LOSS = 3  # the loss (or the weights) became NaN / Inf; the checkpoints on disk are the last good ones
    UPLOAD_FAILED = 4  # the export is kept, the upload to the Hub failed
    INTERRUPTED = 130  # Ctrl-C / SIGINT: checkpoints intact, continue with --resume


class ConfigError(ValueError):
    """A flag, config value or input that cannot work; raised before any training step runs."""


class NonFiniteLossError(FloatingPointError):
    """A loss term (or, through it, a weight) became NaN or Inf; training stops, the checkpoints already written
    stay as they are."""
