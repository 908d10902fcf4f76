"""The epochs: train with the task, evaluate, write summary.csv, checkpoint, step the schedule.

Everything the epochs share is one TrainingRun, built by main(). A step's loss reaches the host once, for
the meters and the non-finite check together; a NaN / Inf loss stops the run, or is skipped under float16's
loss scaler (NonFiniteSteps); weights that turned NaN / Inf are never checkpointed; Ctrl-C ends the run in
one line naming the epoch and step (RunPosition).
"""
import argparse
import importlib.util
import logging
import math
import os
import sys
import time
from collections import OrderedDict
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
from timm import utils
from timm.task import TrainingTask
from timm.task.evaluator import MultiLabelClassificationEvaluator, evaluation_sample_limit

from timm_drloc.errors import NonFiniteLossError
from timm_drloc.settings import drloc_lambda_for_epoch
from timm_drloc.summary import SUMMARY_FILE, append_summary

from .build import Loaders, Precision
from .checkpoints import continue_hint

try:
    from tqdm import tqdm
    has_tqdm = True
except ImportError:
    has_tqdm = False

_logger = logging.getLogger('train_drloc')


@dataclass
class RunPosition:
    """Where the training loop is, for the line an interrupt (Ctrl-C) ends the run with."""
    epoch: int
    step: Optional[int] = None  # batch index within the epoch; None between the epoch's training steps

    def describe(self) -> str:
        where = f'step {self.step}' if self.step is not None else 'outside its training steps (evaluating or saving)'
        return f'epoch {self.epoch}, {where}'


class NonFiniteSteps:
    """What a step whose loss is NaN / Inf does: it stops the run, or, under a loss scaler, it is skipped.

    Without a loss scaler (float32, bfloat16) the first non-finite loss stops training. With float16 AMP's
    loss scaler a non-finite step is skipped, as timm's scaler skips a step whose gradients overflow: no
    backward, no optimizer update, one warning naming epoch, step and term; `limit` such steps in a row stop
    the run. The streak runs on across epochs. The check runs before backward, so a bad step never reaches
    the optimizer, and its flag is reduced over ranks, so every rank skips or stops at the same step. The
    loss scale stays as it is: it scales the gradients, and a loss already NaN / Inf in the forward pass is
    not its doing (the scaler still lowers it, as in timm, when finite losses give overflowing gradients).

    Args:
        limit: consecutive non-finite steps that stop the run (--max-nonfinite-steps); None: the first one.
    """

    def __init__(self, limit: Optional[int]):
        self.limit = limit
        self.streak = 0  # non-finite steps in a row, up to now
        self.skipped = 0  # skipped steps in the current epoch

    def check(self, result: Dict[str, torch.Tensor], epoch: int, batch_idx: int,
              args: argparse.Namespace) -> Optional[Tuple[float, Optional[float]]]:
        """This rank's (loss, drloc_loss) as floats, None for a step to skip; NonFiniteLossError to stop."""
        bad, loss, drloc = _loss_values(result, args)
        if not bad:
            self.streak = 0
            return loss, drloc
        self.streak += 1
        terms = [k for k in ('task_loss', 'drloc_loss') if k in result and not torch.isfinite(result[k]).all()]
        term = ', '.join(terms) or ('loss' if not math.isfinite(loss) else 'loss on another rank')
        what = f'non-finite {term} at epoch {epoch}, step {batch_idx} (loss={loss})'
        if self.limit is None or self.streak >= self.limit:
            streak = '' if self.limit is None else \
                f'{self.streak} non-finite steps in a row (--max-nonfinite-steps {self.limit}); '
            raise NonFiniteLossError(
                f'{what}: {streak}training stopped; the checkpoints already written are untouched. Lower --lr, set '
                f'--clip-grad, or lower --drloc-lambda, then continue with --resume')
        self.skipped += 1
        if utils.is_primary(args):
            _logger.warning(f'{what}: step skipped, no update ({self.streak} in a row; '
                            f'--max-nonfinite-steps {self.limit} in a row stop the run)')
        return None


