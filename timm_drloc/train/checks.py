"""Bad input is refused before anything is built, in two passes, each in one place:

* `check_flags(args)`: the flags themselves (values, ranges, combinations), right after parsing; it also
  completes them as timm 1.0.31 does (the old loss switches folded into --loss, the eval metric named), so
  args.yaml records what the run does;
* `check_inputs(args)`: what the flags point at (the output folder, checkpoint files, the Hub token, the
  device, the data's split folders), before the process starts its device; also the --eval-metric against the
  task's evaluator, which timm 1.0.31 refuses there too (main() raises, the argument parser does not).

Both raise ConfigError naming the flag, the value and the fix. What needs the model or the data to be known
(a model without a grid, data with other classes) is refused while building, still before any training step.
"""
import argparse
import importlib
import logging
import math
import os
from typing import Optional, Sequence, Tuple

import torch
from timm import utils
from timm.data.transforms import str_to_interp_mode
from timm.task.evaluator import ClassificationEvaluator, MultiLabelClassificationEvaluator

from timm_drloc.checkpoint import check_model_name
from timm_drloc.errors import ConfigError
from timm_drloc.settings import check_drloc_args, ignored_drloc_flags

from .build import MODEL_FLAG_KEYWORDS, is_folder_dataset, mixup_active, split_folders, train_loss
from .checkpoints import check_checkpoint_file
from .publish import check_push_args

_logger = logging.getLogger('train_drloc')


def check_flags(args: argparse.Namespace) -> None:
    """Refuse flag values and combinations that cannot work; fold --bce-loss / --jsd-loss / --bce-pos-weight into
    --loss / --loss-pos-weight and name the --eval-metric, as timm 1.0.31 does.

    Raises:
        ConfigError: the first problem found, naming the flag, the value and the fix.
    """
    check_drloc_args(args)
    _check_numbers(args)
    _check_loss(args)
    _check_combinations(args)
    _check_model_kwargs(args)
    # args.yaml names the metric: timm's train.py, given that file with -c, needs a name (checked in check_inputs)
    args.eval_metric = args.eval_metric or _evaluator(args).default_metric
    _warn_ignored(args)


def _evaluator(args: argparse.Namespace) -> type:
    """The evaluator class of the run's task: the metrics it reports and its default one (top1; map)."""
    return MultiLabelClassificationEvaluator if args.task == 'multilabel' else ClassificationEvaluator


def _check_eval_metric(args: argparse.Namespace) -> None:
    """--eval-metric must be one the task's evaluation reports: checkpoints are ranked by it."""
    names = _evaluator(args).metric_names
    if args.eval_metric not in names:
        raise ConfigError(f'--eval-metric {args.eval_metric} is not reported by {args.task} evaluation; use one of '
                          f'{", ".join(names)}')


