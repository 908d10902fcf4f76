"""What a run is built from, each piece from timm: the device, the model, how a step computes, the loss, the
training task (DRLocTask when --drloc-lambda > 0), the datasets and their loaders.

Errors a flag could not reveal before the model or the data exist (a model without a grid, data with other
classes) are ConfigErrors in the command line's terms, raised here before any training step.
"""
import argparse
import logging
import os
from contextlib import suppress
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, ContextManager, Dict, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from PIL import ImageMode
from timm import utils
from timm.data import AugMixDataset, FastCollateMixup, Mixup, MultiLabelTarget, create_dataset, create_loader
from timm.layers import convert_splitbn_model, convert_sync_batchnorm, set_fast_norm
from timm.loss import create_classification_loss, load_class_stats, resolve_class_weights
from timm.models import load_checkpoint, safe_model_name
from timm.task import (
    ClassificationTask, FeatureDistillationTask, LogitDistillationTask, MultiLabelClassificationTask,
    TokenDistillationTask, TrainingTask)
from timm.utils import NativeScaler

from timm_drloc.checkpoint import create_model_args
from timm_drloc.data import (
    check_first_images, check_same_classes, holds_images, name_unreadable_images, split_folder)
from timm_drloc.errors import (
    ConfigError, GridError, GridTooSmallError, ProbeError, SingleScaleError, first_lines)
from timm_drloc.head import HeadTooLargeError, check_head_memory, memory_text
from timm_drloc.settings import drloc_kwargs, drloc_lambda_for_epoch
from timm_drloc.task import DRLocTask

from .checkpoints import checkpoint_misfit

_logger = logging.getLogger('train_drloc')


def init_device(args: argparse.Namespace) -> torch.device:
    """The process's device, with torch.distributed started under torchrun (timm's init_distributed_device sets
    args.distributed, rank, world_size), the seed of this rank, and timm's backend switches."""
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    device = utils.init_distributed_device(args)
    if args.distributed:
        _logger.info(f'Distributed training: process {args.rank} of {args.world_size}, device {args.device}.')
    else:
        _logger.info(f'Training with a single process on {args.device}.')
    if args.model_dtype == 'float16':
        _logger.warning('float16 weights train poorly; prefer --model-dtype bfloat16 or --amp')
    utils.random_seed(args.seed, args.rank)
    if args.fuser:
        utils.set_jit_fuser(args.fuser)
    if args.fast_norm:
        set_fast_norm()
    return device


# ---------------------------------------------------------------------------------------------------------
# the model, and how a step computes

# create_model keywords that the run sets from flags of its own, and those flags (build_model)
MODEL_FLAG_KEYWORDS = {
    'num_classes': '--num-classes', 'global_pool': '--gp', 'drop_rate': '--drop', 'drop_path_rate': '--drop-path',
    'drop_block_rate': '--drop-block', 'bn_momentum': '--bn-momentum', 'bn_eps': '--bn-eps',
    'pretrained': '--pretrained', 'scriptable': '--torchscript', 'pretrained_cfg_overlay': '--pretrained-cfg-overlay',
}
# those that only reach create_model when given, and that not every model takes
_OPTIONAL_MODEL_KEYWORDS = ('global_pool', 'drop_path_rate', 'drop_block_rate', 'bn_momentum', 'bn_eps')