def _loss_values(result: Dict[str, torch.Tensor], args: argparse.Namespace) -> Tuple[bool, float, Optional[float]]:
    """(the loss is NaN / Inf on any rank, this rank's loss, this rank's drloc_loss or None).

    The flag and the values the meters need come to the host in one transfer: one host-device sync per step
    (timm's loop has one too, for its loss meter, when not distributed; under DDP it has none, and this adds
    one tiny all_reduce, so that every rank takes the same decision).
    """
    loss = result['loss'].detach()
    bad = (~torch.isfinite(loss)).float().reshape(1)
    if args.distributed:
        torch.distributed.all_reduce(bad)
    drloc = result.get('drloc_loss')
    parts = [bad, loss.float().reshape(1)] + ([drloc.detach().float().reshape(1)] if drloc is not None else [])
    values = torch.cat(parts).tolist()
    return values[0] != 0, values[1], (values[2] if drloc is not None else None)


@dataclass
class TrainingRun:
    """What the epochs of a run share, built once by main().

    Args:
        args: the parsed (and completed) flags.
        device: this process's device.
        task: the training task (DRLocTask, or one of timm's); its trainable module is what is trained.
        eval_model: the model validation runs (compiled when asked, never DDP-wrapped).
        optimizer, lr_scheduler: timm's, from the flags.
        loaders: the data.
        precision: autocast, loss scaler, model dtype.
        eval_loss_fn: the loss validation reports.
        eval_metric: the metric checkpoints are ranked by ('loss' without validation).
        num_epochs: the schedule's length; start_epoch, stop_at: the epochs this process runs.
        saver, output_dir: the checkpoint saver and the experiment folder (primary process only).
        nonfinite, position: the loop's state across epochs.
    """
    args: argparse.Namespace
    device: torch.device
    task: TrainingTask
    eval_model: nn.Module
    optimizer: torch.optim.Optimizer
    lr_scheduler: Optional[Any]
    loaders: Loaders
    precision: Precision
    eval_loss_fn: nn.Module
    eval_metric: str
    num_epochs: int
    start_epoch: int
    stop_at: int
    saver: Optional[utils.CheckpointSaver] = None
    output_dir: Optional[str] = None
    nonfinite: NonFiniteSteps = field(init=False)
    position: RunPosition = field(init=False)

    def __post_init__(self):
        scaled = self.precision.loss_scaler is not None
        self.nonfinite = NonFiniteSteps(self.args.max_nonfinite_steps if scaled else None)
        self.position = RunPosition(self.start_epoch)


def train_epochs(run: TrainingRun) -> List[Dict[str, Any]]:
    """Epochs start_epoch..stop_at-1: train, evaluate, write the summary, checkpoint, step the schedule.

    Returns the results of the evaluated epochs ({'epoch', 'train', 'validation'}).
    """
    args, task = run.args, run.task
    drloc_on = args.drloc_lambda > 0
    log_wandb = args.log_wandb and importlib.util.find_spec('wandb') is not None
    results = []
    try:
        for epoch in range(run.start_epoch, run.stop_at):
            run.position.epoch, run.position.step = epoch, None
            _set_loader_epoch(run.loaders.train, epoch)
            if drloc_on:
                task.set_drloc_lambda(drloc_lambda_for_epoch(args, epoch, run.num_epochs))
            train_metrics = train_one_epoch(run, epoch)
            run.position.step = None
            trained = task.get_trainable_module()
            _weights_finite_or_stop(trained, epoch, 'at the end of the epoch')
            _share_batch_norm(args, trained)

            completed = epoch + 1
            milestone = bool(args.save_epochs) and completed in args.save_epochs
            if completed % args.val_interval and completed not in (run.num_epochs, run.stop_at) and not milestone:
                if utils.is_primary(args):
                    _logger.info(f'Epoch {epoch}: no eval or checkpoint (--val-interval {args.val_interval})')
                if run.lr_scheduler is not None:
                    run.lr_scheduler.step(completed, metric=None)
                continue

            eval_metrics = _evaluate(run)
            if run.output_dir is not None:
                append_summary(os.path.join(run.output_dir, SUMMARY_FILE), epoch, train_metrics, eval_metrics,
                               lr=_mean_lr(run.optimizer), drloc_lambda=task.drloc_lambda if drloc_on else None,
                               log_wandb=log_wandb)
            metric = (eval_metrics or train_metrics)[run.eval_metric]
            if run.saver is not None:
                run.saver.save_checkpoint(epoch, metric=metric)
                if milestone:
                    run.saver.save_milestone(completed)
            if run.lr_scheduler is not None:
                run.lr_scheduler.step(completed, metric)
            results.append(dict(epoch=epoch, train=train_metrics, **(
                {} if eval_metrics is None else dict(validation=eval_metrics))))
    except KeyboardInterrupt:  # Ctrl-C: stop here, in one line; no end-of-run output, export or upload follows
        raise KeyboardInterrupt(f'interrupted at {run.position.describe()}; '
                                f'{continue_hint(args, run.output_dir)}') from None
    return results