def _check_numbers(args: argparse.Namespace) -> None:
    """timm's number flags that would fail mid-run (or train on nonsense) outside their range."""
    if args.lr is not None and not (math.isfinite(args.lr) and args.lr > 0):
        raise ConfigError(f'--lr must be a finite number > 0, got {args.lr}; e.g. --lr 1e-3, or leave it out to scale '
                          f'--lr-base to the batch size')
    at_least = (
        ('--epochs', args.epochs, 1, 'epochs to train'),
        ('-b/--batch-size', args.batch_size, 1, 'images per step and process'),
        ('-vb/--validation-batch-size', args.validation_batch_size, 1, 'images per eval step'),
        ('--log-interval', args.log_interval, 1, 'updates between log lines'),
        ('--checkpoint-hist', args.checkpoint_hist, 1, 'epoch checkpoints kept besides last and model_best'),
        ('-j/--workers', args.workers, 0, 'data loader processes; 0 loads in the main process'),
        ('--img-size', args.img_size, 1, 'input size in pixels'),
        ('--start-epoch', args.start_epoch, 0, 'the epoch to count from'),
    )
    for flag, value, low, meaning in at_least:
        if value is not None and value < low:
            raise ConfigError(f'{flag} must be >= {low} ({meaning}), got {value}')
    if args.val_interval < 1:
        raise ConfigError(f'--val-interval must be >= 1, got {args.val_interval}')
    if args.max_nonfinite_steps < 1:
        raise ConfigError(f'--max-nonfinite-steps must be >= 1, got {args.max_nonfinite_steps}; it counts non-finite '
                          f'steps in a row that stop the run (default 10)')
    if not (math.isfinite(args.aug_repeats) and args.aug_repeats >= 0):
        raise ConfigError(f'--aug-repeats must be a finite number >= 0 (times each image is repeated across the '
                          f'processes), got {args.aug_repeats}; timm recipes use 3, 0 turns it off')
    if args.input_size is not None and min(args.input_size) < 1:
        raise ConfigError(f'--input-size takes C H W, each >= 1, got {args.input_size}')
    if args.stop_epoch is not None and args.stop_epoch < 1:
        raise ConfigError(f'--stop-epoch {args.stop_epoch} is out of range: it counts completed epochs, use >= 1')
    if args.save_epochs and min(args.save_epochs) < 1:
        raise ConfigError(f'--save-epochs counts completed epochs, so each must be >= 1, got {args.save_epochs}')
    if args.interpolation:  # '': the model's own; timm's train and eval transforms both take it
        try:
            str_to_interp_mode(args.interpolation)
        except KeyError:
            raise ConfigError(f'--interpolation {args.interpolation} is not a mode timm resizes with (for training and '
                              f'evaluation); use bilinear, bicubic, nearest, box, hamming or lanczos') from None
    if not 0 <= args.smoothing < 1:
        raise ConfigError(f'--smoothing is the share of the target spread over the other classes, so it must be in '
                          f'[0, 1), got {args.smoothing}; timm uses 0.1')
    if args.std is not None and not all(math.isfinite(v) and v > 0 for v in args.std):
        raise ConfigError(f'--std divides each channel, so every value must be a finite number > 0, got {args.std}')
    if mixup_active(args):
        odd = [b for b in [args.batch_size, *(args.train_batch_sizes or [])] if b % 2]
        if odd:
            raise ConfigError(f'mixup / cutmix mix each image of a batch with another one, so batch sizes must be '
                              f'even, got {odd[0]}; use {odd[0] + 1}')


def _check_loss(args: argparse.Namespace) -> None:
    """The task and loss flags, folded as timm 1.0.31 folds them, and checked by building the loss once."""
    multi_label = args.task == 'multilabel'
    if args.target_format == 'multihot' and not multi_label:
        raise ConfigError('--target-format multihot holds one 0/1 value per class, which is a multi-label target: '
                          'add --task multilabel')
    if multi_label and args.kd_model_name:
        raise ConfigError('--kd-model-name distills single-label logits; it cannot be combined with --task multilabel')
    if args.kd_model_name:
        check_model_name(args.kd_model_name, '--kd-model-name')
    for switch, loss in (('--bce-loss', 'bce'), ('--jsd-loss', 'jsd')):
        if getattr(args, switch[2:].replace('-', '_')):
            if args.loss not in (None, loss):
                raise ConfigError(f'{switch} means --loss {loss}, but --loss {args.loss} is given too; keep one of '
                                  f'them')
            args.loss = loss
    if args.bce_pos_weight is not None:
        if args.loss_pos_weight not in (None, str(args.bce_pos_weight)):  # equal when re-read from args.yaml
            raise ConfigError('--bce-pos-weight and --loss-pos-weight set the same weight; keep --loss-pos-weight')
        args.loss_pos_weight = str(args.bce_pos_weight)
    try:
        train_loss(args)
    except (ValueError, OSError) as e:
        raise ConfigError(f'loss flags: {e}') from e


