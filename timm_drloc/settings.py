"""The DRLoc settings, each declared once: its keyword, flag, default, help text and rule.

`wrap()` takes the settings as keywords (its signature spells them out, for readers and editors; DRLocTask
passes them on to it); `check_settings()` is the one check of their values, which both call. A training
script built on timm's train.py adds the settings as `--drloc-*` flags and maps the parsed flags back to
keywords:

    add_drloc_args(parser)                      # the "DRLoc parameters" flag group
    kwargs = drloc_kwargs(args)                 # DRLocTask keywords, checked; None when --drloc-lambda is 0
    task = DRLocTask(model, **kwargs, criterion=..., device=...)
    task.set_drloc_lambda(drloc_lambda_for_epoch(args, epoch, num_epochs))     # drloc_lambda_at under the flags

A new option is one `Setting` entry here (plus its keyword in wrap()); the flag, its help text, the
mapping and the patched upstream train.py follow from the entry.
"""
import argparse
import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

from .errors import ConfigError, SettingError
from .losses import MODES


@dataclass(frozen=True)
class Setting:
    """One DRLoc setting.

    Args:
        keyword: its name as a keyword of wrap() / DRLocTask (or of the lambda schedule, drloc_lambda_at).
        flag: the command-line flag.
        help: the flag's help text.
        flag_args: the rest of the flag's `add_argument` arguments (default, type, choices, action...).
        from_flag: the keyword's value from the flag's (`--drloc-signed` is `use_abs=False`).
        schedule: a setting of the lambda schedule (drloc_lambda_at), not a DRLocTask keyword.
    """
    keyword: str
    flag: str
    help: str
    flag_args: Dict[str, Any] = field(default_factory=dict)
    from_flag: Callable[[Any], Any] = lambda value: value
    schedule: bool = False

    @property
    def dest(self) -> str:
        """The attribute argparse stores the flag in."""
        return self.flag[2:].replace('-', '_')


SETTINGS = (
    Setting('drloc_lambda', '--drloc-lambda',
            'weight of the DRLoc loss; 0 (default) trains plain classification. Paper: 0.5 Swin, 0.1 T2T/CvT (with '
            'the default unnormalized targets)', dict(type=float, default=0.0, metavar='W')),
    Setting('mode', '--drloc-mode',
            'l1 regression of offsets, ce classification of offsets, or cbr cycle-back regression',
            dict(type=str, default='l1', choices=MODES)),
    Setting('num_samples', '--drloc-samples', 'position pairs per image', dict(type=int, default=64, metavar='M')),
    Setting('use_abs', '--drloc-signed', 'predict signed offsets instead of absolute ones',
            dict(action='store_true', default=False), from_flag=lambda signed: not signed),
    Setting('normalize', '--drloc-normalize',
            "divide targets by the grid size (the paper's formula; lambda must be about k times larger)",
            dict(action='store_true', default=False)),
    Setting('multiscale', '--drloc-multiscale', 'one DRLoc head per stage of a multi-stage model (Swin)',
            dict(action='store_true', default=False)),
    Setting('hidden_dim', '--drloc-hidden-dim', 'hidden width of the DRLoc MLP',
            dict(type=int, default=512, metavar='N')),
    Setting('layers', '--drloc-layers', "module paths whose outputs are the grids (default: the model's last "
            "feature map)", dict(type=str, nargs='+', default=None, metavar='PATH')),
    Setting('warmup_epochs', '--drloc-warmup-epochs', 'ramp lambda linearly from 0 over these epochs (reference '
            'code: 20)', dict(type=int, default=0, metavar='N'), schedule=True),
    Setting('decay', '--drloc-decay', 'decay lambda linearly to 0 at the last epoch (reference code schedule)',
            dict(action='store_true', default=False), schedule=True),
    Setting('compile_head', '--drloc-compile-head',
            'torch.compile the DRLoc heads alone: fewer kernel launches per step on a GPU, the same random pairs '
            '(--torchcompile compiles them with the whole model instead)', dict(action='store_true', default=False)),
)
COMPILE_MODES = ('default', 'reduce-overhead', 'max-autotune', 'max-autotune-no-cudagraphs')  # torch.compile's
FLAGS = {s.keyword: s.flag for s in SETTINGS}  # keyword -> flag, for messages in command-line terms


def drloc_lambda_at(
        epoch: float,
        base: float,
        num_epochs: int,
        warmup_epochs: int = 0,
        decay: bool = False,
) -> float:
    """DRLoc weight at `epoch` (0-based).

    Constant `base` by default. With `warmup_epochs` it ramps linearly from 0 at epoch 0 to `base` at
    `warmup_epochs`; with `decay` it then falls linearly to 0 at `num_epochs`. Warm-up 20 with decay is
    the reference code's schedule.
    """
    if warmup_epochs > 0 and epoch < warmup_epochs:
        return base * epoch / warmup_epochs
    if decay:
        remaining = max(num_epochs - warmup_epochs, 1)
        return max(base * (1.0 - (epoch - warmup_epochs) / remaining), 0.0)
    return base