def build_model(args: argparse.Namespace, create_model: Callable[..., nn.Module]) -> nn.Module:
    """The timm model of the model flags, built by `create_model` (the caller passes timm's, or a stand-in).

    As in timm 1.0.31, the input flags (--in-chans, --input-size, --img-size) and the pretrained config
    (file=--pretrained-path with num_classes=-1 to adapt the classifier, then --pretrained-cfg-overlay) are
    resolved by timm's `resolve_model_input_args` into the `pretrained_cfg` and keywords given to create_model.
    Sets args.num_classes to the model's when it was not given.
    """
    overlay = dict(file=args.pretrained_path, num_classes=-1) if args.pretrained_path else {}
    overlay.update(args.pretrained_cfg_overlay)
    flags = dict(num_classes=args.num_classes, global_pool=args.gp, drop_rate=args.drop, drop_path_rate=args.drop_path,
                 drop_block_rate=args.drop_block, bn_momentum=args.bn_momentum, bn_eps=args.bn_eps)
    model_args = create_model_args(args.model, vars(args), pretrained_cfg_overlay=overlay or None, **flags,
                                   **args.model_kwargs)
    try:
        model = create_model(**model_args, pretrained=args.pretrained, scriptable=args.torchscript)
    except TypeError as e:  # a keyword the model's class does not take (timm's script shows the traceback)
        optional = ', '.join(f'{flag} sets {key}' for key, flag in MODEL_FLAG_KEYWORDS.items()
                             if key in _OPTIONAL_MODEL_KEYWORDS)
        raise ConfigError(f'--model {args.model} cannot be built with the arguments given ({e}); drop that keyword '
                          f'from --model-kwargs, or the flag that sets it ({optional})') from e
    except OSError as e:  # --pretrained: the weights are neither cached nor downloadable (offline), or not readable
        raise ConfigError(f'--model {args.model} --pretrained: cannot load {_pretrained_weights(args)} '
                          f'({first_lines(e)}); give --pretrained-path a weights file, or run where the weights can '
                          f'be downloaded or are in the Hugging Face cache') from e
    except RuntimeError as e:  # pretrained weights of another architecture or size
        if not args.pretrained:
            raise
        raise ConfigError(f'--model {args.model} --pretrained: {_pretrained_weights(args)} do not fit the model '
                          f'({first_lines(e, 2)}); give weights of this architecture, or --model-kwargs that build '
                          f'the model they were trained as') from e
    if args.initial_checkpoint:  # as create_model(checkpoint_path=...) would, with a misfit named
        try:
            load_checkpoint(model, args.initial_checkpoint)
        except (RuntimeError, ValueError, KeyError, NotImplementedError) as e:
            raise checkpoint_misfit('--initial-checkpoint', args.initial_checkpoint, e) from e
    classifier = model.get_classifier() if args.head_init_scale is not None or args.head_init_bias is not None else None
    if args.head_init_scale is not None:
        with torch.no_grad():
            classifier.weight.mul_(args.head_init_scale)
            classifier.bias.mul_(args.head_init_scale)
    if args.head_init_bias is not None:
        nn.init.constant_(classifier.bias, args.head_init_bias)
    if args.num_classes is None:
        if not hasattr(model, 'num_classes'):
            raise ConfigError(f'{args.model} has no num_classes attribute; give --num-classes')
        args.num_classes = model.num_classes
    if args.grad_checkpointing:
        model.set_grad_checkpointing(enable=True)
    if utils.is_primary(args):
        _logger.info(f'Model {safe_model_name(args.model)} created, param count: '
                     f'{sum(p.numel() for p in model.parameters())}')
    return model


def _pretrained_weights(args: argparse.Namespace) -> str:
    """The weights --pretrained loads, in words."""
    return f'--pretrained-path {args.pretrained_path}' if args.pretrained_path else 'its pretrained weights'


def place_model(args: argparse.Namespace, model: nn.Module, device: torch.device,
                model_dtype: Optional[torch.dtype]) -> Tuple[nn.Module, Optional[Tuple[int, int]]]:
    """Split / sync BatchNorm, device, dtype, memory format and TorchScript; also the NaFlex patch size."""
    if args.split_bn:
        model = convert_splitbn_model(model, max(args.aug_splits, 2))
    model.to(device=device, dtype=model_dtype)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    if args.distributed and args.sync_bn:
        args.dist_bn = ''  # synchronized BN needs no statistics sharing after the epoch
        if args.split_bn:
            raise ConfigError('--sync-bn and --split-bn cannot be combined; choose one')
        model = convert_sync_batchnorm(model)
        if utils.is_primary(args):
            _logger.info('Converted BatchNorm to SyncBatchNorm (zero-initialized BN layers may misbehave with it).')
    elif args.sync_bn and utils.is_primary(args):
        _logger.info('--sync-bn has no effect in a single process run')
    patch_size = model.get_patch_size() if args.naflex_loader and hasattr(model, 'get_patch_size') else None
    if args.torchscript:
        model = torch.jit.script(model)
    return model, patch_size


