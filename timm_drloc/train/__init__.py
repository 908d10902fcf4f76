"""train_drloc: timm's image classification training with the DRLoc auxiliary loss.

Every flag of timm's `train.py` is accepted with its name, default and meaning, and the run writes the
same output folder (args.yaml, summary.csv, last/checkpoint-N/model_best/milestone-N .pth.tar). The
`--drloc-*` flags add the DRLoc loss; with `--drloc-lambda 0` (the default) the run is timm's plain
classification training. The script is built from timm's library pieces (data, loaders, mixup,
optimizers, schedulers, EMA, AMP scaler, checkpoint saver, distributed helpers, training tasks).

    python train_drloc.py /data --model swin_tiny_patch4_window7_224 --drloc-lambda 0.5
    torchrun --nproc_per_node 2 train_drloc.py --data-dir /data --model vit_small_patch16_224 --drloc-lambda 0.1

The package has the names of timm's train.py (`parser`, `config_parser`, `_parse_args(argv=None)`,
`main(argv=None)`, `create_model`, `train_one_epoch`, `validate`), so sweeps and tests written for train.py run
against it: main() builds the model with this package's `create_model`, looked up when it runs, so replacing
`train.create_model` works, and parsing never changes the module-level `parser`.
The parts: flags.py (the command line), checks.py (bad input, refused before anything is built), build.py (model,
task, data), checkpoints.py (the run's folder, checkpoints, resume), loop.py (the epochs), publish.py
(--push-to-hub).
"""
import argparse
import copy
import json
import logging
import sys
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import yaml
from timm import utils
from timm.data import resolve_data_config
from timm.models import create_model
from timm.optim import create_optimizer_v2, optimizer_kwargs
from timm.scheduler import create_scheduler_v2, scheduler_kwargs
from timm.task import load_task_ema_checkpoint

from timm_drloc.errors import ConfigError, ExitCode, NonFiniteLossError

from .build import (
    build_datasets, build_loaders, build_model, build_task, init_device, place_model, scaled_lr, step_precision,
    train_loss, warn_unreached_lambda)
from .checkpoints import (
    AtomicCheckpointSaver, ResumePoint, experiment_dir, find_resume_point, load_resume_point, open_run_folder)
from .checks import check_flags, check_inputs, check_normalization, log_split_folders
from .flags import build_config_parser, build_parser, load_config
from .loop import TrainingRun, train_epochs, train_one_epoch, validate
from .publish import push_after_training

__all__ = ['config_parser', 'create_model', 'main', 'parser', 'run', 'train_one_epoch', 'validate']

_logger = logging.getLogger('train_drloc')

# timm's train.py has these two as module-level objects, which its tests read; parsing builds its own
config_parser = build_config_parser()
parser = build_parser()


def _parse_args(argv: Optional[Sequence[str]] = None, prog: Optional[str] = None) -> Tuple[argparse.Namespace, str]:
    """Flags from the command line (`argv`, default sys.argv[1:]) over a -c/--config YAML file over the defaults,
    checked and completed (check_flags); also returns them as YAML, for args.yaml. A bad flag or config value
    exits with status 2 and argparse's usage (of `prog`), as argparse's own errors do."""
    argv = sys.argv[1:] if argv is None else list(argv)
    config_args, remaining = build_config_parser().parse_known_args(argv)
    flags = build_parser(prog)
    try:
        if config_args.config:
            flags.set_defaults(**load_config(flags, config_args.config))
        args = flags.parse_args(remaining)
        check_flags(args)
    except ConfigError as e:
        flags.error(str(e))
    return args, yaml.safe_dump(vars(args), default_flow_style=False)


def main(argv: Optional[Sequence[str]] = None, prog: Optional[str] = None) -> int:
    """Train with the flags in `argv` (default sys.argv[1:]; `prog` names the command in usage messages): check the
    input, build model, task, data, optimizer and schedule, then train and evaluate each epoch.

    Returns:
        ExitCode.OK, or the status of a failed `--push-to-hub` export or upload.

    Raises:
        SystemExit: a bad flag or config value (status 2). ConfigError: other bad input, before training (or a full
        disk, damaged images, during it). NonFiniteLossError: a NaN / Inf loss or weight. KeyboardInterrupt.
    """
    utils.setup_default_logging()
    args, args_text = _parse_args(argv, prog)
    split_dirs = check_inputs(args)
    args.prefetcher = not args.no_prefetcher
    args.grad_accum_steps = max(1, args.grad_accum_steps)
    device = init_device(args)
    log_split_folders(args, split_dirs)
    training, data_config, class_names = _build_run(args, args_text, device)
    results = train_epochs(training)
    return _finish(training, results, data_config, class_names)