def _check_combinations(args: argparse.Namespace) -> None:
    """Flags that cannot work together, or that timm would ignore without a word."""
    naflex, splits = args.naflex_loader, args.aug_splits
    refused = (
        (naflex and args.train_img_sizes is not None,
         '--naflex-loader and --train-img-sizes are two different loaders; choose one'),
        (naflex and args.use_multi_epochs_loader,
         '--use-multi-epochs-loader does not work with --naflex-loader; drop one of them'),
        (naflex and splits > 1, '--aug-splits does not work with --naflex-loader; drop one of them'),
        (naflex and args.aug_repeats > 0, '--aug-repeats does not work with --naflex-loader; drop one of them'),
        (naflex and args.naflex_patch_sizes and args.naflex_patch_size_probs and
         len(args.naflex_patch_size_probs) != len(args.naflex_patch_sizes),
         '--naflex-patch-size-probs needs one value per --naflex-patch-sizes entry'),
        (args.resume == 'auto' and not args.experiment,
         '--resume auto continues in place in the experiment folder: give it with --experiment NAME'),
        (splits == 1, '--aug-splits 1 makes no split; use 0 (off) or 2 and more'),
        (args.split_bn and splits <= 1 and not args.resplit, '--split-bn needs --aug-splits 2 or more (or --resplit)'),
        (not naflex and mixup_active(args) and not args.no_prefetcher and splits > 1,
         'mixup/cutmix with --aug-splits needs --no-prefetcher'),
        (args.torchscript and args.sync_bn, '--torchscript cannot script SyncBatchNorm; drop --sync-bn'),
        (bool(args.model_dtype) and args.model_dtype not in ('float32', 'float16', 'bfloat16'),
         f'--model-dtype {args.model_dtype} is not float32, float16 or bfloat16'),
        (args.amp and args.amp_dtype not in ('float16', 'bfloat16'),
         f'--amp-dtype {args.amp_dtype} is not float16 or bfloat16'),
        (args.amp and args.model_dtype not in (None, 'float32'),
         f'--amp needs a float32 model, got --model-dtype {args.model_dtype}; drop one of them'),
        (args.log_wandb and args.wandb_resume_id and not args.resume,
         '--wandb-resume-id continues a wandb run, which needs --resume'),
    )
    for wrong, message in refused:
        if wrong:
            raise ConfigError(message)


def _check_model_kwargs(args: argparse.Namespace) -> None:
    """--model-kwargs may not set what a model flag sets: the keyword would reach create_model twice (timm's
    train.py fails there with a TypeError)."""
    for key, value in args.model_kwargs.items():
        if key in MODEL_FLAG_KEYWORDS:
            flag = MODEL_FLAG_KEYWORDS[key]
            raise ConfigError(f'--model-kwargs {key}={value} sets what {flag} sets (the run passes {key} to '
                              f'create_model from {flag}); drop it from --model-kwargs and use {flag}')


def _warn_ignored(args: argparse.Namespace) -> None:
    """Flags given that will have no effect: said once, at the start."""
    ignored = ignored_drloc_flags(args)
    if ignored:
        _logger.warning(f'{", ".join(ignored)} given but --drloc-lambda is 0, so DRLoc is off and they have no '
                        f'effect; set --drloc-lambda (e.g. 0.5) to train with DRLoc')
    if args.drop_connect is not None:
        _logger.warning('--drop-connect is an old name that timm models no longer read; use --drop-path '
                        f'{args.drop_connect} for stochastic depth')
    if args.local_rank and 'LOCAL_RANK' not in os.environ:
        _logger.warning('--local_rank is set by old launchers only; the rank is read from the torchrun environment')