@dataclass
class Precision:
    """How a step computes.

    Args:
        autocast: a new autocast context for each forward (--amp), or a no-op one.
        loss_scaler: timm's loss scaler under float16 autocast, else None.
        model_dtype: the weights' dtype (--model-dtype), None for float32.
    """
    autocast: Callable[[], ContextManager]
    loss_scaler: Optional[NativeScaler]
    model_dtype: Optional[torch.dtype]


def step_precision(args: argparse.Namespace, device: torch.device) -> Precision:
    """The Precision of the --amp / --amp-dtype / --model-dtype flags."""
    model_dtype = getattr(torch, args.model_dtype) if args.model_dtype else None
    if not args.amp:
        if utils.is_primary(args):
            _logger.info(f'AMP off, training in {model_dtype or torch.float32}.')
        return Precision(suppress, None, model_dtype)
    amp_dtype = torch.bfloat16 if args.amp_dtype == 'bfloat16' else torch.float16
    # float16 gradients underflow on the CPU as on CUDA, and torch's GradScaler works on both (timm's train.py
    # scales on CUDA only); bfloat16 has float32's range and needs no scaler
    scaled = amp_dtype == torch.float16 and device.type in ('cuda', 'cpu')
    if utils.is_primary(args):
        _logger.info(f'Mixed precision training with torch.autocast ({amp_dtype}).')
    return Precision(partial(torch.autocast, device_type=device.type, dtype=amp_dtype),
                     NativeScaler(device=device.type) if scaled else None, model_dtype)


# ---------------------------------------------------------------------------------------------------------
# the loss and the training task

def mixup_active(args: argparse.Namespace) -> bool:
    """Whether mixup / cutmix turn the targets into soft targets."""
    return args.mixup > 0 or args.cutmix > 0. or args.cutmix_minmax is not None


def train_loss(args: argparse.Namespace, num_classes: Optional[int] = None, verbose: bool = False) -> nn.Module:
    """The training criterion of the loss flags, from timm's create_classification_loss.

    Weights given as method names are computed from --class-stats; with `num_classes`, per-class weights
    must have one entry per class. Raises ValueError (or OSError for an unreadable file) naming the flag.
    """
    multi_label = args.task == 'multilabel'
    loss_type = args.loss or ('bce' if multi_label else 'ce')
    soft_targets = mixup_active(args)
    smoothing = args.smoothing
    if loss_type in ('twoway', 'zlpr') and smoothing and not soft_targets:
        if verbose:
            _logger.warning(f'--smoothing {smoothing} does not apply to --loss {loss_type}, which needs binary '
                            f'targets; training without label smoothing')
        smoothing = 0.
    stats = load_class_stats(args.class_stats)
    weights = {}
    for kind, flag, value in (('pos_weight', '--loss-pos-weight', args.loss_pos_weight),
                              ('class_weight', '--loss-class-weight', args.loss_class_weight)):
        try:
            weights[kind] = resolve_class_weights(value, kind, stats, power=args.loss_weight_power)
        except ValueError as e:
            raise ValueError(f'{flag} {value}: {e}') from e
        if num_classes is not None and isinstance(weights[kind], torch.Tensor) and \
                weights[kind].numel() != num_classes:
            raise ValueError(f'{flag} {value} has {weights[kind].numel()} entries but the model has {num_classes} '
                             f'classes; give one weight per class, or a single value')
    db = dict(class_counts=stats[0], num_samples=stats[1]) if loss_type == 'db' and stats is not None else {}
    return create_classification_loss(
        loss_type, multi_label=multi_label, smoothing=smoothing, soft_targets=soft_targets,
        class_weight=weights['class_weight'], pos_weight=weights['pos_weight'],
        bce_target_thresh=args.bce_target_thresh, bce_sum=args.bce_sum, poly_epsilon=args.poly_epsilon,
        poly_gamma=args.poly_gamma, jsd_splits=max(args.aug_splits, 0), **db)