def _build_run(args: argparse.Namespace, args_text: str,
               device: torch.device) -> Tuple[TrainingRun, Dict[str, Any], Optional[List[str]]]:
    """The TrainingRun of the flags, the data config the model resolved, and the class names of the data."""
    model = build_model(args, create_model)  # this package's create_model, as it is when main() runs
    check_normalization(args, resolve_data_config(dict(vars(args), mean=None, std=None), model=model)['input_size'])
    data_config = resolve_data_config(vars(args), model=model, verbose=utils.is_primary(args))
    precision = step_precision(args, device)
    model, patch_size = place_model(args, model, device, precision.model_dtype)
    try:
        criterion = train_loss(args, num_classes=args.num_classes, verbose=utils.is_primary(args)).to(device=device)
    except (ValueError, OSError) as e:
        raise ConfigError(str(e)) from e
    # the task probes the model (DRLoc grids) before any data is read, so a model without a grid fails fast
    task = build_task(args, model, criterion, data_config['input_size'], device, precision.model_dtype)
    dataset_train, dataset_eval = build_datasets(args, data_config['input_size'][0])
    loaders = build_loaders(args, data_config, dataset_train, dataset_eval, device, precision.model_dtype, patch_size)
    if not args.lr:
        args.lr = scaled_lr(args, loaders.batch_size_reference)
    try:
        optimizer = create_optimizer_v2(task.get_trainable_module(), **optimizer_kwargs(cfg=args), **args.opt_kwargs)
    except ValueError as e:  # an optimizer timm does not have
        raise ConfigError(f'--opt {args.opt}: {e}; timm.optim.list_optimizers() names the optimizers timm has') from e
    except TypeError as e:  # a keyword the optimizer does not take
        raise ConfigError(f'--opt {args.opt} --opt-kwargs {args.opt_kwargs}: {e}; drop what it does not take') from e
    if utils.is_primary(args):
        settings = dict(copy.deepcopy(optimizer.defaults), weight_decay=args.weight_decay)
        _logger.info(f'Created {type(optimizer).__name__} ({args.opt}) optimizer: '
                     + ', '.join(f'{k}: {v}' for k, v in settings.items()))

    output_dir = experiment_dir(args, data_config['input_size'])
    resume = find_resume_point(args, output_dir)
    if resume.path:
        load_resume_point(resume, args, task, optimizer, precision.loss_scaler)
    eval_model = _wrap_task(args, task, device, resume)

    eval_metric = args.eval_metric if loaders.eval is not None else 'loss'
    updates_per_epoch = (len(loaders.train) + args.grad_accum_steps - 1) // args.grad_accum_steps
    try:
        lr_scheduler, num_epochs = create_scheduler_v2(optimizer, **scheduler_kwargs(
            args, decreasing_metric=eval_metric == 'loss'), updates_per_epoch=updates_per_epoch)
    except ValueError as e:  # a schedule timm does not have, or settings it refuses
        raise ConfigError(f'--sched {args.sched}: {e}') from e
    stop_at = _stop_epoch(args, num_epochs)
    if utils.is_primary(args):
        warn_unreached_lambda(args, num_epochs)
    start_epoch = args.start_epoch if args.start_epoch is not None else (resume.epoch or 0)
    if lr_scheduler is not None and start_epoch > 0:
        if args.sched_on_updates:
            lr_scheduler.step_update(start_epoch * updates_per_epoch)
        else:
            lr_scheduler.step(start_epoch)

    training = TrainingRun(args, device, task, eval_model, optimizer, lr_scheduler, loaders, precision,
                           nn.CrossEntropyLoss().to(device=device), eval_metric, num_epochs, start_epoch, stop_at)
    if utils.is_primary(args):
        _open_output(training, args_text, output_dir, resume)
    class_to_idx = getattr(getattr(dataset_train, 'reader', None), 'class_to_idx', None) or {}
    return training, data_config, sorted(class_to_idx, key=class_to_idx.get) or None