def check_inputs(args: argparse.Namespace) -> Tuple[Optional[str], Optional[str]]:
    """The folders, files, token and device the flags point at; returns the split folders a folder dataset
    reads (train, eval), (None, None) for other datasets.

    Raises:
        ConfigError: naming the flag, what was found and what to give instead.
    """
    _check_eval_metric(args)
    _check_output(args)
    if args.resume and args.resume != 'auto':
        check_checkpoint_file('--resume', args.resume)
    pretrained_path = args.pretrained_path if args.pretrained else None  # read only with --pretrained
    for flag, path in (('--initial-checkpoint', args.initial_checkpoint), ('--pretrained-path', pretrained_path)):
        numpy_weights = os.path.splitext(path or '')[1].lower() in ('.npz', '.npy')  # model-specific: timm reads them
        if path and not numpy_weights:
            check_checkpoint_file(flag, path)
    if args.class_map and not os.path.isfile(args.class_map):
        raise ConfigError(f'--class-map {args.class_map}: no such file; give a text file with one class folder name '
                          f'per line, in class-index order')
    check_push_args(args)  # no token: refuse now, not after hours of training
    for module in args.device_modules or ():
        importlib.import_module(module)
    if args.device.startswith('cuda') and not torch.cuda.is_available():
        raise ConfigError(f'--device {args.device} but no CUDA device is available; pass --device cpu')
    if args.aug_repeats > 0 and not utils.is_distributed_env():
        raise ConfigError(f'--aug-repeats {args.aug_repeats:g} shares repeats of each image among the processes of a '
                          f'distributed run, and this run is one process; launch it with torchrun --nproc_per_node N '
                          f'(N >= 2), or drop --aug-repeats')
    return _check_data_dir(args)


def _check_output(args: argparse.Namespace) -> None:
    """The experiment folder must be one this process can create and write in (a file in its place, or a folder
    without write permission, would fail at the first checkpoint, after an epoch of work)."""
    flag = f'--output {args.output}' if args.output else 'the default output folder'
    target = os.path.abspath(os.path.join(args.output or './output/train', args.experiment))
    existing = target
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ConfigError(f'{flag}: {existing} is a file, not a folder; pass --output a folder to hold the '
                          f'experiment folders')
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f'{flag}: cannot write in {existing} (permission denied); pass --output a folder you can '
                          f'write in')


def _check_data_dir(args: argparse.Namespace) -> Tuple[Optional[str], Optional[str]]:
    """A folder dataset's root must exist and hold the split folders the run reads. With no data dir given at
    all, the error comes once the model is built (build_datasets), as in timm's train.py, whose own tests build a
    model without data."""
    if args.data and not args.data_dir:
        args.data_dir = args.data
    if not is_folder_dataset(args) or not args.data_dir:
        return None, None
    if not os.path.exists(args.data_dir):
        raise ConfigError(f'data dir {args.data_dir!r} does not exist; pass the dataset root with --data-dir, '
                          f'holding {args.train_split}/ and {args.val_split}/ class folders')
    if not os.path.isdir(args.data_dir):
        return None, None  # a .tar of images: no split folders
    return split_folders(args)


def check_normalization(args: argparse.Namespace, input_size: Sequence[int]) -> None:
    """--mean / --std must give one value per input channel of the model, or one for all (timm's data config
    asserts it without a word).

    Args:
        input_size: (C, H, W) the model takes.
    """
    channels = input_size[0]
    for flag, values in (('--mean', args.mean), ('--std', args.std)):
        if values is not None and len(values) not in (1, channels):
            raise ConfigError(f'{flag} has {len(values)} values but the model takes {channels} input channel(s); '
                              f'give one value per channel ({channels}), or one value for all of them')


def log_split_folders(args: argparse.Namespace, folders: Tuple[Optional[str], Optional[str]]) -> None:
    """Name the split folders the run reads, in the log of the primary process."""
    train_dir, val_dir = folders
    if train_dir is not None and utils.is_primary(args):
        _logger.info(f'Data: training on {train_dir}, validating on {val_dir or "nothing (--val-split is empty)"}.')