def build_task(args: argparse.Namespace, model: nn.Module, criterion: nn.Module, input_size: Sequence[int],
               device: torch.device, model_dtype: Optional[torch.dtype]) -> TrainingTask:
    """The training task: timm's ClassificationTask (MultiLabelClassificationTask with --task multilabel) or, with
    --kd-model-name, its distillation task; with --drloc-lambda > 0 DRLoc is added to it (DRLocTask, alone or over
    the distillation task). The grid probe runs now, before any data is read."""
    verbose = utils.is_primary(args)
    settings = drloc_kwargs(args)
    distillation = _distillation_task(args, model, criterion, device, model_dtype, verbose) \
        if args.kd_model_name is not None else None
    if settings is None:
        if distillation is not None:
            return distillation
        task_cls = MultiLabelClassificationTask if args.task == 'multilabel' else ClassificationTask
        return task_cls(model=model, criterion=criterion, device=device, dtype=model_dtype, verbose=verbose)
    task_kwargs = dict(base_task=distillation) if distillation is not None else dict(criterion=criterion)
    try:
        task = DRLocTask(model, input_size=tuple(input_size), device=device, dtype=model_dtype, verbose=verbose,
                         **task_kwargs, **settings)
        grids = [(s.num_chs, s.grid_size) for s in task.get_trainable_module().sources]
        check_head_memory(grids, settings['hidden_dim'], settings['num_samples'], settings['mode'], settings['use_abs'],
                          device, batch_size=args.batch_size)  # wrap() checked one image, this is the batch
    except HeadTooLargeError as e:
        raise _head_memory_error(args, e) from e
    except GridError as e:
        raise _grid_error(args, e, input_size) from e
    except ConfigError as e:
        if distillation is None:
            raise
        raise ConfigError(f'--drloc-lambda over --kd-model-name {args.kd_model_name} --kd-distill-type '
                          f'{args.kd_distill_type}: {e}') from e
    return task


def _distillation_task(args: argparse.Namespace, model: nn.Module, criterion: nn.Module, device: torch.device,
                       model_dtype: Optional[torch.dtype], verbose: bool) -> TrainingTask:
    """timm's distillation task of --kd-distill-type, with the teacher --kd-model-name names (any timm model name,
    with its pretrained weights, or `local-dir:PATH`, a folder in timm's Hub format such as `timm-drloc export`
    writes)."""
    common = dict(student_model=model, teacher_model=args.kd_model_name, criterion=criterion,
                  distill_loss_weight=args.distill_loss_weight, task_loss_weight=args.task_loss_weight,
                  device=device, dtype=model_dtype, verbose=verbose)
    try:
        if args.kd_distill_type == 'logit':
            return LogitDistillationTask(loss_type=args.kd_loss_type, temperature=args.kd_temperature, **common)
        if args.kd_distill_type == 'feature':
            return FeatureDistillationTask(student_feature_dim=args.kd_student_feature_dim,
                                           teacher_feature_dim=args.kd_teacher_feature_dim, **common)
        return TokenDistillationTask(distill_type=args.kd_token_distill_type, temperature=args.kd_temperature,
                                     **common)
    except ValueError as e:  # timm's refusals: a student without a distillation token, a loss type it lacks
        raise ConfigError(f'--kd-distill-type {args.kd_distill_type} with --model {args.model}: {e}') from e
    except OSError as e:  # no such local-dir folder; pretrained weights neither cached nor downloadable
        raise ConfigError(f'--kd-model-name {args.kd_model_name}: cannot load the teacher '
                          f'({first_lines(e)}); give a model whose pretrained weights can be downloaded or '
                          f'are in the Hugging Face cache, or local-dir:FOLDER, a folder in timm\'s Hub format (what '
                          f'timm-drloc export writes)') from e