def _evaluate(run: TrainingRun) -> Optional['OrderedDict[str, float]']:
    """The epoch's eval metrics: of the EMA weights when there are evaluated ones, else of the model."""
    if run.loaders.eval is None:
        return None
    metrics = validate(run, run.eval_model)
    if run.task.has_ema() and not run.args.model_ema_force_cpu:
        _share_batch_norm(run.args, run.task.get_trainable_module(ema=True))
        metrics = validate(run, run.task.get_eval_model(ema=True), log_suffix=' (EMA)')
    return metrics


def _share_batch_norm(args: argparse.Namespace, module: nn.Module) -> None:
    """--dist-bn: each rank's BatchNorm statistics made the same (averaged, or rank 0's)."""
    if args.distributed and args.dist_bn in ('broadcast', 'reduce'):
        utils.distribute_bn(module, args.world_size, args.dist_bn == 'reduce')


def _mean_lr(optimizer: torch.optim.Optimizer) -> float:
    lrs = [group['lr'] for group in optimizer.param_groups]
    return sum(lrs) / len(lrs)


def _weights_finite_or_stop(module: nn.Module, epoch: int, where: str) -> None:
    """NonFiniteLossError when a weight of `module` is NaN / Inf, so that a diverged model is never checkpointed.

    A finite loss can still send Inf gradients into the weights (float32, no scaler to catch them). Every rank
    calls this: under DDP the weights are the same on all of them, so all stop together.
    """
    flags = [torch.isfinite(p.detach()).all() for p in module.parameters() if p.is_floating_point()]
    if flags and not bool(torch.stack(flags).all()):
        raise NonFiniteLossError(
            f'the model weights became NaN / Inf in epoch {epoch} ({where}): training stopped before saving them; '
            f'the checkpoints already written are untouched. Lower --lr or set --clip-grad, then continue with '
            f'--resume')


def _set_loader_epoch(loader, epoch: int) -> None:
    """Tell the dataset and the (batch) sampler the epoch, so shuffles and size schedules differ per epoch."""
    if hasattr(loader.dataset, 'set_epoch'):
        loader.dataset.set_epoch(epoch)
    batch_sampler, sampler = getattr(loader, 'batch_sampler', None), getattr(loader, 'sampler', None)
    if hasattr(batch_sampler, 'set_epoch'):
        batch_sampler.set_epoch(epoch)
    elif hasattr(sampler, 'set_epoch'):
        sampler.set_epoch(epoch)


# ---------------------------------------------------------------------------------------------------------
# one epoch of training

