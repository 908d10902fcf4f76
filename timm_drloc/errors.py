"""What can go wrong, as types: the errors timm-drloc raises and the exit status each ends with.

Callers decide by type, never by message text. The library raises ValueError subclasses (code that catches
ValueError is unaffected), each naming what would fix it; the command-line entry points map each class to
the fix in flag terms and to one `ExitCode`, and the README's exit-status table is this enum.
"""
from enum import IntEnum
from typing import Any, Mapping, Optional


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


def first_lines(error: BaseException, lines: int = 1) -> str:
    """The first `lines` of an error's message, joined on one line (a state_dict error: its heading and first
    misfit), or the error's type where the message is empty: what a one-line ConfigError quotes of another error."""
    return ' '.join(line.strip() for line in str(error).splitlines()[:lines]) or type(error).__name__


class SettingError(ValueError):
    """A DRLoc setting whose value cannot work (a keyword of wrap() / DRLocTask, or its --drloc-* flag).

    The message is a template over the settings' names (`{num_samples}`, `{mode}`) and the value (`{value}`):
    `str(error)` names the settings by their keywords, `error.message(names)` by the names a caller knows them by
    (the command line's flags), so both read the same rule.

    Attributes:
        setting: the keyword of the setting that is wrong ('num_samples').
        value: its value.
    """

    def __init__(self, setting: str, value: Any, template: str):
        self.setting, self.value, self.template = setting, value, template
        super().__init__(self.message())

    def message(self, names: Optional[Mapping[str, str]] = None) -> str:
        """The message with each setting called by `names` (keyword -> name; a keyword not in it stays)."""
        return self.template.format_map(_Names(names or {}, value=repr(self.value)))


class _Names(dict):
    def __init__(self, names: Mapping[str, str], **fields: str):
        super().__init__(names, **fields)

    def __missing__(self, key: str) -> str:
        return key


class GridError(ValueError):
    """DRLoc finds no grid it can learn from where it looks; each subclass names a different way out."""


class GridNotFoundError(GridError):
    """The modules looked at give no spatial grid (no feature_info, a module that does not exist or does not run,
    an output that is not a grid): name the grid module(s) with `layers=`."""


class SingleScaleError(GridError):
    """multiscale=True on a model whose features have a single stride (a ViT): use one head."""


class GridTooSmallError(GridError):
    """A 1x1 grid has no relative positions: a larger input, or an earlier module with `layers=`."""


class ProbeError(GridError):
    """The probe pass that finds the grids failed at the input size tried: pass the size the model is used with."""


class UnknownModelError(ConfigError):
    """timm has no model of this name."""


class CheckpointError(ConfigError):
    """A checkpoint file that cannot be read (missing, truncated, corrupt, or not a checkpoint).

    Attributes:
        path: the file.
        problem: what is wrong with it, in a few words.
    """

    def __init__(self, path: str, problem: str, message: Optional[str] = None):
        self.path, self.problem = str(path), problem
        super().__init__(message or f"checkpoint '{path}' cannot be read ({problem})")


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint whose pickle holds objects other than tensors and plain values: loading it could run code,
    so it is not loaded."""


class SummaryError(ValueError):
    """A folder without a readable summary.csv (none yet, or a binary / damaged file)."""


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