# what the command line does instead of the API fix each grid error names
_GRID_FIXES = (
    (ProbeError, 'models with a fixed input size need it at creation, e.g. --model-kwargs img_size={size}'),
    (SingleScaleError, 'drop --drloc-multiscale, or name the grids with --drloc-layers PATH [PATH ...] instead'),
    (GridTooSmallError, 'a larger --img-size with --model-kwargs img_size=..., or --drloc-layers'),
    (GridError, '--drloc-layers PATH [PATH ...]'),  # GridNotFoundError, and any other
)


def _grid_error(args: argparse.Namespace, error: GridError, input_size: Sequence[int]) -> ConfigError:
    """A GridError in the command line's terms: the library's message, then the flags that fix it."""
    fix = next(text for cls, text in _GRID_FIXES if isinstance(error, cls))
    return ConfigError(f'cannot add DRLoc to {args.model}: {error} (on the command line: '
                       f'{fix.format(size=input_size[-1])})')


def _head_memory_error(args: argparse.Namespace, error: HeadTooLargeError) -> ConfigError:
    """A HeadTooLargeError in the command line's terms: the flags that size the heads, and the numbers."""
    return ConfigError(
        f'--drloc-hidden-dim {args.drloc_hidden_dim} and --drloc-samples {args.drloc_samples}: the DRLoc heads would '
        f'need about {memory_text(error.memory.total)} at {error.batch_size} image(s) per step '
        f'({memory_text(error.memory.weights)} of weights, gradients and optimizer state, '
        f'{memory_text(error.memory.activations)} of activations), more than the {memory_text(error.available)} '
        f'of the {error.device.type} device; lower them (the reference uses --drloc-hidden-dim 512 '
        f'--drloc-samples 64)')


def warn_unreached_lambda(args: argparse.Namespace, num_epochs: int) -> None:
    """Warn at start when the warm-up is as long as the schedule, so lambda never reaches --drloc-lambda (the
    per-epoch value is in summary.csv's drloc_lambda column, and the model card states the value reached)."""
    if args.drloc_lambda <= 0 or args.drloc_warmup_epochs < num_epochs:
        return
    reached = max(drloc_lambda_for_epoch(args, epoch, num_epochs) for epoch in range(num_epochs))
    _logger.warning(f'--drloc-warmup-epochs {args.drloc_warmup_epochs} is not shorter than the {num_epochs}-epoch '
                    f'schedule: lambda only ramps up to {reached:g}, never the asked --drloc-lambda '
                    f'{args.drloc_lambda:g}; use fewer warm-up epochs (or more --epochs)')


# ---------------------------------------------------------------------------------------------------------
# data

def is_folder_dataset(args: argparse.Namespace) -> bool:
    """No --dataset type (an image folder or tar), or an explicit folder/ one."""
    return not args.dataset or args.dataset.lower().startswith(('folder/', 'imagefolder/', 'tar/'))


def split_folders(args: argparse.Namespace) -> Tuple[str, Optional[str]]:
    """The folders of the train and eval splits of a folder dataset (eval None without --val-split)."""
    train_dir = split_folder(args.data_dir, args.train_split, '--train-split', args.val_split)
    val_dir = split_folder(args.data_dir, args.val_split, '--val-split', args.train_split) if args.val_split else None
    return train_dir, val_dir