class EpochProgress:
    """A tqdm bar per epoch on a terminal (primary process only); plain log lines every log interval otherwise."""

    def __init__(self, epoch: int, total: int, log_interval: int, enabled: bool):
        self.epoch, self.total, self.log_interval = epoch, total, max(1, log_interval)
        self.enabled = enabled
        self.bar = None
        if enabled and has_tqdm and sys.stderr.isatty():
            self.bar = tqdm(total=total, desc=f'Train {epoch}', leave=True, dynamic_ncols=True)

    def update(self, update_idx: int, last: bool, values: Dict[str, float], line: Callable[[], str]) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix({k: f'{v:.3g}' for k, v in values.items()}, refresh=False)
        elif update_idx % self.log_interval == 0 or last:
            _logger.info(line())

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class _Epoch:
    """One epoch's bookkeeping: its length in batches and updates, this rank's running means (loss, DRLoc loss,
    update and data times), the images since the last update (all ranks), and the progress display."""

    def __init__(self, run: 'TrainingRun', epoch: int):
        self.epoch = epoch
        self.num_batches, self.accum = len(run.loaders.train), run.args.grad_accum_steps
        self.num_updates = (self.num_batches + self.accum - 1) // self.accum
        self.short_update = self.num_batches % self.accum  # batches of the last update when it is short, else 0
        self.loss, self.drloc = utils.AverageMeter(), utils.AverageMeter()
        self.update_time, self.data_time = utils.AverageMeter(), utils.AverageMeter()
        self.samples = 0
        self.progress = EpochProgress(epoch, self.num_updates, run.args.log_interval, utils.is_primary(run.args))

    def steps_in_update(self, batch_idx: int) -> int:
        """Batches the update of `batch_idx` accumulates (fewer in a short last update)."""
        if self.short_update and batch_idx >= self.num_batches - self.short_update:
            return self.short_update
        return self.accum


def train_one_epoch(run: TrainingRun, epoch: int) -> 'OrderedDict[str, float]':
    """One epoch of updates; returns the epoch's mean train loss (and mean DRLoc loss), averaged over ranks.

    A NaN / Inf loss stops the run or skips its step (run.nonfinite, whose streak runs across epochs);
    run.position.step follows the batch being trained on (for the line a Ctrl-C ends the run with).
    """
    args, task, optimizer = run.args, run.task, run.optimizer
    run.nonfinite.skipped = 0
    _mixup_off(run, epoch)
    second_order = getattr(optimizer, 'is_second_order', False)
    trainable = task.get_trainable_module()
    defer_sync = args.distributed and hasattr(trainable, 'no_sync')
    trainable.train()
    ep = _Epoch(run, epoch)
    num_updates = epoch * ep.num_updates
    data_start = update_start = time.time()
    optimizer.zero_grad()
    skip_update = False  # a step of this update had a non-finite loss: the update is skipped
    for batch_idx, (input, target) in enumerate(run.loaders.train):
        run.position.step = batch_idx
        last_batch = batch_idx == ep.num_batches - 1
        need_update = last_batch or (batch_idx + 1) % ep.accum == 0
        update_idx = batch_idx // ep.accum
        steps_in_update = ep.steps_in_update(batch_idx)
        input, target = _prepared_batch(run, input, target, run.loaders.mixup_fn)
        ep.data_time.update(steps_in_update * (time.time() - data_start))
        batch_size = input['patches'].shape[0] if run.loaders.naflex else input.shape[0]
        scale = _batch_loss_scale(run, batch_size)

        with suppress() if need_update or not defer_sync else task.no_sync():
            with run.precision.autocast():
                result = task(input, target)
            values = run.nonfinite.check(result, epoch, batch_idx, args)
            if values is not None:  # a skipped step has no backward
                loss = result['loss'] / steps_in_update if steps_in_update > 1 else result['loss']
                _backward(run, loss * scale if scale != 1.0 else loss, second_order, need_update and not skip_update)
        if values is None:
            skip_update = True
        else:
            ep.loss.update(values[0], batch_size)
            if values[1] is not None:
                ep.drloc.update(values[1], batch_size)
        ep.samples += batch_size * args.world_size if args.distributed else batch_size
        if not need_update:
            data_start = time.time()
            continue

        num_updates += 1
        optimizer.zero_grad()  # also drops the gradients of a skipped update
        skip_update = False
        task.update_ema(step=num_updates)
        if args.synchronize_step and run.device.type in ('cuda', 'npu'):
            getattr(torch, run.device.type).synchronize()
        now = time.time()
        ep.update_time.update(now - update_start)
        update_start = now
        _log_update(run, ep, batch_idx, update_idx, last_batch, input)
        if args.recovery_interval and (update_idx + 1) % args.recovery_interval == 0:
            _weights_finite_or_stop(trainable, epoch, f'before the recovery checkpoint of step {update_idx}')
            if run.saver is not None:
                run.saver.save_recovery(epoch, batch_idx=update_idx)
        if run.lr_scheduler is not None:
            run.lr_scheduler.step_update(num_updates=num_updates, metric=ep.loss.avg)
        ep.samples = 0
        data_start = time.time()

    ep.progress.close()
    if run.nonfinite.skipped and utils.is_primary(args):
        _logger.warning(f'Epoch {epoch}: {run.nonfinite.skipped} of {ep.num_batches} steps skipped for a non-finite '
                        f'loss')
    if hasattr(optimizer, 'sync_lookahead'):
        optimizer.sync_lookahead()
    metrics = OrderedDict(loss=ep.loss.avg if ep.loss.count else math.nan)  # nan: every step was skipped
    if ep.drloc.count or args.drloc_lambda > 0:
        metrics['drloc_loss'] = ep.drloc.avg if ep.drloc.count else math.nan
    if args.distributed:
        metrics = OrderedDict(zip(metrics.keys(), _mean_over_ranks(list(metrics.values()), args, run.device)))
    return metrics