def _wrap_task(args: argparse.Namespace, task, device: torch.device, resume: ResumePoint) -> nn.Module:
    """The task's EMA (seeded from the resumed checkpoint), torch.compile and DDP, in that order; returns the
    model validation runs (compiled, not DDP-wrapped)."""
    if args.model_ema:  # after device placement, before DDP
        task.setup_ema(decay=args.model_ema_decay, use_warmup=args.model_ema_warmup,
                       device='cpu' if args.model_ema_force_cpu else None)
        if resume.ema:
            load_task_ema_checkpoint(task, resume.path)
    if args.torchcompile:
        if utils.is_primary(args):
            _logger.info(f'Compiling with backend={args.torchcompile}, mode={args.torchcompile_mode}')
        task.compile(backend=args.torchcompile, mode=args.torchcompile_mode)
        if task.has_ema():
            task.compile_ema(backend=args.torchcompile, mode=args.torchcompile_mode)
    eval_model = task.get_eval_model()
    if args.distributed:
        task.prepare_distributed(device_ids=None if device.type == 'cpu' else [device],
                                 broadcast_buffers=not args.no_ddp_bb)
    return eval_model


def _stop_epoch(args: argparse.Namespace, num_epochs: int) -> int:
    """The epoch (exclusive) this process stops at: --stop-epoch, or the end of the `num_epochs` schedule."""
    if args.stop_epoch is None:
        return num_epochs
    if not 1 <= args.stop_epoch <= num_epochs:
        raise ConfigError(f'--stop-epoch {args.stop_epoch} is out of range: the schedule has {num_epochs} epochs, '
                          f'so use 1..{num_epochs}, or raise --epochs')
    return args.stop_epoch


def _open_output(training: TrainingRun, args_text: str, output_dir: str, resume: ResumePoint) -> None:
    """Primary process: the experiment folder and the checkpoint saver (its ranking restored when the run goes on
    in place)."""
    args = training.args
    training.output_dir = open_run_folder(args, args_text, output_dir, resume.in_place, training.start_epoch)
    folder = training.output_dir
    training.saver = AtomicCheckpointSaver(
        model=training.task.get_trainable_module(), optimizer=training.optimizer, args=args,
        amp_scaler=training.precision.loss_scaler, checkpoint_dir=folder, recovery_dir=folder,
        decreasing=training.eval_metric == 'loss', max_history=args.checkpoint_hist, task=training.task)
    if resume.in_place:  # keep the ranked history and the best metric
        training.saver.load_state_dict_from_checkpoint(resume.path)
    warmup = 'warm-up added before the schedule' if args.warmup_prefix else 'warm-up inside the schedule'
    per = 'epoch' if training.lr_scheduler is None or training.lr_scheduler.t_in_epochs else 'update'
    _logger.info(f'Scheduled epochs: {training.num_epochs} ({warmup}); running epochs {training.start_epoch}..'
                 f'{training.stop_at - 1}; LR stepped per {per}.')
    if training.start_epoch >= training.stop_at:
        _logger.info(f'Nothing to train: the run is at epoch {training.start_epoch} and stops at '
                     f'{training.stop_at}.')


def _finish(training: TrainingRun, results: List[Dict[str, Any]], data_config: Dict[str, Any],
            class_names: Optional[List[str]]) -> int:
    """After the last epoch: the best metric and the best epochs' results (timm's --result lines), then the
    --push-to-hub export and upload; returns the ExitCode."""
    args = training.args
    if args.distributed:
        torch.distributed.destroy_process_group()
    if training.saver is not None and training.saver.best_metric is not None:
        _logger.info(f'*** Best metric: {training.saver.best_metric} (epoch {training.saver.best_epoch})')
    if not utils.is_primary(args):
        return ExitCode.OK
    ranked = sorted(results, key=lambda r: r.get('validation', r['train']).get(training.eval_metric, 0),
                    reverse=training.eval_metric == 'loss')
    print(f'--result\n{json.dumps(ranked[-10:], indent=4)}')
    return push_after_training(args, training.output_dir, data_config=data_config, class_names=class_names)


def run(argv: Optional[Sequence[str]] = None, prog: Optional[str] = None) -> None:
    """Console entry: main(argv, prog), with input errors, non-finite losses, interrupts and failed Hub pushes
    reported as one line and the ExitCode of each as the exit status."""
    try:
        status = main(argv, prog)
    except ConfigError as e:  # one line; the log format puts 'ERROR: ' before it
        _logger.error(str(e))
        sys.exit(ExitCode.BAD_INPUT)
    except NonFiniteLossError as e:
        _logger.error(str(e))
        sys.exit(ExitCode.NON_FINITE_LOSS)
    except KeyboardInterrupt as e:  # raised with its line by the training loop; bare before or after it
        _logger.error(str(e) or 'interrupted outside the training epochs; the checkpoints already written are intact')
        sys.exit(ExitCode.INTERRUPTED)
    sys.exit(int(status or ExitCode.OK))