def _image_mode(args: argparse.Namespace, input_channels: int) -> str:
    """The PIL mode images are read in: --input-img-mode, else timm's choice (RGB for 3 channels, else L). Its
    channels must be the model's (an RGB image in a 4-channel model's batch fails mid-epoch in the loader)."""
    mode = args.input_img_mode or ('RGB' if input_channels == 3 else 'L')
    try:
        channels = len(ImageMode.getmode(mode).bands)
    except KeyError:
        raise ConfigError(f'--input-img-mode {mode} is not a PIL image mode; use L, RGB or RGBA, for example') from None
    if channels != input_channels:
        read = (f'--input-img-mode {mode} reads' if args.input_img_mode else
                f"timm's default mode for a {input_channels}-channel model, {mode}, reads")
        fit = {1: 'L', 3: 'RGB', 4: 'RGBA'}.get(input_channels, f'a mode with {input_channels} channels')
        raise ConfigError(f'{read} images with {channels} channel(s), but the model takes {input_channels}; pass '
                          f'--input-img-mode {fit}')
    return mode


def build_datasets(args: argparse.Namespace, input_channels: int):
    """The train and eval datasets (eval is None without --val-split); folder datasets name the images they skip,
    and must hold the same classes in both splits and at least two."""
    if is_folder_dataset(args) and not args.data_dir:
        raise ConfigError('no dataset given: pass the dataset root folder as --data-dir DIR (or positionally)')
    image_mode = _image_mode(args, input_channels)
    common = dict(root=args.data_dir, class_map=args.class_map, download=args.dataset_download,
                  batch_size=args.batch_size, input_img_mode=image_mode, input_key=args.input_key,
                  target_key=args.target_key, target_format=args.target_format,
                  trust_remote_code=args.dataset_trust_remote_code)
    if args.task == 'multilabel':  # positive class indices (or a multi-hot row) -> float (num_classes,)
        common['target_transform'] = MultiLabelTarget(args.num_classes, dense=args.target_format == 'multihot')
    try:
        dataset_train = create_dataset(args.dataset, split=args.train_split, is_training=True, seed=args.seed,
                                       repeats=args.epoch_repeats, num_samples=args.train_num_samples, **common)
        dataset_eval = create_dataset(args.dataset, split=args.val_split, is_training=False,
                                      num_samples=args.val_num_samples, **common) if args.val_split else None
    except RuntimeError as e:  # no images in a folder, a dataset not downloaded: say which, and the fix
        folders = split_folders(args) if is_folder_dataset(args) and os.path.isdir(args.data_dir) else ()
        empty = [f for f in folders if f and not holds_images(f)]
        if empty:
            raise ConfigError(f'{empty[0]} holds no images ({e}); an image folder dataset holds <root>/'
                              f'{args.train_split}/<class>/<image> and <root>/{args.val_split}/<class>/<image>') from e
        download = '' if args.dataset_download or is_folder_dataset(args) else (
            '; --dataset-download fetches a dataset that can be downloaded')
        raise ConfigError(f'--dataset {args.dataset or "(image folder)"} --data-dir {args.data_dir}: '
                          f'{first_lines(e)}{download}') from e
    except ImportError as e:  # a reader whose package is not installed (hfds/, hfids/: datasets; wds/: webdataset)
        raise ConfigError(f'--dataset {args.dataset} needs the {e.name} package: pip install {e.name}') from e
    readers = [getattr(d, 'reader', None) for d in (dataset_train, dataset_eval)]
    classes = [getattr(r, 'class_to_idx', None) for r in readers]
    if classes[0] and classes[1]:
        check_same_classes(classes[0], classes[1], readers[0].root, readers[1].root)
    for dataset in (dataset_train, dataset_eval):
        if name_unreadable_images(dataset):
            check_first_images(dataset, dataset.reader.root)
    _check_num_classes(args, classes[0])
    return dataset_train, dataset_eval


def _check_num_classes(args: argparse.Namespace, class_to_idx: Optional[Dict[str, int]]) -> None:
    """The data's classes must fit the classifier; a mismatch would fail (or mislead) mid-epoch."""
    if not class_to_idx:
        return
    if len(class_to_idx) < 2:
        raise ConfigError(f'{args.data_dir} has {len(class_to_idx)} class in {args.train_split}/ '
                          f'({", ".join(map(repr, class_to_idx))}: timm names a class after the folder that holds '
                          f'its images, nested folders of the same name are one class); classification needs at '
                          f'least 2')
    if args.num_classes is not None and len(class_to_idx) > args.num_classes:
        raise ConfigError(f'the data has {len(class_to_idx)} classes but the model has {args.num_classes} outputs; '
                          f'pass --num-classes {len(class_to_idx)}')
    if args.num_classes is not None and len(class_to_idx) < args.num_classes and utils.is_primary(args):
        _logger.warning(f'the model has {args.num_classes} outputs but the data only {len(class_to_idx)} classes; '
                        f'pass --num-classes {len(class_to_idx)} unless the extra outputs are intended')