def _mixup_off(run: TrainingRun, epoch: int) -> None:
    """--mixup-off-epoch: from that epoch on, the batches are no longer mixed."""
    off = run.args.mixup_off_epoch
    if not off or epoch < off:
        return
    if run.args.prefetcher and getattr(run.loaders.train, 'mixup_enabled', False):
        run.loaders.train.mixup_enabled = False
    elif run.loaders.mixup_fn is not None:
        run.loaders.mixup_fn.mixup_enabled = False


def _prepared_batch(run: TrainingRun, input, target: torch.Tensor, mixup_fn: Optional[Callable] = None):
    """A loader batch as the model takes it. Without timm's prefetcher the batch is moved to the device (images
    in the model's dtype) and mixed by `mixup_fn`; --aug-splits batches, a list of (B, C, H, W) tensors, one per
    split, are joined first, split after split, the targets repeated, as the prefetcher joins them (and as the
    JSD loss splits them). Channels-last when asked."""
    if not run.args.prefetcher:
        if isinstance(input, (list, tuple)):
            input, target = torch.cat(input), torch.cat([target] * len(input))
        input = input.to(device=run.device, dtype=run.precision.model_dtype)
        target = target.to(device=run.device)
        if mixup_fn is not None:
            input, target = mixup_fn(input, target)
    if run.args.channels_last:
        input = input.contiguous(memory_format=torch.channels_last)
    return input, target


def _backward(run: TrainingRun, loss: torch.Tensor, second_order: bool, update: bool) -> None:
    """Backward, then (on an update step) clip and step, through the AMP loss scaler when there is one."""
    args, scaler = run.args, run.precision.loss_scaler
    clip_parameters = None
    if args.clip_grad is not None:
        clip_parameters = run.task.get_clip_parameters(exclude_head='agc' in args.clip_mode)
    if scaler is not None:
        scaler(loss, run.optimizer, clip_grad=args.clip_grad, clip_mode=args.clip_mode, parameters=clip_parameters,
               create_graph=second_order, need_update=update)
        return
    loss.backward(create_graph=second_order)
    if update:
        if args.clip_grad is not None:
            utils.dispatch_clip_grad(clip_parameters, value=args.clip_grad, mode=args.clip_mode)
        run.optimizer.step()


def _batch_loss_scale(run: TrainingRun, batch_size: int) -> float:
    """Loss multiplier for variable batch sizes (NaFlex / scheduled resolution); 1 otherwise."""
    args, loaders = run.args, run.loaders
    if not (loaders.naflex or loaders.scheduled_batches):
        return 1.0
    mode = args.naflex_loss_scale if loaders.naflex else args.variable_batch_loss_scale
    scale = 1.0
    if mode and mode != 'none':
        scale = batch_size / loaders.batch_size_reference
        if mode == 'sqrt':
            scale = scale ** 0.5
    if loaders.naflex and args.distributed:  # ranks may hold different batch sizes
        total = utils.reduce_tensor(torch.tensor(batch_size, device=run.device, dtype=torch.float32), 1)
        scale *= (args.world_size * batch_size / total).item()
    return scale


