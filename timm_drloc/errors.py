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
    """A flag, config value or input that cannot work; raised before any training step runs where it can be
    found then (damaged images and a full disk are found later, and end with the same status)."""


class UnreadableImagesError(ConfigError):
    """Images in a row could not be read: the data has a damaged stretch.

    The message is fixed and names no file (each skipped file was named in its own warning): raised in a
    DataLoader worker, the error reaches the main process rebuilt from its text alone, so it carries nothing
    that would not survive that trip.
    """

    def __init__(self, *_: object):
        super().__init__('images in a row could not be read (each is named in a "Skipped sample" warning above): '
                         'replace or remove the damaged files, then run again (with --resume to continue)')


class NonFiniteLossError(FloatingPointError):
    """A loss term (or, through it, a weight) became NaN or Inf; training stops, the checkpoints already written
    stay as they are."""