@dataclass
class Loaders:
    """The run's data, as its steps read it.

    Args:
        train: the training loader (timm's standard, scheduled-resolution or NaFlex loader).
        eval: the eval loader, None without --val-split.
        mixup_fn: mixup / cutmix applied on the host (without the prefetcher), else None.
        naflex: batches are NaFlex dicts of patches.
        scheduled_batches: --train-img-sizes: batch sizes vary from step to step.
        batch_size_reference: the batch size the loss scale of varying batches and the lr scaling refer to.
    """
    train: Any
    eval: Optional[Any]
    mixup_fn: Optional[Callable] = None
    naflex: bool = False
    scheduled_batches: bool = False
    batch_size_reference: float = 0.


def build_loaders(args: argparse.Namespace, data_config: Dict[str, Any], dataset_train, dataset_eval,
                  device: torch.device, model_dtype: Optional[torch.dtype],
                  patch_size: Optional[Tuple[int, int]]) -> Loaders:
    """Train and eval loaders (standard, scheduled-resolution or NaFlex) with timm's transforms, and mixup."""
    splits = max(args.aug_splits, 0)
    mixup = None
    if mixup_active(args):
        mixup = dict(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
                     prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                     label_smoothing=args.smoothing, num_classes=args.num_classes,
                     multi_label=args.task == 'multilabel')
    shared = dict(mean=data_config['mean'], std=data_config['std'], pin_memory=args.pin_mem,
                  img_dtype=model_dtype or torch.float32, device=device, distributed=args.distributed,
                  use_prefetcher=args.prefetcher)
    interpolation = data_config['interpolation'] if args.no_aug or not args.train_interpolation \
        else args.train_interpolation
    augment = dict(
        batch_size=args.batch_size, is_training=True, no_aug=args.no_aug, re_prob=args.reprob, re_mode=args.remode,
        re_count=args.recount, re_split=args.resplit, train_crop_mode=args.train_crop_mode, scale=args.scale,
        ratio=args.ratio, hflip=args.hflip, vflip=args.vflip, color_jitter=args.color_jitter,
        color_jitter_prob=args.color_jitter_prob, grayscale_prob=args.grayscale_prob,
        gaussian_blur_prob=args.gaussian_blur_prob, auto_augment=args.aa, num_aug_repeats=args.aug_repeats,
        num_aug_splits=splits, interpolation=interpolation, num_workers=args.workers,
        worker_seeding=args.worker_seeding)
    eval_workers = args.workers
    if args.distributed and ('tfds' in args.dataset or 'wds' in args.dataset):
        eval_workers = min(2, args.workers)  # fewer workers pad less for sharded iterable datasets
    eval_kwargs = dict(batch_size=args.validation_batch_size or args.batch_size, is_training=False,
                       interpolation=data_config['interpolation'], crop_pct=data_config['crop_pct'],
                       num_workers=eval_workers)
    if args.naflex_loader:
        return _naflex_loaders(args, dataset_train, dataset_eval, mixup, patch_size, shared, augment, eval_kwargs)
    loaders = Loaders(None, None, scheduled_batches=args.train_img_sizes is not None,
                      batch_size_reference=float(args.batch_size))
    collate_fn = None
    if mixup is not None and args.prefetcher:  # mixed on the device, in the prefetcher's collate
        collate_fn = FastCollateMixup(**mixup)
    elif mixup is not None:
        loaders.mixup_fn = Mixup(**mixup)
    loaders.train = create_loader(
        AugMixDataset(dataset_train, num_splits=splits) if splits > 1 else dataset_train,
        input_size=data_config['input_size'], input_size_choices=args.train_img_sizes,
        batch_size_choices=args.train_batch_sizes, batch_choice_weights=args.train_size_probs,
        batch_choice_seed=args.seed, batch_choice_schedule=args.train_size_schedule,
        batch_schedule_epochs=args.epochs if args.train_size_schedule == 'progressive' else None,
        batch_schedule_spread=args.train_size_schedule_spread, batch_schedule_random_mix=args.train_size_random_mix,
        num_batches=args.train_batches_per_epoch, collate_fn=collate_fn,
        use_multi_epochs_loader=args.use_multi_epochs_loader, **shared, **augment)
    if loaders.scheduled_batches:
        sampler = loaders.train.batch_sampler
        loaders.batch_size_reference = sampler.average_batch_size
        if utils.is_primary(args):
            _logger.info(f'Scheduled resolutions {args.train_img_sizes}, batch sizes {sampler.batch_sizes}, average '
                         f'batch {loaders.batch_size_reference:.2f}.')
    if args.val_split and dataset_eval is not None:
        loaders.eval = create_loader(dataset_eval, input_size=data_config['input_size'], **shared, **eval_kwargs)
    return loaders