def _is_count(value: Any, low: int) -> bool:
    """An integer >= low, Python's or numpy's (not a bool)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= low


def check_settings(**values: Any) -> None:
    """Refuse DRLoc setting values that cannot work: the one check, which wrap(), DRLocHead, DRLocTask and the
    command line all call. Only the settings given are checked (by keyword: mode, num_samples, hidden_dim,
    normalize, multiscale, layers, compile_head, drloc_lambda, warmup_epochs).

    Raises:
        SettingError: naming the setting, its value and what to use instead.
    """
    given = values.__contains__
    if given('drloc_lambda'):
        value = values['drloc_lambda']
        if not isinstance(value, numbers.Real) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
            raise SettingError('drloc_lambda', value, '{drloc_lambda} must be a finite number >= 0, got {value}; use 0 '
                               'to turn DRLoc off, or a weight such as 0.5 (Swin) / 0.1 (T2T, CvT) as in the paper')
    if given('mode') and values['mode'] not in MODES:
        raise SettingError('mode', values['mode'], '{mode} must be one of ' + ', '.join(MODES) + ', got {value}')
    if given('num_samples') and not _is_count(values['num_samples'], 1):
        raise SettingError('num_samples', values['num_samples'], '{num_samples} must be an integer >= 1 (pairs per '
                           'image), got {value}; the reference uses 64')
    if given('hidden_dim') and not _is_count(values['hidden_dim'], 1):
        raise SettingError('hidden_dim', values['hidden_dim'],
                           '{hidden_dim} must be an integer >= 1, got {value}; the reference uses 512')
    if values.get('normalize') and values.get('mode') == 'ce':
        raise SettingError('normalize', values['normalize'], "{normalize} has no meaning with {mode} 'ce': its "
                           "targets are offset classes, not values; drop {normalize}, or use {mode} 'l1' or 'cbr'")
    if values.get('layers') is not None:
        _check_layers(values['layers'], bool(values.get('multiscale')))
    if given('compile_head') and not isinstance(values['compile_head'], bool) \
            and values['compile_head'] not in COMPILE_MODES:
        raise SettingError('compile_head', values['compile_head'], '{compile_head} must be True, False or a '
                           'torch.compile mode (' + ', '.join(COMPILE_MODES) + '), got {value}')
    if given('warmup_epochs') and not _is_count(values['warmup_epochs'], 0):
        raise SettingError('warmup_epochs', values['warmup_epochs'],
                           '{warmup_epochs} must be an integer >= 0, got {value}')


def _check_layers(layers: Sequence[str], multiscale: bool) -> None:
    if multiscale:
        raise SettingError('multiscale', multiscale, '{multiscale} picks the stages itself; with {layers} name each '
                           'grid module instead')
    if isinstance(layers, str):
        return  # one module path
    if not layers:
        raise SettingError('layers', layers, '{layers}={value} names no module; name the grid module(s) as '
                           "model.named_modules() lists them, e.g. ['blocks.11'], or {layers}=None to use timm's "
                           'feature_info')
    repeated = sorted({name for name in layers if list(layers).count(name) > 1})
    if repeated:
        raise SettingError('layers', repeated, '{layers} names {value} more than once; name each grid module once')


# ---------------------------------------------------------------------------------------------------------
# command line

def add_drloc_args(parser: argparse.ArgumentParser) -> None:
    """Add the `--drloc-*` flags to `parser`, in a "DRLoc parameters" group."""
    group = parser.add_argument_group('DRLoc parameters', 'The DRLoc auxiliary loss (Liu et al., NeurIPS 2021).')
    for setting in SETTINGS:
        group.add_argument(setting.flag, help=setting.help, **setting.flag_args)


def drloc_kwargs(args: argparse.Namespace) -> Optional[Dict[str, Any]]:
    """DRLocTask's keywords from the parsed `--drloc-*` flags; None when `--drloc-lambda` is 0 (DRLoc off).

    Checks the flags first (see check_drloc_args).

    Raises:
        ConfigError: a flag value, or a combination with another of timm's train.py flags, that cannot work.
    """
    check_drloc_args(args)
    if not args.drloc_lambda:
        return None
    return {s.keyword: s.from_flag(getattr(args, s.dest)) for s in SETTINGS if not s.schedule}


def check_drloc_args(args: argparse.Namespace) -> None:
    """The `--drloc-*` flags' values (check_settings, in flag terms) and, with DRLoc on, their combinations with
    timm's train.py flags.

    Raises:
        ConfigError: naming the flag, the value and the fix.
    """
    try:
        check_settings(**{s.keyword: s.from_flag(getattr(args, s.dest)) for s in SETTINGS})
    except SettingError as e:
        raise ConfigError(e.message(FLAGS)) from e
    if not args.drloc_lambda:
        return
    why_not = (
        ('naflex_loader', '--naflex-loader', 'DRLoc needs a square token grid. Drop --naflex-loader'),
        ('torchscript', '--torchscript', 'DRLoc reads grids with forward hooks. Use --torchcompile instead'),
    )
    for dest, flag, reason in why_not:
        if getattr(args, dest, None):
            raise ConfigError(f'--drloc-lambda > 0 cannot be combined with {flag}: {reason}')
    if getattr(args, 'train_img_sizes', None) and args.drloc_mode != 'l1':
        raise ConfigError(f'--drloc-mode {args.drloc_mode} has one class per grid offset, so its grid size must not '
                          f'change; with --train-img-sizes use --drloc-mode l1')


def ignored_drloc_flags(args: argparse.Namespace) -> List[str]:
    """The `--drloc-*` flags given a value of their own while `--drloc-lambda` is 0, where they do nothing."""
    if args.drloc_lambda:
        return []
    return [s.flag for s in SETTINGS
            if s.keyword != 'drloc_lambda' and getattr(args, s.dest) != s.flag_args.get('default')]


def drloc_lambda_for_epoch(args: argparse.Namespace, epoch: int, num_epochs: int) -> float:
    """The DRLoc weight of `epoch` (0-based) under `--drloc-lambda`, `--drloc-warmup-epochs` and `--drloc-decay`."""
    schedule = {s.keyword: s.from_flag(getattr(args, s.dest)) for s in SETTINGS if s.schedule}
    return drloc_lambda_at(epoch, args.drloc_lambda, num_epochs, **schedule)