def _log_update(run: TrainingRun, ep: _Epoch, batch_idx: int, update_idx: int, last_batch: bool, input) -> None:
    """The progress bar or log line of an update (means over ranks), and --save-images."""
    args = run.args
    lr = _mean_lr(run.optimizer)
    log_step = update_idx % args.log_interval == 0 or last_batch
    loss_now, loss_avg, drloc_now, drloc_avg = ep.loss.val, ep.loss.avg, ep.drloc.val, ep.drloc.avg
    if log_step and args.distributed:  # every rank keeps its own meters: log the mean over ranks
        loss_now, loss_avg, drloc_now, drloc_avg = _mean_over_ranks(
            [loss_now, loss_avg, drloc_now, drloc_avg], args, run.device)
    rate = ep.samples / max(ep.update_time.val, 1e-9)
    values = OrderedDict(loss=loss_now, lr=lr, img_s=rate)
    if ep.drloc.count:
        values['drloc'] = drloc_now
    ep.progress.update(update_idx, last_batch, values, lambda: (
        f'Train: {ep.epoch} [{update_idx:>4d}/{ep.num_updates} ({100. * (update_idx + 1) / ep.num_updates:>3.0f}%)]  '
        f'Loss: {loss_now:#.3g} ({loss_avg:#.3g})  '
        + (f'DRLoc: {drloc_now:#.3g} ({drloc_avg:#.3g}) x {run.task.drloc_lambda:g}  ' if ep.drloc.count else '')
        + f'Time: {ep.update_time.val:.3f}s, {rate:>7.2f}/s  LR: {lr:.3e}  '
        f'Data: {ep.data_time.val:.3f} ({ep.data_time.avg:.3f})'))
    if log_step and args.save_images and run.output_dir and utils.is_primary(args) and not run.loaders.naflex:
        import torchvision.utils
        torchvision.utils.save_image(input, os.path.join(run.output_dir, f'train-batch-{batch_idx}.jpg'),
                                     padding=0, normalize=True)


def _mean_over_ranks(values: List[float], args: argparse.Namespace, device: torch.device) -> List[float]:
    """Mean of each value over the ranks (collective: every rank must call it)."""
    tensor = torch.tensor(values, device=device, dtype=torch.float32)
    return utils.reduce_tensor(tensor, args.world_size).tolist()


# ---------------------------------------------------------------------------------------------------------
# evaluation

def validate(run: TrainingRun, model: nn.Module, log_suffix: str = '') -> 'OrderedDict[str, float]':
    """The evaluator's metrics of `model` over the eval split (loss, top-1, top-5; or loss, mAP and F1 scores
    with --task multilabel, for every task including DRLoc), percent, exact over ranks (padding dropped)."""
    args, loader = run.args, run.loaders.eval
    limit = evaluation_sample_limit(loader)
    if args.task == 'multilabel':  # its own unsmoothed BCE on the binary targets
        evaluator = MultiLabelClassificationEvaluator(run.device, max_samples=limit)
    else:
        evaluator = run.task.create_evaluator(max_samples=limit)
        evaluator.criterion = run.eval_loss_fn
    model.eval()
    last_idx = len(loader) - 1
    start = time.time()
    with torch.inference_mode():
        for batch_idx, (input, target) in enumerate(loader):
            input, target = _prepared_batch(run, input, target)
            with run.precision.autocast():
                logits = model(input)
            logits = logits[0] if isinstance(logits, (tuple, list)) else logits
            if args.tta > 1:  # average the augmented copies of each image
                logits = logits.unfold(0, args.tta, args.tta).mean(dim=2)
                target = target[0:target.size(0):args.tta]
            evaluator.update(logits.float(), target)
            if utils.is_primary(args) and (batch_idx == last_idx or batch_idx % args.log_interval == 0):
                running = '  '.join(f'{k}: {v:.3f}' for k, v in evaluator.summary().items())
                _logger.info(f'Test{log_suffix}: [{batch_idx:>4d}/{last_idx}]  Time: {time.time() - start:.3f}s  '
                             f'{running}')
    metrics = evaluator.compute(distributed=args.distributed)
    metrics = OrderedDict((k, metrics[k]) for k in evaluator.metric_names)
    if utils.is_primary(args):
        _logger.info(f'Eval{log_suffix}: ' + '  '.join(f'{k} {v:.4f}' for k, v in metrics.items()))
    return metrics