def _naflex_loaders(args: argparse.Namespace, dataset_train, dataset_eval, mixup: Optional[Dict[str, Any]],
                    patch_size: Optional[Tuple[int, int]], shared: Dict[str, Any], augment: Dict[str, Any],
                    eval_kwargs: Dict[str, Any]) -> Loaders:
    """timm's NaFlex loaders: variable-resolution patch sequences for NaFlex models."""
    from timm.data import NaFlexMixup, create_naflex_loader
    if patch_size is None:
        patch_size = (16, 16)
        _logger.warning(f'{args.model} does not report its patch size; NaFlex uses {patch_size}')
    patches = dict(patch_size=patch_size)
    if args.naflex_patch_sizes:
        patches = dict(patch_size_choices=args.naflex_patch_sizes)
        if args.naflex_patch_size_probs:
            patches['patch_size_choice_probs'] = args.naflex_patch_size_probs
    naflex_mixup = None
    if mixup is not None:
        naflex_mixup = NaFlexMixup(**{k: v for k, v in mixup.items() if k not in ('mode', 'cutmix_minmax')})
    channels_last = not args.naflex_patchify_channels_first
    train = create_naflex_loader(
        dataset=dataset_train, train_seq_lens=args.naflex_train_seq_lens, mixup_fn=naflex_mixup, rank=args.rank,
        world_size=args.world_size, patchify_channels_last=channels_last, **patches, **shared, **augment)
    evaluation = None
    if args.val_split and dataset_eval is not None:
        evaluation = create_naflex_loader(
            dataset=dataset_eval, patch_size=patch_size, max_seq_len=args.naflex_max_seq_len,
            patchify_channels_last=channels_last, **shared, **eval_kwargs)
    return Loaders(train, evaluation, naflex=True, batch_size_reference=float(args.batch_size))


def scaled_lr(args: argparse.Namespace, batch_size_reference: float) -> float:
    """--lr-base scaled from --lr-base-size to the global batch (linear, or sqrt for adaptive optimizers)."""
    global_batch_size = batch_size_reference * args.world_size * args.grad_accum_steps
    ratio = global_batch_size / args.lr_base_size
    if not args.lr_base_scale:
        args.lr_base_scale = 'sqrt' if any(o in args.opt.lower() for o in ('ada', 'lamb')) else 'linear'
    if args.lr_base_scale == 'sqrt':
        ratio = ratio ** 0.5
    lr = args.lr_base * ratio
    if utils.is_primary(args):
        _logger.info(f'Learning rate {lr} from --lr-base {args.lr_base} and global batch {global_batch_size:g} '
                     f'({args.lr_base_scale} scaling).')
    return lr
