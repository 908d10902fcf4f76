"""train_drloc: timm's image classification training with the DRLoc auxiliary loss.

Every flag of timm's `train.py` is accepted with its name, default and meaning, and the run writes the
same output folder (args.yaml, summary.csv, last/checkpoint-N/model_best/milestone-N .pth.tar). The
`--drloc-*` flags add the DRLoc loss; with `--drloc-lambda 0` (the default) the run is timm's plain
classification training. The script is built from timm's library pieces (data, loaders, mixup,
optimizers, schedulers, EMA, AMP scaler, checkpoint saver, distributed helpers, training tasks).

    python train_drloc.py /data --model swin_tiny_patch4_window7_224 --drloc-lambda 0.5
    torchrun --nproc_per_node 2 train_drloc.py --data-dir /data --model vit_small_patch16_224 --drloc-lambda 0.1

Module-level names follow timm's train.py (`parser`, `config_parser`, `_parse_args`, `main`,
`create_model`), so sweeps and tests written for train.py run against this module unchanged.
"""
import argparse
import copy
import csv
import errno
import importlib
import json
import logging
import math
import os
import reprlib
import shutil
import sys
import time
from collections import OrderedDict
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import yaml

from timm import utils
from timm.data import AugMixDataset, FastCollateMixup, Mixup, create_dataset, create_loader, resolve_data_config
from timm.layers import convert_splitbn_model, convert_sync_batchnorm, set_fast_norm
from timm.data import MultiLabelTarget
from timm.data.readers.targets import TARGET_FORMATS
from timm.loss import LOSS_TYPES, create_classification_loss, load_class_stats, resolve_class_weights
from timm.models import create_model, load_checkpoint, load_state_dict, safe_model_name
from timm.optim import create_optimizer_v2, optimizer_kwargs
from timm.scheduler import create_scheduler_v2, scheduler_kwargs
from timm.task import (
    ClassificationTask, FeatureDistillationTask, LogitDistillationTask, MultiLabelClassificationTask,
    TokenDistillationTask, load_task_ema_checkpoint, resume_task_checkpoint,
)
from timm.task.evaluator import ClassificationEvaluator, MultiLabelClassificationEvaluator, evaluation_sample_limit
from timm.utils import NativeScaler
from timm.utils.model import unwrap_model

from timm_drloc.checkpoint import create_model_args, is_weights_only, read_checkpoint
from timm_drloc.data import check_first_images, check_same_classes, holds_images, name_unreadable_images, split_folder
from timm_drloc.errors import (
    CheckpointError, ConfigError, ExitCode, GridError, GridTooSmallError, NonFiniteLossError, ProbeError, SingleScaleError)
from timm_drloc.head import HeadTooLargeError, check_head_memory, memory_text
from timm_drloc.hub import add_push_args, check_push_args, push_after_training
from timm_drloc.summary import SUMMARY_FILE, append_summary
from timm_drloc.settings import add_drloc_args, check_drloc_args, drloc_kwargs, drloc_lambda_for_epoch, ignored_drloc_flags

try:
    import wandb
    has_wandb = True
except ImportError:
    has_wandb = False

try:
    from tqdm import tqdm
    has_tqdm = True
except ImportError:
    has_tqdm = False

_logger = logging.getLogger('train_drloc')

CHECKPOINT_EXT = '.pth.tar'


# ---------------------------------------------------------------------------------------------------------
# Command line: the -c/--config pre-parser, then the main parser (timm train.py flags + --drloc-* flags)
# ---------------------------------------------------------------------------------------------------------

config_parser = argparse.ArgumentParser(description='Training config file', add_help=False)
config_parser.add_argument('-c', '--config', default='', type=str, metavar='FILE',
                           help='YAML file of flag values, used as defaults (command-line flags win)')

parser = argparse.ArgumentParser(description='timm image classification training with the DRLoc auxiliary loss')
parser.add_argument('data', nargs='?', metavar='DIR', const=None,
                    help='dataset root (positional form kept for old commands; prefer --data-dir)')

group = parser.add_argument_group('Dataset parameters')
group.add_argument('--data-dir', metavar='DIR', help='dataset root folder')
group.add_argument('--dataset', metavar='NAME', default='',
                   help='"<type>/<name>" for timm dataset readers; empty = image folder or tar')
group.add_argument('--train-split', metavar='NAME', default='train', help='split used for training')
group.add_argument('--val-split', metavar='NAME', default='validation', help='split used for evaluation')
group.add_argument('--train-num-samples', default=None, type=int, metavar='N',
                   help='train split size, for iterable datasets that cannot tell it')
group.add_argument('--val-num-samples', default=None, type=int, metavar='N',
                   help='validation split size, for iterable datasets that cannot tell it')
group.add_argument('--dataset-download', action='store_true', default=False,
                   help='let torch/ and tfds/ datasets download themselves')
group.add_argument('--class-map', default='', type=str, metavar='FILENAME', help='class name -> index file')
group.add_argument('--input-img-mode', default=None, type=str, help='PIL mode images are converted to')
group.add_argument('--input-key', default=None, type=str, help='record key of the image')
group.add_argument('--target-key', default=None, type=str,
                   help='record key of the label (comma separated keys: one binary field per label)')
group.add_argument('--target-format', default=None, type=str, choices=TARGET_FORMATS,
                   help="how a multi-label record stores its labels: 'indices' (positive class indices, the "
                        "default) or 'multihot' (one 0/1 value per class); needs --task multilabel for multihot")
group.add_argument('--task', default='classification', type=str, choices=('classification', 'multilabel'),
                   help='single-label classification, or independent binary labels (multi-hot targets, sigmoid '
                        'losses, mAP / F1 evaluation)')
group.add_argument('--dataset-trust-remote-code', action='store_true', default=False,
                   help='allow Hugging Face datasets to run the code shipped in their repository')

group = parser.add_argument_group('Model parameters')
group.add_argument('--model', default='resnet50', type=str, metavar='MODEL', help='timm model name')
group.add_argument('--pretrained', action='store_true', default=False, help='start from pretrained weights')
group.add_argument('--pretrained-path', default=None, type=str,
                   help='checkpoint loaded as the pretrained weights (the classifier is adapted)')
group.add_argument('--pretrained-cfg-overlay', nargs='*', default={}, action=utils.ParseKwargs,
                   help='pretrained config entries to replace, key=value (e.g. custom_load=True); applied over '
                        'the file=--pretrained-path entry')
group.add_argument('--initial-checkpoint', default='', type=str, metavar='PATH',
                   help='weights loaded into the model after it is built')
group.add_argument('--resume', default='', type=str, metavar='PATH',
                   help='checkpoint to continue from (model, DRLoc heads, optimizer, epoch); "auto" continues '
                        'in place from last.pth.tar of --experiment')
group.add_argument('--no-resume-opt', action='store_true', default=False,
                   help='on --resume, keep a fresh optimizer and loss scaler')
group.add_argument('--num-classes', type=int, default=None, metavar='N', help='classes (model default if unset)')
group.add_argument('--gp', default=None, type=str, metavar='POOL', help='global pool type (model default if unset)')
group.add_argument('--img-size', type=int, default=None, metavar='N', help='square input size')
group.add_argument('--in-chans', type=int, default=None, metavar='N', help='input channels (default 3)')
group.add_argument('--input-size', default=None, nargs=3, type=int, metavar='N', help='input as C H W')
group.add_argument('--crop-pct', default=None, type=float, metavar='N', help='center crop fraction for eval')
group.add_argument('--mean', type=float, nargs='+', default=None, metavar='MEAN', help='per-channel mean')
group.add_argument('--std', type=float, nargs='+', default=None, metavar='STD', help='per-channel std')
group.add_argument('--interpolation', default='', type=str, metavar='NAME', help='resize interpolation')
group.add_argument('-b', '--batch-size', type=int, default=128, metavar='N', help='train batch size per process')
group.add_argument('-vb', '--validation-batch-size', type=int, default=None, metavar='N',
                   help='eval batch size (default: --batch-size)')
group.add_argument('--channels-last', action='store_true', default=False, help='channels-last memory format')
group.add_argument('--fuser', default='', type=str, help="TorchScript fuser: '', 'te', 'old' or 'nvfuser'")
group.add_argument('--grad-accum-steps', type=int, default=1, metavar='N', help='batches per optimizer update')
group.add_argument('--grad-checkpointing', action='store_true', default=False,
                   help='recompute block activations in backward to save memory')
group.add_argument('--fast-norm', default=False, action='store_true', help="timm's experimental fast norm layers")
group.add_argument('--model-kwargs', nargs='*', default={}, action=utils.ParseKwargs,
                   help='extra create_model arguments, key=value')
group.add_argument('--head-init-scale', default=None, type=float, help='multiply the classifier init by this')
group.add_argument('--head-init-bias', default=None, type=float, help='set the classifier bias to this')
group.add_argument('--torchcompile-mode', type=str, default=None, help='torch.compile mode')
scripting_group = group.add_mutually_exclusive_group()
scripting_group.add_argument('--torchscript', dest='torchscript', action='store_true',
                             help='TorchScript the model (not possible with DRLoc)')
scripting_group.add_argument('--torchcompile', nargs='?', type=str, default=None, const='inductor',
                             help='torch.compile with this backend (inductor when given bare)')

group = parser.add_argument_group('Device parameters')
group.add_argument('--device', default='cuda', type=str, help='device type, e.g. cuda, cpu, npu')
group.add_argument('--amp', action='store_true', default=False, help='automatic mixed precision')
group.add_argument('--amp-dtype', default='float16', type=str, help='AMP dtype: float16 or bfloat16')
group.add_argument('--model-dtype', default=None, type=str, help='model dtype without AMP (default float32)')
group.add_argument('--max-nonfinite-steps', type=int, default=10, metavar='N',
                   help='with the float16 loss scaler of --amp: a step whose loss is NaN / Inf is skipped, as the '
                        'scaler skips one whose gradients overflow, and N such steps in a row stop the run (exit 3); '
                        'without a scaler the first one stops it')
group.add_argument('--no-ddp-bb', action='store_true', default=False, help='DDP without buffer broadcast')
group.add_argument('--synchronize-step', action='store_true', default=False,
                   help='synchronize the device after every step (for timing)')
group.add_argument('--local_rank', default=0, type=int, help='set by old launchers; torchrun uses LOCAL_RANK')
group.add_argument('--device-modules', default=None, type=str, nargs='+',
                   help='modules imported first to register a device backend')

group = parser.add_argument_group('Optimizer parameters')
group.add_argument('--opt', default='sgd', type=str, metavar='OPTIMIZER', help='timm optimizer name')
group.add_argument('--opt-eps', default=None, type=float, metavar='EPSILON', help='optimizer epsilon')
group.add_argument('--opt-betas', default=None, type=float, nargs='+', metavar='BETA', help='optimizer betas')
group.add_argument('--momentum', type=float, default=0.9, metavar='M', help='optimizer momentum')
group.add_argument('--weight-decay', type=float, default=2e-5, help='weight decay')
group.add_argument('--clip-grad', type=float, default=None, metavar='NORM', help='gradient clipping threshold')
group.add_argument('--clip-mode', type=str, default='norm', help='clipping mode: norm, value or agc')
group.add_argument('--layer-decay', type=float, default=None, help='layer-wise learning rate decay')
group.add_argument('--layer-decay-min-scale', type=float, default=0, help='lower bound of the layer-wise scale')
group.add_argument('--layer-decay-no-opt-scale', type=float, default=None,
                   help='layers whose scale falls below this are frozen')
group.add_argument('--opt-kwargs', nargs='*', default={}, action=utils.ParseKwargs,
                   help='extra optimizer arguments, key=value')

group = parser.add_argument_group('Learning rate schedule parameters')
group.add_argument('--sched', type=str, default='cosine', metavar='SCHEDULER', help='timm scheduler name')
group.add_argument('--sched-on-updates', action='store_true', default=False,
                   help='step the scheduler every update instead of every epoch')
group.add_argument('--lr', type=float, default=None, metavar='LR', help='learning rate (wins over --lr-base)')
group.add_argument('--lr-base', type=float, default=0.1, metavar='LR',
                   help='learning rate at --lr-base-size global batch, scaled to the real batch')
group.add_argument('--lr-base-size', type=int, default=256, metavar='DIV', help='batch size of --lr-base')
group.add_argument('--lr-base-scale', type=str, default='', metavar='SCALE',
                   help='batch scaling rule: linear or sqrt (empty: from the optimizer)')
group.add_argument('--lr-noise', type=float, nargs='+', default=None, metavar='pct, pct',
                   help='epoch fractions where learning rate noise is on')
group.add_argument('--lr-noise-pct', type=float, default=0.67, metavar='PERCENT', help='noise limit')
group.add_argument('--lr-noise-std', type=float, default=1.0, metavar='STDDEV', help='noise std')
group.add_argument('--lr-cycle-mul', type=float, default=1.0, metavar='MULT', help='cycle length multiplier')
group.add_argument('--lr-cycle-decay', type=float, default=0.5, metavar='MULT', help='decay per cycle')
group.add_argument('--lr-cycle-limit', type=int, default=1, metavar='N', help='number of cycles')
group.add_argument('--lr-k-decay', type=float, default=1.0, help='k-decay for cosine / poly')
group.add_argument('--warmup-lr', type=float, default=1e-5, metavar='LR', help='learning rate warm-up starts at')
group.add_argument('--min-lr', type=float, default=0, metavar='LR', help='lowest learning rate of the schedule')
group.add_argument('--epochs', type=int, default=300, metavar='N', help='epochs to train')
group.add_argument('--epoch-repeats', type=float, default=0., metavar='N', help='dataset passes per epoch')
group.add_argument('--start-epoch', default=None, type=int, metavar='N', help='first epoch (wins over --resume)')
group.add_argument('--decay-milestones', default=[90, 180, 270], type=int, nargs='+', metavar='MILESTONES',
                   help='increasing epochs of a multistep decay')
group.add_argument('--decay-epochs', type=float, default=90, metavar='N', help='step decay interval')
group.add_argument('--warmup-epochs', type=int, default=5, metavar='N', help='learning rate warm-up epochs')
group.add_argument('--warmup-prefix', action='store_true', default=False,
                   help='warm-up comes before, not inside, the decay schedule')
group.add_argument('--cooldown-epochs', type=int, default=0, metavar='N', help='epochs at min-lr after the schedule')
group.add_argument('--patience-epochs', type=int, default=10, metavar='N', help='plateau scheduler patience')
group.add_argument('--decay-rate', '--dr', type=float, default=0.1, metavar='RATE', help='decay factor')

group = parser.add_argument_group('Augmentation and regularization parameters')
group.add_argument('--no-aug', action='store_true', default=False, help='no train augmentation at all')
group.add_argument('--train-crop-mode', type=str, default=None, help='train crop mode')
group.add_argument('--scale', type=float, nargs='+', default=[0.08, 1.0], metavar='PCT',
                   help='random resized crop area range')
group.add_argument('--ratio', type=float, nargs='+', default=[3. / 4., 4. / 3.], metavar='RATIO',
                   help='random resized crop aspect range')
group.add_argument('--hflip', type=float, default=0.5, help='horizontal flip probability')
group.add_argument('--vflip', type=float, default=0., help='vertical flip probability')
group.add_argument('--color-jitter', type=float, default=0.4, metavar='PCT', help='color jitter strength')
group.add_argument('--color-jitter-prob', type=float, default=None, metavar='PCT', help='color jitter probability')
group.add_argument('--grayscale-prob', type=float, default=None, metavar='PCT', help='grayscale probability')
group.add_argument('--gaussian-blur-prob', type=float, default=None, metavar='PCT', help='blur probability')
group.add_argument('--aa', type=str, default=None, metavar='NAME', help='auto-augment policy')
group.add_argument('--aug-repeats', type=float, default=0, help='repeated augmentation count (distributed)')
group.add_argument('--aug-splits', type=int, default=0, help='augmentation splits (0, or >= 2)')
group.add_argument('--jsd-loss', action='store_true', default=False, help='Jensen-Shannon + CE (needs --aug-splits)')
group.add_argument('--bce-loss', action='store_true', default=False, help='binary cross-entropy loss')
group.add_argument('--bce-sum', action='store_true', default=False, help='sum BCE over classes')
group.add_argument('--bce-target-thresh', type=float, default=None, help='binarize soft BCE targets at this')
group.add_argument('--bce-pos-weight', type=float, default=None, help='BCE positive weight (same as --loss-pos-weight)')
group.add_argument('--loss', default=None, type=str, choices=LOSS_TYPES,
                   help='training loss (default: ce, or bce with --task multilabel); --bce-loss / --jsd-loss are '
                        'the older spellings of --loss bce / jsd')
group.add_argument('--loss-pos-weight', default=None, type=str,
                   help='positive term weight (bce, multi-label asl): a value, a comma list, a file, or a method '
                        'computed from --class-stats (e.g. neg_pos)')
group.add_argument('--loss-class-weight', default=None, type=str,
                   help='per-class loss weight (bce, multi-label asl): a value, a comma list, a file, or a method '
                        'computed from --class-stats (e.g. inv_freq, effective_num)')
group.add_argument('--loss-weight-power', default=1.0, type=float,
                   help='power applied to the weights computed from --class-stats')
group.add_argument('--class-stats', default=None, type=str,
                   help="class statistics JSON (pos_counts, num_samples) for computed weights and --loss db")
group.add_argument('--poly-epsilon', default=2.0, type=float, help='Poly-1 coefficient (--loss poly)')
group.add_argument('--poly-gamma', default=0.0, type=float, help='focusing parameter of multi-label --loss poly')
group.add_argument('--reprob', type=float, default=0., metavar='PCT', help='random erasing probability')
group.add_argument('--remode', type=str, default='pixel', help='random erasing mode')
group.add_argument('--recount', type=int, default=1, help='random erasing count')
group.add_argument('--resplit', action='store_true', default=False, help='no random erasing on the clean split')
group.add_argument('--mixup', type=float, default=0.0, help='mixup alpha (on when > 0)')
group.add_argument('--cutmix', type=float, default=0.0, help='cutmix alpha (on when > 0)')
group.add_argument('--cutmix-minmax', type=float, nargs='+', default=None, help='cutmix box ratio range')
group.add_argument('--mixup-prob', type=float, default=1.0, help='probability of mixing a batch')
group.add_argument('--mixup-switch-prob', type=float, default=0.5, help='probability of cutmix when both are on')
group.add_argument('--mixup-mode', type=str, default='batch', help='mix per batch, pair or elem')
group.add_argument('--mixup-off-epoch', default=0, type=int, metavar='N', help='stop mixing at this epoch (0: never)')
group.add_argument('--smoothing', type=float, default=0.1, help='label smoothing')
group.add_argument('--train-interpolation', type=str, default='random', help='train resize interpolation')
group.add_argument('--drop', type=float, default=0.0, metavar='PCT', help='dropout rate')
group.add_argument('--drop-connect', type=float, default=None, metavar='PCT',
                   help='old name of --drop-path; not used by timm, use --drop-path')
group.add_argument('--drop-path', type=float, default=None, metavar='PCT', help='stochastic depth rate')
group.add_argument('--drop-block', type=float, default=None, metavar='PCT', help='drop block rate')

group = parser.add_argument_group('Batch norm parameters', 'Honoured by models that accept them.')
group.add_argument('--bn-momentum', type=float, default=None, help='BatchNorm momentum')
group.add_argument('--bn-eps', type=float, default=None, help='BatchNorm epsilon')
group.add_argument('--sync-bn', action='store_true', help='synchronized BatchNorm across processes')
group.add_argument('--dist-bn', type=str, default='reduce',
                   help='share BatchNorm statistics after each epoch: broadcast, reduce or ""')
group.add_argument('--split-bn', action='store_true', help='one BatchNorm per augmentation split')

group = parser.add_argument_group('Model exponential moving average parameters')
group.add_argument('--model-ema', action='store_true', default=False, help='keep an EMA of the weights')
group.add_argument('--model-ema-force-cpu', action='store_true', default=False,
                   help='keep the EMA on the CPU of rank 0; the EMA is then not evaluated')
group.add_argument('--model-ema-decay', type=float, default=0.9998, help='EMA decay')
group.add_argument('--model-ema-warmup', action='store_true', help='warm the EMA decay up')

group = parser.add_argument_group('Miscellaneous parameters')
group.add_argument('--seed', type=int, default=42, metavar='S', help='random seed')
group.add_argument('--worker-seeding', type=str, default='all', help='data worker seeding mode')
group.add_argument('--log-interval', type=int, default=50, metavar='N', help='updates between log lines')
group.add_argument('--val-interval', type=int, default=1, metavar='N', help='epochs between evaluations and checkpoints')
group.add_argument('--recovery-interval', type=int, default=0, metavar='N', help='updates between recovery checkpoints')
group.add_argument('--checkpoint-hist', type=int, default=10, metavar='N', help='ranked checkpoints kept')
group.add_argument('-j', '--workers', type=int, default=4, metavar='N', help='data loader workers per process')
group.add_argument('--save-images', action='store_true', default=False, help='save input batches at log steps')
group.add_argument('--pin-mem', action='store_true', default=False, help='pinned host memory in the loader')
group.add_argument('--no-prefetcher', action='store_true', default=False, help="no timm prefetch loader")
group.add_argument('--output', default='', type=str, metavar='PATH', help='output root (default ./output/train)')
group.add_argument('--experiment', default='', type=str, metavar='NAME', help='output sub-folder name')
group.add_argument('--eval-metric', default=None, type=str, metavar='EVAL_METRIC',
                   help='metric ranking checkpoints (default: top1, or map with --task multilabel)')
group.add_argument('--tta', type=int, default=0, metavar='N', help='test-time augmentation factor')
group.add_argument('--use-multi-epochs-loader', action='store_true', default=False,
                   help='keep loader workers alive across epochs')
group.add_argument('--log-wandb', action='store_true', default=False, help='log metrics to Weights & Biases')
group.add_argument('--wandb-project', default=None, type=str, help='wandb project')
group.add_argument('--wandb-tags', default=[], type=str, nargs='+', help='wandb tags')
group.add_argument('--wandb-resume-id', default='', type=str, metavar='ID', help='wandb run id to resume')
group.add_argument('--stop-epoch', default=None, type=int, metavar='N',
                   help='stop after this many epochs, keeping the full --epochs schedule; continue later '
                        'with --resume')
group.add_argument('--save-epochs', default=None, type=int, nargs='+', metavar='N',
                   help='also keep milestone-N.pth.tar after N completed epochs')

group.add_argument('--train-img-sizes', type=int, nargs='+', default=None,
                   help='square image sizes drawn per batch (scheduled resolution)')
group.add_argument('--train-batch-sizes', type=int, nargs='+', default=None,
                   help='batch size for each --train-img-sizes entry')
group.add_argument('--train-size-probs', type=float, nargs='+', default=None,
                   help='weights of the --train-img-sizes entries')
group.add_argument('--train-size-schedule', type=str, default='constant', choices=('constant', 'progressive'),
                   help='constant draw, or progressive from the first size to the last')
group.add_argument('--train-size-schedule-spread', type=float, default=0.65, help='progressive schedule spread')
group.add_argument('--train-size-random-mix', type=float, default=0.1,
                   help='share of uniform draws in a progressive schedule')
group.add_argument('--train-batches-per-epoch', '--train-steps-per-epoch', type=int, default=None,
                   help='loader batches per epoch (inferred if unset)')
group.add_argument('--variable-batch-loss-scale', default='none', type=str, choices=('none', 'sqrt', 'linear'),
                   help='scale the loss by batch size relative to the average scheduled batch')

group.add_argument('--naflex-loader', action='store_true', default=False,
                   help='NaFlex variable-resolution loader (NaFlex models; not with DRLoc)')
group.add_argument('--naflex-train-seq-lens', type=int, nargs='+', default=[128, 256, 576, 784, 1024],
                   help='NaFlex train sequence lengths')
group.add_argument('--naflex-max-seq-len', type=int, default=576, help='NaFlex eval sequence length')
group.add_argument('--naflex-patch-sizes', type=int, nargs='+', default=None, help='NaFlex patch size choices')
group.add_argument('--naflex-patch-size-probs', type=float, nargs='+', default=None,
                   help='NaFlex patch size probabilities')
group.add_argument('--naflex-loss-scale', default='linear', type=str, choices=('none', 'sqrt', 'linear'),
                   help='NaFlex loss scaling by batch size')
group.add_argument('--naflex-patchify-channels-first', action='store_true', default=False,
                   help='NaFlex patches laid out C-P-P instead of P-P-C')

parser.add_argument('--kd-model-name', default=None, type=str, help='teacher model for distillation (not with DRLoc)')
parser.add_argument('--kd-distill-type', default='logit', type=str, choices=['logit', 'feature', 'token'],
                    help='distillation type')
parser.add_argument('--kd-loss-type', default='kl', type=str, help='logit distillation loss')
parser.add_argument('--distill-loss-weight', default=None, type=float, help='distillation loss weight')
parser.add_argument('--task-loss-weight', default=None, type=float, help='classification loss weight')
parser.add_argument('--kd-temperature', default=4.0, type=float, help='distillation softmax temperature')
parser.add_argument('--kd-student-feature-dim', default=None, type=int, help='student feature size (auto if unset)')
parser.add_argument('--kd-teacher-feature-dim', default=None, type=int, help='teacher feature size (auto if unset)')
parser.add_argument('--kd-token-distill-type', default='soft', type=str, choices=['soft', 'hard'],
                    help='token distillation: soft (KL) or hard (CE on teacher argmax)')

add_drloc_args(parser)
group = parser.add_argument_group('Hugging Face Hub parameters', 'Upload the trained model in timm\'s Hub format.')
add_push_args(group)
del group, scripting_group


# ---------------------------------------------------------------------------------------------------------
# Parsing and checks that need no data, model or device
# ---------------------------------------------------------------------------------------------------------

_SHOWN_VALUE = reprlib.Repr()  # a repr cut at every level: a config value may be huge
_SHOWN_VALUE.maxlevel, _SHOWN_VALUE.maxstring, _SHOWN_VALUE.maxother = 2, 60, 60
_SHOWN_VALUE.maxlist = _SHOWN_VALUE.maxtuple = _SHOWN_VALUE.maxdict = 4
CONFIG_MAX_VALUES = 10_000  # scalars in a -c config, counted as written out: a flag file holds a few hundred


def _shown(value: Any) -> str:
    """A value as an error message shows it: a repr cut to a few dozen characters, whatever its size."""
    return _SHOWN_VALUE.repr(value)


def _cut(text: str, size: int = 200) -> str:
    """`text` on one line, cut to `size` characters (library messages can quote a whole value)."""
    text = ' '.join(text.split())
    return text if len(text) <= size else text[:size] + '...'


def _expanded_size(value: Any, limit: int) -> int:
    """Scalars in a YAML value with its aliases written out, counted up to just past `limit` (so a YAML
    "billion laughs" of shared lists is measured in microseconds, never expanded)."""
    count, stack = 0, [value]
    while stack and count <= limit:
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
        else:
            count += 1
    return count


def _is_flag_switch(action: argparse.Action) -> bool:
    return isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction))


def _config_scalar(action: argparse.Action, key: str, value: Any, path: str) -> Any:
    """One config value converted as the command line would convert it; parser.error when it cannot be."""
    convert = action.type
    if value is None:
        return None
    if convert in (int, float):
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            parser.error(f'config {path}: {key}={_shown(value)} must be a number ({convert.__name__})')
        try:
            converted = convert(value) if isinstance(value, str) else value
        except ValueError:
            parser.error(f'config {path}: {key}={_shown(value)} is not a valid {convert.__name__}')
        if convert is int and isinstance(converted, float):
            if not converted.is_integer():
                parser.error(f'config {path}: {key}={_shown(value)} must be a whole number')
            converted = int(converted)
        value = convert(converted)
    elif convert in (None, str):
        if isinstance(value, (list, dict)):
            parser.error(f'config {path}: {key}={_shown(value)} must be a single string')
        value = str(value) if not isinstance(value, str) else value
    elif isinstance(value, str):
        try:
            value = convert(value)
        except (TypeError, ValueError) as e:
            parser.error(f'config {path}: {key}={_shown(value)} is not valid ({_cut(str(e))})')
    if action.choices is not None and value not in action.choices:
        parser.error(f'config {path}: {key}={_shown(value)} is not one of {list(action.choices)}')
    return value


def _config_value(action: argparse.Action, key: str, value: Any, path: str) -> Any:
    """A config value checked against the flag's kind: switch, key=value dict, list or scalar."""
    if value is None:
        return None
    if _is_flag_switch(action):
        if not isinstance(value, bool):
            parser.error(f'config {path}: {key}={_shown(value)} must be true or false')
        return value
    if isinstance(action, utils.ParseKwargs):
        if not isinstance(value, dict):
            parser.error(f'config {path}: {key}={_shown(value)} must be a mapping of names to values')
        return value
    if action.nargs in ('+', '*') or isinstance(action.nargs, int):
        if not isinstance(value, (list, tuple)):
            parser.error(f'config {path}: {key}={_shown(value)} must be a list')
        if isinstance(action.nargs, int) and len(value) != action.nargs:
            parser.error(f'config {path}: {key} needs {action.nargs} values, got {len(value)}')
        if action.nargs == '+' and not value and action.default != []:  # [] is the default of e.g. wandb_tags
            parser.error(f'config {path}: {key} needs at least one value')
        return [_config_scalar(action, key, v, path) for v in value]
    if isinstance(value, (list, tuple, dict)):
        parser.error(f'config {path}: {key}={_shown(value)} must be a single value, not a {type(value).__name__}')
    return _config_scalar(action, key, value, path)


def _load_config(path: str) -> Dict[str, Any]:
    """Flag defaults from a YAML config: values checked and converted; unknown keys are warned about and dropped."""
    if not os.path.isfile(path):
        parser.error(f'config file {path!r} does not exist; pass the path of a YAML file to -c/--config')
    with open(path, 'rb') as f:  # bytes: PyYAML detects the encoding, and reports a binary file as bad YAML
        try:
            cfg = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            parser.error(f'config {path} is not valid YAML: {_cut(str(e))}')
    if not isinstance(cfg, dict):
        parser.error(f'config {path} must be a mapping of flag names to values, got a {type(cfg).__name__}')
    if _expanded_size(cfg, CONFIG_MAX_VALUES) > CONFIG_MAX_VALUES:
        parser.error(f'config {path} expands to more than {CONFIG_MAX_VALUES} values (YAML aliases repeated inside '
                     f'each other?); a config holds flag values: write them out plainly')
    actions = {a.dest: a for a in parser._actions if a.dest != 'help'}
    defaults = {}
    for key, value in cfg.items():
        dest = str(key).replace('-', '_')
        if dest not in actions:
            _logger.warning(f'config {path}: {_shown(key)} is not a train_drloc.py flag; it is ignored')
            continue
        defaults[dest] = _config_value(actions[dest], str(key), value, path)
    return defaults


def _check_drloc_flags(args: argparse.Namespace) -> None:
    """Reject DRLoc flag values that cannot work, with the value and what to use instead (settings.py's check)."""
    try:
        check_drloc_args(args)
    except ConfigError as e:
        parser.error(str(e))
    ignored = ignored_drloc_flags(args)
    if ignored:
        _logger.warning(f'{", ".join(ignored)} given but --drloc-lambda is 0, so DRLoc is off and they have no '
                        f'effect; set --drloc-lambda (e.g. 0.5) to train with DRLoc')


def _check_loss_flags(args: argparse.Namespace) -> None:
    """Fold --bce-loss / --jsd-loss / --bce-pos-weight into --loss / --loss-pos-weight (as timm 1.0.31 does), and
    reject task and loss flags that cannot work together, by building the loss once."""
    multi_label = args.task == 'multilabel'
    if args.target_format == 'multihot' and not multi_label:
        parser.error('--target-format multihot holds one 0/1 value per class, which is a multi-label target: add '
                     '--task multilabel')
    if multi_label and args.kd_model_name:
        parser.error('--kd-model-name distills single-label logits; it cannot be combined with --task multilabel')
    for switch, loss in (('--bce-loss', 'bce'), ('--jsd-loss', 'jsd')):
        if getattr(args, switch[2:].replace('-', '_')):
            if args.loss not in (None, loss):
                parser.error(f'{switch} means --loss {loss}, but --loss {args.loss} is given too; keep one of them')
            args.loss = loss
    if args.bce_pos_weight is not None:
        if args.loss_pos_weight not in (None, str(args.bce_pos_weight)):  # equal when re-read from args.yaml
            parser.error('--bce-pos-weight and --loss-pos-weight set the same weight; keep --loss-pos-weight')
        args.loss_pos_weight = str(args.bce_pos_weight)
    try:
        _train_loss(args)
    except (ValueError, OSError) as e:
        parser.error(f'loss flags: {e}')


def _check_run_flags(args: argparse.Namespace) -> None:
    """Reject flag combinations timm would reject later, or silently ignore, before anything is built."""
    if args.naflex_loader and args.train_img_sizes is not None:
        parser.error('--naflex-loader and --train-img-sizes are two different loaders; choose one')
    if args.naflex_loader and args.use_multi_epochs_loader:
        parser.error('--use-multi-epochs-loader does not work with --naflex-loader; drop one of them')
    if args.resume == 'auto' and not args.experiment:
        parser.error('--resume auto continues in place in the experiment folder: give it with --experiment NAME')
    if args.val_interval < 1:
        parser.error(f'--val-interval must be >= 1, got {args.val_interval}')
    if args.save_epochs and min(args.save_epochs) < 1:
        parser.error(f'--save-epochs counts completed epochs, so each must be >= 1, got {args.save_epochs}')
    if args.model_dtype and args.model_dtype not in ('float32', 'float16', 'bfloat16'):
        parser.error(f'--model-dtype {args.model_dtype} is not float32, float16 or bfloat16')
    if args.amp and args.amp_dtype not in ('float16', 'bfloat16'):
        parser.error(f'--amp-dtype {args.amp_dtype} is not float16 or bfloat16')
    if args.max_nonfinite_steps < 1:
        parser.error(f'--max-nonfinite-steps must be >= 1, got {args.max_nonfinite_steps}; it counts non-finite '
                     f'steps in a row that stop the run (default 10)')
    if args.amp and args.model_dtype not in (None, 'float32'):
        parser.error(f'--amp needs a float32 model, got --model-dtype {args.model_dtype}; drop one of them')
    if args.drop_connect is not None:
        _logger.warning('--drop-connect is an old name that timm models no longer read; use --drop-path '
                        f'{args.drop_connect} for stochastic depth')
    if args.local_rank and 'LOCAL_RANK' not in os.environ:
        _logger.warning('--local_rank is set by old launchers only; the rank is read from the torchrun environment')


def _check_number_flags(args: argparse.Namespace) -> None:
    """timm's number flags that would fail mid-run (or train on nonsense) outside their range, refused now."""
    if args.lr is not None and not (math.isfinite(args.lr) and args.lr > 0):
        parser.error(f'--lr must be a finite number > 0, got {args.lr}; e.g. --lr 1e-3, or leave it out to scale '
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
            parser.error(f'{flag} must be >= {low} ({meaning}), got {value}')
    if args.input_size is not None and min(args.input_size) < 1:
        parser.error(f'--input-size takes C H W, each >= 1, got {args.input_size}')
    if not 0 <= args.smoothing < 1:
        parser.error(f'--smoothing is the share of the target spread over the other classes, so it must be in '
                     f'[0, 1), got {args.smoothing}; timm uses 0.1')
    if args.std is not None and not all(math.isfinite(v) and v > 0 for v in args.std):
        parser.error(f'--std divides each channel, so every value must be a finite number > 0, got {args.std}')
    if _mixup_active(args):
        odd = [b for b in [args.batch_size, *(args.train_batch_sizes or [])] if b % 2]
        if odd:
            parser.error(f'mixup / cutmix mix each image of a batch with another one, so batch sizes must be even, got '
                         f'{odd[0]}; use {odd[0] + 1}')


def _parse_args() -> Tuple[argparse.Namespace, str]:
    """Flags from the command line over a -c/--config YAML file over the defaults; also returns them as YAML."""
    args_config, remaining = config_parser.parse_known_args()
    if args_config.config:
        parser.set_defaults(**_load_config(args_config.config))
    args = parser.parse_args(remaining)
    _check_drloc_flags(args)
    _check_number_flags(args)
    _check_loss_flags(args)
    args.eval_metric = _eval_metric(args)  # args.yaml names it: timm's train.py, given it with -c, needs a name
    args_text = yaml.safe_dump(args.__dict__, default_flow_style=False)
    return args, args_text


def _stop_epoch_check(args: argparse.Namespace, num_epochs: int) -> int:
    """The epoch (exclusive) this process stops at: --stop-epoch, or the end of the `num_epochs` schedule."""
    if args.stop_epoch is None:
        return num_epochs
    if not 1 <= args.stop_epoch <= num_epochs:
        raise ConfigError(f'--stop-epoch {args.stop_epoch} is out of range: the schedule has {num_epochs} epochs, '
                          f'so use 1..{num_epochs}, or raise --epochs')
    return args.stop_epoch


# ---------------------------------------------------------------------------------------------------------
# Output folder, checkpoints, resume and summary
# ---------------------------------------------------------------------------------------------------------

def _experiment_dir(args: argparse.Namespace, input_size: Sequence[int]) -> str:
    """Where the run writes: <output or ./output/train>/<experiment or date-model-size>."""
    name = args.experiment or '-'.join([
        datetime.now().strftime('%Y%m%d-%H%M%S'), safe_model_name(args.model), str(input_size[-1])])
    return os.path.join(args.output if args.output else './output/train', name)


class AtomicCheckpointSaver(utils.CheckpointSaver):
    """timm's CheckpointSaver, with every file it writes appearing whole or not at all.

    timm already writes `last` (and recovery files) to a temporary file and renames it into place. The
    copies it makes of `last` (checkpoint-N, model_best, milestone-N) are hard links, or byte copies where
    links are not possible; here they too go through a temporary name and an atomic rename, so a run killed
    mid-save never leaves a truncated checkpoint, and the previous model_best stays until the new one is whole.
    A write that fails (a full disk) or is interrupted (Ctrl-C) removes its temporary file; a failed write
    ends the run with a ConfigError naming the cause and the folder, the checkpoints already written untouched.
    """

    def _save(self, save_path: str, epoch: int, metric: Optional[float] = None) -> None:
        # timm's _save hands its path straight to torch.save: given an open file instead, a failed write
        # arrives as Python's OSError with its errno, not as the zip writer's RuntimeError
        with self._writing(save_path):
            with open(save_path, 'wb') as f:
                super()._save(f, epoch, metric)

    def _duplicate(self, src: str, dst: str) -> None:
        tmp = dst + '.tmp'
        if os.path.exists(tmp):
            os.unlink(tmp)
        with self._writing(tmp):
            try:
                if not self.can_hardlink:
                    raise OSError('hard links disabled')
                os.link(src, tmp)
            except (OSError, NotImplementedError):
                self.can_hardlink = False
                shutil.copy2(src, tmp)
        os.replace(tmp, dst)

    @contextmanager
    def _writing(self, tmp: str):
        """Remove the temporary file `tmp` when writing it fails or is interrupted; a failed write is a ConfigError."""
        try:
            yield
        except BaseException as e:
            if os.path.lexists(tmp):
                os.unlink(tmp)
            if not isinstance(e, OSError):
                raise
            what = 'no space left on the device' if e.errno in (errno.ENOSPC, errno.EDQUOT) else \
                f'{e.strerror or type(e).__name__}'
            raise ConfigError(f'{what} while writing a checkpoint in {self.checkpoint_dir}; the checkpoints already '
                              f'written there are intact: free some space, then '
                              f'{_continue_hint(self.args, self.checkpoint_dir)}') from e

def _readable_checkpoint(path: str, weights_only_ok: bool = False) -> Optional[str]:
    """None when `path` loads as a training checkpoint (with `weights_only_ok`, also as a model state dict
    without an epoch, as timm's clean_checkpoint.py writes), else why it does not."""
    try:
        meta = read_checkpoint(path)
    except CheckpointError as e:
        return e.problem
    if 'epoch' in meta or (weights_only_ok and is_weights_only(meta)):
        return None
    return 'no epoch entry, not a training checkpoint' + (' nor a model state dict' if weights_only_ok else '')


def _is_recovery(path: str) -> bool:
    """A recovery-E-B checkpoint (--recovery-interval), written inside epoch E after its update B."""
    stem = os.path.basename(path)[:-len(CHECKPOINT_EXT)] if path.endswith(CHECKPOINT_EXT) else ''
    parts = stem.split('-')
    return len(parts) == 3 and parts[0] == 'recovery' and parts[1].isdigit() and parts[2].isdigit()


def _check_checkpoint_file(flag: str, path: str) -> None:
    """The checks --resume and --initial-checkpoint share: a file that exists and loads without running code.

    Raises:
        ConfigError: naming the flag, the path and what to give instead.
    """
    if os.path.isdir(path):
        raise ConfigError(f'{flag} {path} is a folder; give a checkpoint file in it, e.g. '
                          f'{os.path.join(path, "last" + CHECKPOINT_EXT)}')
    if not os.path.isfile(path):
        other = ', or --resume auto with --experiment' if flag == '--resume' else ''
        raise ConfigError(f'{flag} {path}: no such file; give the path of a .pth.tar checkpoint{other}')
    problem = _readable_checkpoint(path, weights_only_ok=True)
    if problem is not None:
        raise ConfigError(f'{flag} {path}: cannot read this checkpoint ({problem}); give an intact checkpoint '
                          f'written by training (an earlier checkpoint-N.pth.tar if this one is damaged)')


def _checkpoint_misfit(flag: str, path: str, error: Exception) -> ConfigError:
    """The error for a readable checkpoint whose weights do not fit the model (another architecture or size)."""
    return ConfigError(f'{flag} {path} does not fit this run ({str(error).splitlines()[0]}); use it with the flags '
                       f'it was trained with (see args.yaml next to it)')


def _auto_resume_path(exp_dir: str) -> Optional[str]:
    """The newest readable checkpoint of an experiment folder, or None when it has none.

    Candidates are last, checkpoint-N, milestone-N and the recovery-E-B files --recovery-interval writes
    inside an epoch (so a run killed in its first epoch continues from one), newest written first; `last`
    wins a tie with the checkpoint-N that is its copy.
    """
    if not os.path.isdir(exp_dir):
        return None
    candidates = []
    for name in os.listdir(exp_dir):
        stem = name[:-len(CHECKPOINT_EXT)] if name.endswith(CHECKPOINT_EXT) else ''
        prefix, _, number = stem.rpartition('-')
        if stem == 'last' or (prefix in ('checkpoint', 'milestone') and number.isdigit()) or _is_recovery(name):
            path = os.path.join(exp_dir, name)
            candidates.append((os.path.getmtime(path), stem == 'last', path))
    if not candidates:
        return None
    for rank, (_, _, path) in enumerate(sorted(candidates, reverse=True)):
        problem = _readable_checkpoint(path)
        if problem is None:
            if rank or _is_recovery(path):
                _logger.warning(f'--resume auto: continuing from {path}')
            return path
        _logger.warning(f'--resume auto: {path} is unreadable ({problem}); trying the next newest checkpoint')
    raise ConfigError(f'--resume auto: no readable checkpoint in {exp_dir}; move the folder away to start fresh, '
                      f'or give --resume a good checkpoint')


def _resolve_resume(args: argparse.Namespace, exp_dir: str) -> Tuple[str, bool]:
    """(checkpoint to resume from or '', whether the run continues in place in `exp_dir`)."""
    if not args.resume:
        return '', False
    if args.resume == 'auto':
        path = _auto_resume_path(exp_dir)
        if path is None:
            _logger.info(f'--resume auto: no checkpoint in {exp_dir} yet, starting a fresh run')
            return '', False
        return path, True
    _check_checkpoint_file('--resume', args.resume)
    same_dir = os.path.abspath(os.path.dirname(args.resume)) == os.path.abspath(exp_dir)
    return args.resume, same_dir


def _resume_checkpoint(
        args: argparse.Namespace,
        task: nn.Module,
        path: str,
        optimizer: torch.optim.Optimizer,
        loss_scaler: Optional[NativeScaler],
) -> Tuple[Optional[int], bool]:
    """Load a --resume checkpoint into the task with timm's resume_task_checkpoint.

    Returns (the epoch to start at, None for 0; whether the file also seeds the EMA). Two kinds of file get
    more than timm's function gives them: a checkpoint without an epoch (a bare state dict, as timm's
    clean_checkpoint.py writes) holds model weights only, and with DRLoc on and no heads in it the heads start
    fresh (timm would refuse the missing task state); a recovery-E-B file was written inside epoch E, so the run
    repeats epoch E from its start (timm would skip the rest of it).
    """
    meta = read_checkpoint(path)
    task_state = meta.get('task_state') if isinstance(meta.get('task_state'), dict) else {}
    if is_weights_only(meta) and args.drloc_lambda > 0 and 'drloc_heads' not in task_state:
        unwrap_model(task.get_eval_model()).load_state_dict(load_state_dict(path, use_ema=False))
        if utils.is_primary(args):
            _logger.info(f'--resume {path} holds model weights only (no epoch, optimizer or DRLoc heads): loaded '
                         f'them; training starts at epoch 0 with fresh DRLoc heads')
        return None, False
    epoch = resume_task_checkpoint(
        task, path, optimizer=None if args.no_resume_opt else optimizer,
        loss_scaler=None if args.no_resume_opt else loss_scaler, log_info=utils.is_primary(args))
    if epoch is not None and _is_recovery(path):
        epoch = int(meta['epoch'])
        if utils.is_primary(args):
            _logger.info(f'--resume {path} was written inside epoch {epoch}: running epoch {epoch} again from its '
                         f'start, with the weights of the recovery checkpoint')
    return epoch, True


# ---------------------------------------------------------------------------------------------------------
# Building blocks of main()
# ---------------------------------------------------------------------------------------------------------

def _build_model(args: argparse.Namespace) -> nn.Module:
    """The timm model from the model flags, through the module-level `create_model` (tests replace it).

    As in timm 1.0.31, the input flags (--in-chans, --input-size, --img-size) and the pretrained config
    (file=--pretrained-path with num_classes=-1 to adapt the classifier, then --pretrained-cfg-overlay) are
    resolved by timm's `resolve_model_input_args` into the `pretrained_cfg` and kwargs given to create_model.
    """
    overlay = dict(file=args.pretrained_path, num_classes=-1) if args.pretrained_path else {}
    overlay.update(args.pretrained_cfg_overlay)
    model_args = create_model_args(
        args.model,
        vars(args),
        pretrained_cfg_overlay=overlay or None,
        num_classes=args.num_classes,
        drop_rate=args.drop,
        drop_path_rate=args.drop_path,
        drop_block_rate=args.drop_block,
        global_pool=args.gp,
        bn_momentum=args.bn_momentum,
        bn_eps=args.bn_eps,
        **args.model_kwargs,
    )
    numpy_weights = os.path.splitext(args.initial_checkpoint)[1].lower() in ('.npz', '.npy')  # model-specific
    if args.initial_checkpoint and not numpy_weights:
        _check_checkpoint_file('--initial-checkpoint', args.initial_checkpoint)
    model = create_model(**model_args, pretrained=args.pretrained, scriptable=args.torchscript)
    if args.initial_checkpoint:  # as create_model(checkpoint_path=...) would, with a misfit named
        try:
            load_checkpoint(model, args.initial_checkpoint)
        except (RuntimeError, ValueError, KeyError, NotImplementedError) as e:
            raise _checkpoint_misfit('--initial-checkpoint', args.initial_checkpoint, e) from e
    if args.head_init_scale is not None:
        with torch.no_grad():
            model.get_classifier().weight.mul_(args.head_init_scale)
            model.get_classifier().bias.mul_(args.head_init_scale)
    if args.head_init_bias is not None:
        nn.init.constant_(model.get_classifier().bias, args.head_init_bias)
    if args.num_classes is None:
        if not hasattr(model, 'num_classes'):
            raise ConfigError(f'{args.model} has no num_classes attribute; give --num-classes')
        args.num_classes = model.num_classes
    if args.grad_checkpointing:
        model.set_grad_checkpointing(enable=True)
    return model


def _aug_splits(args: argparse.Namespace) -> int:
    """Number of augmentation splits (0: off)."""
    if args.aug_splits == 1:
        raise ConfigError('--aug-splits 1 makes no split; use 0 (off) or 2 and more')
    return max(args.aug_splits, 0)


def _place_model(
        args: argparse.Namespace,
        model: nn.Module,
        device: torch.device,
        model_dtype: Optional[torch.dtype],
        num_aug_splits: int,
) -> Tuple[nn.Module, Optional[Tuple[int, int]]]:
    """Split / sync BatchNorm, device, dtype, memory format and TorchScript; also the NaFlex patch size."""
    if args.split_bn:
        if num_aug_splits <= 1 and not args.resplit:
            raise ConfigError('--split-bn needs --aug-splits 2 or more (or --resplit)')
        model = convert_splitbn_model(model, max(num_aug_splits, 2))
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
        if args.sync_bn:
            raise ConfigError('--torchscript cannot script SyncBatchNorm; drop --sync-bn')
        model = torch.jit.script(model)
    return model, patch_size


def _amp(args: argparse.Namespace, device: torch.device,
         model_dtype: Optional[torch.dtype]) -> Tuple[Callable, Optional[NativeScaler]]:
    """The autocast context for --amp (a no-op context without it), and the loss scaler float16 needs."""
    if not args.amp:
        if utils.is_primary(args):
            _logger.info(f'AMP off, training in {model_dtype or torch.float32}.')
        return suppress, None
    amp_dtype = torch.bfloat16 if args.amp_dtype == 'bfloat16' else torch.float16
    # float16 gradients underflow on the CPU as on CUDA, and torch's GradScaler works on both (timm's train.py
    # scales on CUDA only); bfloat16 has float32's range and needs no scaler
    scaled = amp_dtype == torch.float16 and device.type in ('cuda', 'cpu')
    loss_scaler = NativeScaler(device=device.type) if scaled else None
    if utils.is_primary(args):
        _logger.info(f'Mixed precision training with torch.autocast ({amp_dtype}).')
    return partial(torch.autocast, device_type=device.type, dtype=amp_dtype), loss_scaler


def _mixup_active(args: argparse.Namespace) -> bool:
    """Whether mixup / cutmix turn the targets into soft targets."""
    return args.mixup > 0 or args.cutmix > 0. or args.cutmix_minmax is not None


def _train_loss(args: argparse.Namespace, num_classes: Optional[int] = None, verbose: bool = False) -> nn.Module:
    """The training criterion of the loss flags, from timm's create_classification_loss.

    Weights given as method names are computed from --class-stats; with `num_classes`, per-class weights
    must have one entry per class. Raises ValueError (or OSError for an unreadable file) naming the flag.
    """
    multi_label = args.task == 'multilabel'
    loss_type = args.loss or ('bce' if multi_label else 'ce')
    mixup_active = _mixup_active(args)
    smoothing = args.smoothing
    if loss_type in ('twoway', 'zlpr') and smoothing and not mixup_active:
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
        loss_type, multi_label=multi_label, smoothing=smoothing, soft_targets=mixup_active,
        class_weight=weights['class_weight'], pos_weight=weights['pos_weight'],
        bce_target_thresh=args.bce_target_thresh, bce_sum=args.bce_sum, poly_epsilon=args.poly_epsilon,
        poly_gamma=args.poly_gamma, jsd_splits=max(args.aug_splits, 0), **db)


# what the command line does instead of the API fix each grid error names
_GRID_FIXES = (
    (ProbeError, 'models with a fixed input size need it at creation, e.g. --model-kwargs img_size={size}'),
    (SingleScaleError, 'drop --drloc-multiscale'),
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


def _check_head_memory(args: argparse.Namespace, task: nn.Module, device: torch.device) -> None:
    """The DRLoc heads at the run's batch size must fit the device (wrap() checked them at one image)."""
    drloc, settings = task.get_trainable_module(), drloc_kwargs(args)
    try:
        check_head_memory([(s.num_chs, s.grid_size) for s in drloc.sources], settings['hidden_dim'],
                          settings['num_samples'], settings['mode'], settings['use_abs'], device,
                          batch_size=args.batch_size)
    except HeadTooLargeError as e:
        raise _head_memory_error(args, e) from e


def _build_task(
        args: argparse.Namespace,
        model: nn.Module,
        criterion: nn.Module,
        input_size: Sequence[int],
        device: torch.device,
        model_dtype: Optional[torch.dtype],
) -> nn.Module:
    """DRLocTask when --drloc-lambda > 0, a timm distillation task with --kd-model-name, else timm's
    ClassificationTask (MultiLabelClassificationTask with --task multilabel)."""
    verbose = utils.is_primary(args)
    settings = drloc_kwargs(args)
    if settings is not None:
        from timm_drloc.task import DRLocTask
        try:
            return DRLocTask(model, criterion=criterion, input_size=tuple(input_size), device=device, dtype=model_dtype,
                             verbose=verbose, **settings)
        except HeadTooLargeError as e:
            raise _head_memory_error(args, e) from e
        except GridError as e:
            raise _grid_error(args, e, input_size) from e
    if args.kd_model_name is not None:
        common = dict(student_model=model, teacher_model=args.kd_model_name, criterion=criterion,
                      distill_loss_weight=args.distill_loss_weight, task_loss_weight=args.task_loss_weight,
                      device=device, dtype=model_dtype, verbose=verbose)
        if args.kd_distill_type == 'logit':
            return LogitDistillationTask(loss_type=args.kd_loss_type, temperature=args.kd_temperature, **common)
        if args.kd_distill_type == 'feature':
            return FeatureDistillationTask(student_feature_dim=args.kd_student_feature_dim,
                                           teacher_feature_dim=args.kd_teacher_feature_dim, **common)
        return TokenDistillationTask(distill_type=args.kd_token_distill_type, temperature=args.kd_temperature,
                                     **common)
    task_cls = MultiLabelClassificationTask if args.task == 'multilabel' else ClassificationTask
    return task_cls(model=model, criterion=criterion, device=device, dtype=model_dtype, verbose=verbose)


def _is_folder_dataset(args: argparse.Namespace) -> bool:
    """No --dataset type (an image folder or tar), or an explicit folder/ one."""
    return not args.dataset or args.dataset.lower().startswith(('folder/', 'imagefolder/', 'tar/'))


def _check_data_dir(args: argparse.Namespace) -> None:
    """A folder dataset's root must exist and hold the split folders the run reads, which are logged, all before
    anything is built. With no data dir given at all, the error comes once the model is built (_build_datasets),
    as in timm's train.py, whose own tests build a model without data."""
    if args.data and not args.data_dir:
        args.data_dir = args.data
    if not _is_folder_dataset(args) or not args.data_dir:
        return
    if not os.path.exists(args.data_dir):
        raise ConfigError(f'data dir {args.data_dir!r} does not exist; pass the dataset root with --data-dir, '
                          f'holding {args.train_split}/ and {args.val_split}/ class folders')
    if not os.path.isdir(args.data_dir):
        return  # a .tar of images: no split folders
    train_dir, val_dir = _split_folders(args)
    if utils.is_primary(args):
        _logger.info(f'Data: training on {train_dir}, validating on '
                     f'{val_dir or "nothing (--val-split is empty)"}.')


def _split_folders(args: argparse.Namespace) -> Tuple[str, Optional[str]]:
    """The folders of the train and eval splits of a folder dataset (eval None without --val-split)."""
    train_dir = split_folder(args.data_dir, args.train_split, '--train-split', args.val_split)
    val_dir = split_folder(args.data_dir, args.val_split, '--val-split', args.train_split) if args.val_split else None
    return train_dir, val_dir


def _build_datasets(args: argparse.Namespace, input_img_mode: str):
    """The train and eval datasets (eval is None without --val-split); folder datasets name the images they skip,
    and must hold the same classes in both splits."""
    if _is_folder_dataset(args) and not args.data_dir:
        raise ConfigError('no dataset given: pass the dataset root folder as --data-dir DIR (or positionally)')
    common = dict(root=args.data_dir, class_map=args.class_map, download=args.dataset_download,
                  batch_size=args.batch_size, input_img_mode=input_img_mode, input_key=args.input_key,
                  target_key=args.target_key, target_format=args.target_format,
                  trust_remote_code=args.dataset_trust_remote_code)
    if args.task == 'multilabel':  # positive class indices (or a multi-hot row) -> float (num_classes,)
        common['target_transform'] = MultiLabelTarget(args.num_classes, dense=args.target_format == 'multihot')
    try:
        dataset_train = create_dataset(
            args.dataset, split=args.train_split, is_training=True, seed=args.seed, repeats=args.epoch_repeats,
            num_samples=args.train_num_samples, **common)
        dataset_eval = None
        if args.val_split:
            dataset_eval = create_dataset(
                args.dataset, split=args.val_split, is_training=False, num_samples=args.val_num_samples, **common)
    except RuntimeError as e:  # timm's folder reader found no images: say which split folder is empty
        folders = _split_folders(args) if _is_folder_dataset(args) and os.path.isdir(args.data_dir) else ()
        empty = [f for f in folders if f and not holds_images(f)]
        if not empty:
            raise
        raise ConfigError(f'{empty[0]} holds no images ({e}); an image folder dataset holds '
                          f'<root>/{args.train_split}/<class>/<image> and <root>/{args.val_split}/<class>/<image>') from e
    readers = [getattr(d, 'reader', None) for d in (dataset_train, dataset_eval)]
    classes = [getattr(r, 'class_to_idx', None) for r in readers]
    if classes[0] and classes[1]:
        check_same_classes(classes[0], classes[1], readers[0].root, readers[1].root)
    for dataset in (dataset_train, dataset_eval):
        if name_unreadable_images(dataset):
            check_first_images(dataset, dataset.reader.root)
    return dataset_train, dataset_eval


def _check_num_classes(args: argparse.Namespace, dataset_train) -> None:
    """The data's classes must fit the classifier; a mismatch would fail (or mislead) mid-epoch."""
    reader = getattr(dataset_train, 'reader', None)
    class_to_idx = getattr(reader, 'class_to_idx', None)
    if not class_to_idx:
        return
    if len(class_to_idx) < 2:
        raise ConfigError(f'{args.data_dir} has {len(class_to_idx)} class folder(s) in {args.train_split}/; '
                          f'classification needs at least 2')
    if args.num_classes is not None and len(class_to_idx) > args.num_classes:
        raise ConfigError(f'the data has {len(class_to_idx)} classes but the model has {args.num_classes} outputs; '
                          f'pass --num-classes {len(class_to_idx)}')
    if args.num_classes is not None and len(class_to_idx) < args.num_classes and utils.is_primary(args):
        _logger.warning(f'the model has {args.num_classes} outputs but the data only {len(class_to_idx)} classes; '
                        f'pass --num-classes {len(class_to_idx)} unless the extra outputs are intended')


def _scaled_lr(args: argparse.Namespace, batch_size_reference: float) -> float:
    """--lr, or --lr-base scaled from --lr-base-size to the global batch."""
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


def _warn_unreached_lambda(args: argparse.Namespace, num_epochs: int) -> None:
    """Warn at start when the warm-up is as long as the schedule, so lambda never reaches --drloc-lambda (the
    per-epoch value is in summary.csv's drloc_lambda column, and the model card states the value reached)."""
    if args.drloc_lambda <= 0 or args.drloc_warmup_epochs < num_epochs:
        return
    reached = max(drloc_lambda_for_epoch(args, epoch, num_epochs) for epoch in range(num_epochs))
    _logger.warning(f'--drloc-warmup-epochs {args.drloc_warmup_epochs} is not shorter than the {num_epochs}-epoch '
                    f'schedule: lambda only ramps up to {reached:g}, never the asked --drloc-lambda '
                    f'{args.drloc_lambda:g}; use fewer warm-up epochs (or more --epochs)')


# ---------------------------------------------------------------------------------------------------------
# Progress display
# ---------------------------------------------------------------------------------------------------------

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


# ---------------------------------------------------------------------------------------------------------
# Train and eval loops
# ---------------------------------------------------------------------------------------------------------

@dataclass
class RunPosition:
    """Where the training loop is, for the line an interrupt (Ctrl-C) ends the run with."""
    epoch: int
    step: Optional[int] = None  # batch index within the epoch; None between the epoch's training steps

    def describe(self) -> str:
        where = f'step {self.step}' if self.step is not None else 'outside its training steps (evaluating or saving)'
        return f'epoch {self.epoch}, {where}'


def _continue_hint(args: Optional[argparse.Namespace], output_dir: Optional[str]) -> str:
    """How to go on from the checkpoints a stopped run left, as the end of a sentence ('continue with ...')."""
    if args is None or output_dir is None:
        return 'continue with --resume and the last checkpoint'
    last = os.path.join(output_dir, 'last' + CHECKPOINT_EXT)
    if not os.path.exists(last):
        return 'run it again (no checkpoint was written yet)'
    if args.experiment:
        return 'continue with the same command and --resume auto'
    return f'continue with --resume {last}'


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


def train_one_epoch(
        epoch: int,
        model: nn.Module,
        loader,
        optimizer: torch.optim.Optimizer,
        args: argparse.Namespace,
        task: nn.Module,
        device: torch.device,
        lr_scheduler=None,
        saver: Optional[utils.CheckpointSaver] = None,
        output_dir: Optional[str] = None,
        amp_autocast=suppress,
        loss_scaler: Optional[NativeScaler] = None,
        model_dtype: Optional[torch.dtype] = None,
        mixup_fn: Optional[Mixup] = None,
        naflex_mode: bool = False,
        scheduled_batch_mode: bool = False,
        batch_size_reference: Optional[float] = None,
        nonfinite: Optional['NonFiniteSteps'] = None,
        position: Optional[RunPosition] = None,
) -> 'OrderedDict[str, float]':
    """One epoch of updates; returns the epoch's mean train loss (and mean DRLoc loss), averaged over ranks.

    `nonfinite` decides what a NaN / Inf loss does (skip or stop; its streak runs across epochs); by default
    a new one for this epoch, skipping under a loss scaler as --max-nonfinite-steps says. `position.step`
    follows the batch being trained on (for the line a Ctrl-C ends the run with).
    """
    if nonfinite is None:
        nonfinite = NonFiniteSteps(args.max_nonfinite_steps if loss_scaler is not None else None)
    nonfinite.skipped = 0
    if args.mixup_off_epoch and epoch >= args.mixup_off_epoch:
        if args.prefetcher and getattr(loader, 'mixup_enabled', False):
            loader.mixup_enabled = False
        elif mixup_fn is not None:
            mixup_fn.mixup_enabled = False

    second_order = getattr(optimizer, 'is_second_order', False)
    has_no_sync = args.distributed and hasattr(task.get_trainable_module(), 'no_sync')
    update_time_m, data_time_m = utils.AverageMeter(), utils.AverageMeter()
    losses_m, drloc_m = utils.AverageMeter(), utils.AverageMeter()
    task.get_trainable_module().train()

    num_batches = len(loader)
    accum_steps = args.grad_accum_steps
    last_accum_steps = num_batches % accum_steps
    updates_per_epoch = (num_batches + accum_steps - 1) // accum_steps
    num_updates = epoch * updates_per_epoch
    last_batch_idx_to_accum = num_batches - last_accum_steps
    progress = EpochProgress(epoch, updates_per_epoch, args.log_interval, utils.is_primary(args))

    data_start_time = update_start_time = time.time()
    optimizer.zero_grad()
    update_sample_count = 0
    skip_update = False  # a step of this update had a non-finite loss: the update is skipped
    for batch_idx, (input, target) in enumerate(loader):
        if position is not None:
            position.step = batch_idx
        last_batch = batch_idx == num_batches - 1
        need_update = last_batch or (batch_idx + 1) % accum_steps == 0
        update_idx = batch_idx // accum_steps
        if batch_idx >= last_batch_idx_to_accum:
            accum_steps = last_accum_steps
        if not args.prefetcher:
            input, target = _join_aug_splits(input, target)
            input, target = input.to(device=device, dtype=model_dtype), target.to(device=device)
            if mixup_fn is not None:
                input, target = mixup_fn(input, target)
        if args.channels_last:
            input = input.contiguous(memory_format=torch.channels_last)
        data_time_m.update(accum_steps * (time.time() - data_start_time))

        batch_size = input['patches'].shape[0] if naflex_mode else input.shape[0]
        loss_scale = _batch_loss_scale(args, batch_size, batch_size_reference, naflex_mode, scheduled_batch_mode,
                                       device)
        global_batch_size = batch_size * args.world_size if args.distributed else batch_size

        def _step():
            with amp_autocast():
                result = task(input, target)
            floats = nonfinite.check(result, epoch, batch_idx, args)
            if floats is None:  # skipped: no backward
                return floats
            loss = result['loss'] / accum_steps if accum_steps > 1 else result['loss']
            _backward(loss * loss_scale if loss_scale != 1.0 else loss, args, task, optimizer, loss_scaler,
                      second_order, need_update and not skip_update)
            return floats

        if has_no_sync and not need_update:
            with task.no_sync():
                floats = _step()
        else:
            floats = _step()

        if floats is None:
            skip_update = True
        else:
            loss_value, drloc_value = floats
            losses_m.update(loss_value, batch_size)
            if drloc_value is not None:
                drloc_m.update(drloc_value, batch_size)
        update_sample_count += global_batch_size
        if not need_update:
            data_start_time = time.time()
            continue

        num_updates += 1
        optimizer.zero_grad()  # also drops the gradients of a skipped update
        skip_update = False
        task.update_ema(step=num_updates)
        if args.synchronize_step and device.type in ('cuda', 'npu'):
            getattr(torch, device.type).synchronize()
        time_now = time.time()
        update_time_m.update(time_now - update_start_time)
        update_start_time = time_now

        lrs = [group['lr'] for group in optimizer.param_groups]
        lr = sum(lrs) / len(lrs)
        log_step = update_idx % args.log_interval == 0 or last_batch
        loss_now, loss_avg = losses_m.val, losses_m.avg
        drloc_now, drloc_avg = drloc_m.val, drloc_m.avg
        if log_step and args.distributed:  # every rank keeps its own meters: log the mean over ranks
            loss_now, loss_avg, drloc_now, drloc_avg = _mean_over_ranks(
                [loss_now, loss_avg, drloc_now, drloc_avg], args, device)
        rate = update_sample_count / max(update_time_m.val, 1e-9)
        values = OrderedDict(loss=loss_now, lr=lr, img_s=rate)
        if drloc_m.count:
            values['drloc'] = drloc_now
        progress.update(update_idx, last_batch, values, lambda: (
            f'Train: {epoch} [{update_idx:>4d}/{updates_per_epoch} ({100. * (update_idx + 1) / updates_per_epoch:>3.0f}%)]  '
            f'Loss: {loss_now:#.3g} ({loss_avg:#.3g})  '
            + (f'DRLoc: {drloc_now:#.3g} ({drloc_avg:#.3g}) x {task.drloc_lambda:g}  ' if drloc_m.count else '')
            + f'Time: {update_time_m.val:.3f}s, {rate:>7.2f}/s  LR: {lr:.3e}  '
            f'Data: {data_time_m.val:.3f} ({data_time_m.avg:.3f})'))
        if log_step and args.save_images and output_dir and utils.is_primary(args) and not naflex_mode:
            import torchvision.utils
            torchvision.utils.save_image(input, os.path.join(output_dir, f'train-batch-{batch_idx}.jpg'),
                                         padding=0, normalize=True)

        if args.recovery_interval and (update_idx + 1) % args.recovery_interval == 0:
            _weights_finite_or_stop(model, epoch, f'before the recovery checkpoint of step {update_idx}')
            if saver is not None:
                saver.save_recovery(epoch, batch_idx=update_idx)
        if lr_scheduler is not None:
            lr_scheduler.step_update(num_updates=num_updates, metric=losses_m.avg)
        update_sample_count = 0
        data_start_time = time.time()

    progress.close()
    if nonfinite.skipped and utils.is_primary(args):
        _logger.warning(f'Epoch {epoch}: {nonfinite.skipped} of {num_batches} steps skipped for a non-finite loss')
    if hasattr(optimizer, 'sync_lookahead'):
        optimizer.sync_lookahead()
    metrics = OrderedDict(loss=losses_m.avg if losses_m.count else math.nan)  # nan: every step was skipped
    if drloc_m.count or args.drloc_lambda > 0:
        metrics['drloc_loss'] = drloc_m.avg if drloc_m.count else math.nan
    if args.distributed:
        metrics = OrderedDict(zip(metrics.keys(), _mean_over_ranks(list(metrics.values()), args, device)))
    return metrics


def _join_aug_splits(input, target: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """The loader's batch as one tensor: --aug-splits without the prefetcher collates a list of (B, C, H, W)
    batches, one per split; they are joined split after split, (splits * B, C, H, W), with the targets repeated,
    as timm's prefetcher collate joins them (and as the JSD loss splits them)."""
    if not isinstance(input, (list, tuple)):
        return input, target
    return torch.cat(input), torch.cat([target] * len(input))


def _backward(loss: torch.Tensor, args: argparse.Namespace, task: nn.Module, optimizer: torch.optim.Optimizer,
              loss_scaler: Optional[NativeScaler], second_order: bool, need_update: bool) -> None:
    """Backward, then (on an update step) clip and step, through the AMP loss scaler when there is one."""
    clip_parameters = None
    if args.clip_grad is not None:
        clip_parameters = task.get_clip_parameters(exclude_head='agc' in args.clip_mode)
    if loss_scaler is not None:
        loss_scaler(loss, optimizer, clip_grad=args.clip_grad, clip_mode=args.clip_mode,
                    parameters=clip_parameters, create_graph=second_order, need_update=need_update)
        return
    loss.backward(create_graph=second_order)
    if need_update:
        if args.clip_grad is not None:
            utils.dispatch_clip_grad(clip_parameters, value=args.clip_grad, mode=args.clip_mode)
        optimizer.step()


def _batch_loss_scale(args: argparse.Namespace, batch_size: int, reference: Optional[float], naflex_mode: bool,
                      scheduled_batch_mode: bool, device: torch.device) -> float:
    """Loss multiplier for variable batch sizes (NaFlex / scheduled resolution); 1 otherwise."""
    if not (naflex_mode or scheduled_batch_mode):
        return 1.0
    mode = args.naflex_loss_scale if naflex_mode else args.variable_batch_loss_scale
    scale = 1.0
    if mode and mode != 'none':
        scale = batch_size / reference
        if mode == 'sqrt':
            scale = scale ** 0.5
    if naflex_mode and args.distributed:  # ranks may hold different batch sizes
        total = utils.reduce_tensor(torch.tensor(batch_size, device=device, dtype=torch.float32), 1)
        scale *= (args.world_size * batch_size / total).item()
    return scale


def _mean_over_ranks(values: List[float], args: argparse.Namespace, device: torch.device) -> List[float]:
    """Mean of each value over the ranks (collective: every rank must call it)."""
    tensor = torch.tensor(values, device=device, dtype=torch.float32)
    return utils.reduce_tensor(tensor, args.world_size).tolist()


def validate(
        model: nn.Module,
        loader,
        loss_fn: nn.Module,
        args: argparse.Namespace,
        device: torch.device,
        amp_autocast=suppress,
        model_dtype: Optional[torch.dtype] = None,
        log_suffix: str = '',
        task: Optional[nn.Module] = None,
) -> 'OrderedDict[str, float]':
    """The evaluator's metrics of `model` over the eval split (loss, top-1, top-5; or loss, mAP and F1 scores
    with --task multilabel, for every task including DRLoc), percent, exact over ranks (padding dropped)."""
    limit = evaluation_sample_limit(loader)
    if getattr(args, 'task', 'classification') == 'multilabel':  # its own unsmoothed BCE on the binary targets
        evaluator = MultiLabelClassificationEvaluator(device, max_samples=limit)
    elif task is not None:
        evaluator = task.create_evaluator(max_samples=limit)
        evaluator.criterion = loss_fn
    else:
        evaluator = ClassificationEvaluator(device, max_samples=limit, criterion=loss_fn)
    model.eval()
    last_idx = len(loader) - 1
    start = time.time()
    with torch.inference_mode():
        for batch_idx, (input, target) in enumerate(loader):
            if not args.prefetcher:
                input, target = input.to(device=device, dtype=model_dtype), target.to(device=device)
            if args.channels_last:
                input = input.contiguous(memory_format=torch.channels_last)
            with amp_autocast():
                output = model(input)
            if isinstance(output, (tuple, list)):
                output = output[0]
            if args.tta > 1:  # average the augmented copies of each image
                output = output.unfold(0, args.tta, args.tta).mean(dim=2)
                target = target[0:target.size(0):args.tta]
            evaluator.update(output.float(), target)
            if utils.is_primary(args) and (batch_idx == last_idx or batch_idx % args.log_interval == 0):
                running = '  '.join(f'{k}: {v:.3f}' for k, v in evaluator.summary().items())
                _logger.info(f'Test{log_suffix}: [{batch_idx:>4d}/{last_idx}]  Time: {time.time() - start:.3f}s  '
                             f'{running}')
    metrics = evaluator.compute(distributed=args.distributed)
    metrics = OrderedDict((k, metrics[k]) for k in evaluator.metric_names)
    if utils.is_primary(args):
        _logger.info(f'Eval{log_suffix}: ' + '  '.join(f'{k} {v:.4f}' for k, v in metrics.items()))
    return metrics


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
# main
# ---------------------------------------------------------------------------------------------------------

def _eval_metric(args: argparse.Namespace) -> str:
    """--eval-metric, or the default metric of the task's evaluator (top1; map with --task multilabel)."""
    evaluator_cls = MultiLabelClassificationEvaluator if args.task == 'multilabel' else ClassificationEvaluator
    metric = args.eval_metric or evaluator_cls.default_metric
    if metric not in evaluator_cls.metric_names:
        raise ConfigError(f'--eval-metric {metric} is not reported by {args.task} evaluation; use one of '
                          f'{", ".join(evaluator_cls.metric_names)}')
    return metric


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


def _check_before_start(args: argparse.Namespace) -> None:
    """Everything that can be checked without a model: flags, output folder, Hub token, device (the data dir's
    split folders follow in main, once the process knows its rank)."""
    _check_run_flags(args)
    _check_output(args)
    _eval_metric(args)
    if args.stop_epoch is not None and args.stop_epoch < 1:
        raise ConfigError(f'--stop-epoch {args.stop_epoch} is out of range: it counts completed epochs, use >= 1')
    try:
        check_push_args(args)  # no token: refuse now, not after hours of training
    except ValueError as e:
        raise ConfigError(str(e)) from e
    for module in args.device_modules or ():
        importlib.import_module(module)
    if args.device.startswith('cuda') and not torch.cuda.is_available():
        raise ConfigError(f'--device {args.device} but no CUDA device is available; pass --device cpu')


def main() -> int:
    """Parse the flags, build model, task, data, optimizer and schedule, then train and evaluate each epoch.

    Returns ExitCode.OK, or the status of a failed `--push-to-hub` export or upload (ExitCode).
    """
    utils.setup_default_logging()
    args, args_text = _parse_args()
    _check_before_start(args)
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.benchmark = True

    args.prefetcher = not args.no_prefetcher
    args.grad_accum_steps = max(1, args.grad_accum_steps)
    device = utils.init_distributed_device(args)
    if args.distributed:
        _logger.info(f'Distributed training: process {args.rank} of {args.world_size}, device {args.device}.')
    else:
        _logger.info(f'Training with a single process on {args.device}.')

    model_dtype = getattr(torch, args.model_dtype) if args.model_dtype else None
    if model_dtype == torch.float16:
        _logger.warning('float16 weights train poorly; prefer --model-dtype bfloat16 or --amp')

    utils.random_seed(args.seed, args.rank)
    if args.fuser:
        utils.set_jit_fuser(args.fuser)
    if args.fast_norm:
        set_fast_norm()

    _check_data_dir(args)  # the split folders, before anything is built
    model = _build_model(args)
    if utils.is_primary(args):
        _logger.info(f'Model {safe_model_name(args.model)} created, param count: '
                     f'{sum(p.numel() for p in model.parameters())}')
    data_config = resolve_data_config(vars(args), model=model, verbose=utils.is_primary(args))

    num_aug_splits = _aug_splits(args)
    model, model_patch_size = _place_model(args, model, device, model_dtype, num_aug_splits)
    amp_autocast, loss_scaler = _amp(args, device, model_dtype)

    mixup_active = _mixup_active(args)
    mixup_args = {}
    if mixup_active:
        mixup_args = dict(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
                          prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                          label_smoothing=args.smoothing, num_classes=args.num_classes,
                          multi_label=args.task == 'multilabel')
    try:
        train_loss_fn = _train_loss(args, num_classes=args.num_classes, verbose=utils.is_primary(args))
    except (ValueError, OSError) as e:
        raise ConfigError(str(e)) from e
    train_loss_fn = train_loss_fn.to(device=device)
    validate_loss_fn = nn.CrossEntropyLoss().to(device=device)

    # the task probes the model (DRLoc grids) before any data is read, so bad DRLoc flags fail fast
    task = _build_task(args, model, train_loss_fn, data_config['input_size'], device, model_dtype)
    if args.drloc_lambda > 0:
        _check_head_memory(args, task, device)

    input_img_mode = args.input_img_mode or ('RGB' if data_config['input_size'][0] == 3 else 'L')
    dataset_train, dataset_eval = _build_datasets(args, input_img_mode)
    _check_num_classes(args, dataset_train)
    loader_train, loader_eval, mixup_fn, naflex_mode, scheduled_batch_mode, batch_size_reference = _build_loaders(
        args, data_config, dataset_train, dataset_eval, device, model_dtype, num_aug_splits, mixup_active,
        mixup_args, model_patch_size)
    if not args.lr:
        args.lr = _scaled_lr(args, batch_size_reference)

    model = task.get_trainable_module()
    eval_model = task.get_eval_model()
    optimizer = create_optimizer_v2(model, **optimizer_kwargs(cfg=args), **args.opt_kwargs)
    if utils.is_primary(args):
        defaults = dict(copy.deepcopy(optimizer.defaults), weight_decay=args.weight_decay)
        _logger.info(f'Created {type(optimizer).__name__} ({args.opt}) optimizer: '
                     + ', '.join(f'{k}: {v}' for k, v in defaults.items()))

    output_dir = _experiment_dir(args, data_config['input_size'])
    resume_path, in_place = _resolve_resume(args, output_dir)
    resume_epoch, resume_ema = None, False
    if resume_path:
        try:
            resume_epoch, resume_ema = _resume_checkpoint(args, task, resume_path, optimizer, loss_scaler)
        except (RuntimeError, ValueError, KeyError) as e:  # another model, other DRLoc heads, other optimizer
            raise _checkpoint_misfit('--resume', resume_path, e) from e

    if args.model_ema:  # after device placement, before DDP
        task.setup_ema(decay=args.model_ema_decay, use_warmup=args.model_ema_warmup,
                       device='cpu' if args.model_ema_force_cpu else None)
        if resume_ema:
            load_task_ema_checkpoint(task, resume_path)

    if args.torchcompile:
        if utils.is_primary(args):
            _logger.info(f'Compiling with backend={args.torchcompile}, mode={args.torchcompile_mode}')
        task.compile(backend=args.torchcompile, mode=args.torchcompile_mode)
        model, eval_model = task.get_trainable_module(), task.get_eval_model()
        if task.has_ema():
            task.compile_ema(backend=args.torchcompile, mode=args.torchcompile_mode)

    if args.distributed:
        task.prepare_distributed(device_ids=None if device.type == 'cpu' else [device],
                                 broadcast_buffers=not args.no_ddp_bb)
        model = task.get_trainable_module()

    eval_metric = _eval_metric(args) if loader_eval is not None else 'loss'
    decreasing_metric = eval_metric == 'loss'
    updates_per_epoch = (len(loader_train) + args.grad_accum_steps - 1) // args.grad_accum_steps
    lr_scheduler, num_epochs = create_scheduler_v2(
        optimizer, **scheduler_kwargs(args, decreasing_metric=decreasing_metric), updates_per_epoch=updates_per_epoch)
    stop_at = _stop_epoch_check(args, num_epochs)
    if utils.is_primary(args):
        _warn_unreached_lambda(args, num_epochs)
    start_epoch = args.start_epoch if args.start_epoch is not None else (resume_epoch or 0)
    if lr_scheduler is not None and start_epoch > 0:
        if args.sched_on_updates:
            lr_scheduler.step_update(start_epoch * updates_per_epoch)
        else:
            lr_scheduler.step(start_epoch)

    saver = None
    if utils.is_primary(args):
        saver = _setup_output(args, args_text, output_dir, model, optimizer, loss_scaler, task, decreasing_metric,
                              resume_path, in_place, start_epoch)
        warmup = ('warm-up added before the schedule' if args.warmup_prefix else 'warm-up inside the schedule')
        _logger.info(f'Scheduled epochs: {num_epochs} ({warmup}); running epochs {start_epoch}..{stop_at - 1}; '
                     f'LR stepped per {"epoch" if lr_scheduler.t_in_epochs else "update"}.')
    else:
        output_dir = None
    if start_epoch >= stop_at and utils.is_primary(args):
        _logger.info(f'Nothing to train: the run is at epoch {start_epoch} and stops at {stop_at}.')

    results = _train_epochs(
        args, task, model, eval_model, optimizer, lr_scheduler, saver, output_dir, loader_train, loader_eval,
        validate_loss_fn, device, amp_autocast, loss_scaler, model_dtype, mixup_fn, naflex_mode,
        scheduled_batch_mode, batch_size_reference, start_epoch, stop_at, num_epochs, eval_metric)

    if args.distributed:
        torch.distributed.destroy_process_group()
    if saver is not None and saver.best_metric is not None:
        _logger.info(f'*** Best metric: {saver.best_metric} (epoch {saver.best_epoch})')
    if not utils.is_primary(args):
        return 0
    ranked = sorted(results, key=lambda r: r.get('validation', r['train']).get(eval_metric, 0),
                    reverse=decreasing_metric)
    print(f'--result\n{json.dumps(ranked[-10:], indent=4)}')
    class_to_idx = getattr(getattr(dataset_train, 'reader', None), 'class_to_idx', None) or {}
    return push_after_training(args, output_dir, data_config=data_config,
                               class_names=sorted(class_to_idx, key=class_to_idx.get) or None)


def _build_loaders(
        args: argparse.Namespace,
        data_config: Dict[str, Any],
        dataset_train,
        dataset_eval,
        device: torch.device,
        model_dtype: Optional[torch.dtype],
        num_aug_splits: int,
        mixup_active: bool,
        mixup_args: Dict[str, Any],
        model_patch_size: Optional[Tuple[int, int]],
) -> Tuple[Any, Any, Optional[Mixup], bool, bool, float]:
    """Train and eval loaders (standard, scheduled-resolution or NaFlex), the host-side mixup, the batch reference."""
    train_interpolation = data_config['interpolation'] if args.no_aug or not args.train_interpolation \
        else args.train_interpolation
    common = dict(mean=data_config['mean'], std=data_config['std'], pin_memory=args.pin_mem,
                  img_dtype=model_dtype or torch.float32, device=device, distributed=args.distributed,
                  use_prefetcher=args.prefetcher)
    train_kwargs = dict(
        batch_size=args.batch_size, is_training=True, no_aug=args.no_aug, re_prob=args.reprob,
        re_mode=args.remode, re_count=args.recount, re_split=args.resplit, train_crop_mode=args.train_crop_mode,
        scale=args.scale, ratio=args.ratio, hflip=args.hflip, vflip=args.vflip, color_jitter=args.color_jitter,
        color_jitter_prob=args.color_jitter_prob, grayscale_prob=args.grayscale_prob,
        gaussian_blur_prob=args.gaussian_blur_prob, auto_augment=args.aa, num_aug_repeats=args.aug_repeats,
        num_aug_splits=num_aug_splits, interpolation=train_interpolation, num_workers=args.workers,
        worker_seeding=args.worker_seeding)
    mixup_fn = None
    naflex_mode = bool(args.naflex_loader)
    scheduled_batch_mode = args.train_img_sizes is not None
    batch_size_reference = float(args.batch_size)
    if naflex_mode:
        from timm.data import create_naflex_loader, NaFlexMixup
        if num_aug_splits > 1:
            raise ConfigError('--aug-splits does not work with --naflex-loader; drop one of them')
        naflex_mixup = None
        if mixup_active:
            naflex_mixup = NaFlexMixup(**{k: v for k, v in mixup_args.items() if k not in ('mode', 'cutmix_minmax')})
        if model_patch_size is None:
            model_patch_size = (16, 16)
            _logger.warning(f'{args.model} does not report its patch size; NaFlex uses {model_patch_size}')
        patch_kwargs = dict(patch_size=model_patch_size)
        if args.naflex_patch_sizes:
            patch_kwargs = dict(patch_size_choices=args.naflex_patch_sizes)
            if args.naflex_patch_size_probs:
                if len(args.naflex_patch_size_probs) != len(args.naflex_patch_sizes):
                    raise ConfigError('--naflex-patch-size-probs needs one value per --naflex-patch-sizes entry')
                patch_kwargs['patch_size_choice_probs'] = args.naflex_patch_size_probs
        loader_train = create_naflex_loader(
            dataset=dataset_train, train_seq_lens=args.naflex_train_seq_lens, mixup_fn=naflex_mixup,
            rank=args.rank, world_size=args.world_size,
            patchify_channels_last=not args.naflex_patchify_channels_first, **patch_kwargs, **common,
            **train_kwargs)
    else:
        collate_fn = None
        if mixup_active:
            if args.prefetcher:
                if num_aug_splits:
                    raise ConfigError('mixup/cutmix with --aug-splits needs --no-prefetcher')
                collate_fn = FastCollateMixup(**mixup_args)
            else:
                mixup_fn = Mixup(**mixup_args)
        if num_aug_splits > 1:
            dataset_train = AugMixDataset(dataset_train, num_splits=num_aug_splits)
        loader_train = create_loader(
            dataset_train, input_size=data_config['input_size'], input_size_choices=args.train_img_sizes,
            batch_size_choices=args.train_batch_sizes, batch_choice_weights=args.train_size_probs,
            batch_choice_seed=args.seed, batch_choice_schedule=args.train_size_schedule,
            batch_schedule_epochs=args.epochs if args.train_size_schedule == 'progressive' else None,
            batch_schedule_spread=args.train_size_schedule_spread,
            batch_schedule_random_mix=args.train_size_random_mix, num_batches=args.train_batches_per_epoch,
            collate_fn=collate_fn, use_multi_epochs_loader=args.use_multi_epochs_loader, **common, **train_kwargs)
        if scheduled_batch_mode:
            batch_size_reference = loader_train.batch_sampler.average_batch_size
            if utils.is_primary(args):
                _logger.info(f'Scheduled resolutions {args.train_img_sizes}, batch sizes '
                             f'{loader_train.batch_sampler.batch_sizes}, average batch {batch_size_reference:.2f}.')

    loader_eval = None
    if args.val_split and dataset_eval is not None:
        eval_workers = args.workers
        if args.distributed and ('tfds' in args.dataset or 'wds' in args.dataset):
            eval_workers = min(2, args.workers)  # fewer workers pad less for sharded iterable datasets
        eval_kwargs = dict(batch_size=args.validation_batch_size or args.batch_size, is_training=False,
                           interpolation=data_config['interpolation'], num_workers=eval_workers,
                           crop_pct=data_config['crop_pct'])
        if naflex_mode:
            from timm.data import create_naflex_loader
            loader_eval = create_naflex_loader(
                dataset=dataset_eval, patch_size=model_patch_size, max_seq_len=args.naflex_max_seq_len,
                patchify_channels_last=not args.naflex_patchify_channels_first, **common, **eval_kwargs)
        else:
            loader_eval = create_loader(dataset_eval, input_size=data_config['input_size'], **common, **eval_kwargs)
    return loader_train, loader_eval, mixup_fn, naflex_mode, scheduled_batch_mode, batch_size_reference


def _setup_output(
        args: argparse.Namespace,
        args_text: str,
        output_dir: str,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        loss_scaler: Optional[NativeScaler],
        task: nn.Module,
        decreasing_metric: bool,
        resume_path: str,
        in_place: bool,
        start_epoch: int,
) -> utils.CheckpointSaver:
    """Primary process: the experiment folder, args.yaml, the checkpoint saver and summary.csv state, wandb.

    A fresh run (not continuing in place) into a folder that holds an earlier run moves that run aside first
    (see _move_earlier_run_aside): a finished run's files are never overwritten, deleted or mixed in.
    """
    if not in_place:
        _move_earlier_run_aside(output_dir)
    output_dir = utils.get_outdir(output_dir)
    saver = AtomicCheckpointSaver(
        model=model, optimizer=optimizer, args=args, amp_scaler=loss_scaler, checkpoint_dir=output_dir,
        recovery_dir=output_dir, decreasing=decreasing_metric, max_history=args.checkpoint_hist, task=task)
    summary_path = os.path.join(output_dir, 'summary.csv')
    if in_place:  # same folder: keep the ranked history and best metric, and the summary rows already done
        saver.load_state_dict_from_checkpoint(resume_path)
        utils.trim_summary(summary_path, start_epoch)
    with open(os.path.join(output_dir, 'args.yaml'), 'w') as f:
        f.write(args_text)
    if args.log_wandb:
        if has_wandb:
            if args.wandb_resume_id and not args.resume:
                raise ConfigError('--wandb-resume-id continues a wandb run, which needs --resume')
            wandb.init(project=args.wandb_project, name=os.path.basename(output_dir), config=args,
                       tags=args.wandb_tags, resume='must' if args.wandb_resume_id else None,
                       id=args.wandb_resume_id or None)
        else:
            _logger.warning('--log-wandb given but wandb is not installed (pip install wandb); metrics go to '
                            'summary.csv only')
    return saver


def _move_earlier_run_aside(output_dir: str) -> None:
    """Move the run in `output_dir` (a last checkpoint or a summary.csv) to the first free `<output_dir>.N`, so a
    fresh run starts in an empty folder and the earlier one stays whole; log both folders in one line."""
    if not any(os.path.exists(os.path.join(output_dir, name)) for name in ('last' + CHECKPOINT_EXT, 'summary.csv')):
        return
    number = 1
    while os.path.lexists(f'{output_dir}.{number}'):
        number += 1
    aside = f'{output_dir}.{number}'
    os.rename(output_dir, aside)
    _logger.warning(f'{output_dir} already held a run: it is now in {aside}, and this fresh run starts in '
                    f'{output_dir}; to continue the earlier run instead, pass --resume auto --experiment '
                    f'{os.path.basename(aside)}, and give each new run its own --experiment')


def _train_epochs(
        args: argparse.Namespace,
        task: nn.Module,
        model: nn.Module,
        eval_model: nn.Module,
        optimizer: torch.optim.Optimizer,
        lr_scheduler,
        saver: Optional[utils.CheckpointSaver],
        output_dir: Optional[str],
        loader_train,
        loader_eval,
        validate_loss_fn: nn.Module,
        device: torch.device,
        amp_autocast,
        loss_scaler: Optional[NativeScaler],
        model_dtype: Optional[torch.dtype],
        mixup_fn: Optional[Mixup],
        naflex_mode: bool,
        scheduled_batch_mode: bool,
        batch_size_reference: float,
        start_epoch: int,
        stop_at: int,
        num_epochs: int,
        eval_metric: str,
) -> List[Dict[str, Any]]:
    """Epochs start_epoch..stop_at-1: train, evaluate, write the summary, checkpoint, step the schedule."""
    drloc_on = args.drloc_lambda > 0
    nonfinite = NonFiniteSteps(args.max_nonfinite_steps if loss_scaler is not None else None)
    results = []
    position = RunPosition(start_epoch)
    try:
        for epoch in range(start_epoch, stop_at):
            position.epoch, position.step = epoch, None
            _set_loader_epoch(loader_train, epoch)
            if drloc_on:
                task.set_drloc_lambda(drloc_lambda_for_epoch(args, epoch, num_epochs))
            train_metrics = train_one_epoch(
                epoch, model, loader_train, optimizer, args, task=task, device=device, lr_scheduler=lr_scheduler,
                saver=saver, output_dir=output_dir, amp_autocast=amp_autocast, loss_scaler=loss_scaler,
                model_dtype=model_dtype, mixup_fn=mixup_fn, naflex_mode=naflex_mode,
                scheduled_batch_mode=scheduled_batch_mode, batch_size_reference=batch_size_reference,
                nonfinite=nonfinite, position=position)
            position.step = None
            _weights_finite_or_stop(model, epoch, 'at the end of the epoch')
            if args.distributed and args.dist_bn in ('broadcast', 'reduce'):
                utils.distribute_bn(model, args.world_size, args.dist_bn == 'reduce')

            completed = epoch + 1
            milestone = bool(args.save_epochs) and completed in args.save_epochs
            if completed % args.val_interval != 0 and completed not in (num_epochs, stop_at) and not milestone:
                if utils.is_primary(args):
                    _logger.info(f'Epoch {epoch}: no eval or checkpoint (--val-interval {args.val_interval})')
                if lr_scheduler is not None:
                    lr_scheduler.step(completed, metric=None)
                continue

            eval_metrics = None
            if loader_eval is not None:
                eval_metrics = validate(eval_model, loader_eval, validate_loss_fn, args, device=device,
                                        amp_autocast=amp_autocast, model_dtype=model_dtype, task=task)
                if task.has_ema() and not args.model_ema_force_cpu:
                    if args.distributed and args.dist_bn in ('broadcast', 'reduce'):
                        utils.distribute_bn(task.get_trainable_module(ema=True), args.world_size,
                                            args.dist_bn == 'reduce')
                    eval_metrics = validate(task.get_eval_model(ema=True), loader_eval, validate_loss_fn, args,
                                            device=device, amp_autocast=amp_autocast, model_dtype=model_dtype,
                                            log_suffix=' (EMA)', task=task)

            if output_dir is not None:
                lrs = [group['lr'] for group in optimizer.param_groups]
                append_summary(os.path.join(output_dir, SUMMARY_FILE), epoch, train_metrics, eval_metrics,
                               lr=sum(lrs) / len(lrs), drloc_lambda=task.drloc_lambda if drloc_on else None,
                               log_wandb=args.log_wandb and has_wandb)
            latest_metric = (eval_metrics or train_metrics)[eval_metric]
            if saver is not None:
                saver.save_checkpoint(epoch, metric=latest_metric)
                if milestone:
                    saver.save_milestone(completed)
            if lr_scheduler is not None:
                lr_scheduler.step(completed, latest_metric)
            results.append({'epoch': epoch, 'train': train_metrics, **({'validation': eval_metrics}
                                                                        if eval_metrics is not None else {})})
    except KeyboardInterrupt:  # Ctrl-C: stop here, in one line; no end-of-run output, export or upload follows
        raise KeyboardInterrupt(f'interrupted at {position.describe()}; '
                                f'{_continue_hint(args, output_dir)}') from None
    return results


def run() -> None:
    """Console entry: main(), with input errors, non-finite losses, interrupts and failed Hub pushes reported as
    one line and the status ExitCode gives each."""
    try:
        status = main()
    except ConfigError as e:
        _logger.error(f'error: {e}')
        sys.exit(ExitCode.BAD_INPUT)
    except NonFiniteLossError as e:
        _logger.error(f'error: {e}')
        sys.exit(ExitCode.NON_FINITE_LOSS)
    except KeyboardInterrupt as e:  # raised with its line by the training loop; bare before or after it
        _logger.error(str(e) or 'interrupted outside the training epochs; the checkpoints already written are intact')
        sys.exit(ExitCode.INTERRUPTED)
    sys.exit(int(status or ExitCode.OK))


if __name__ == '__main__':
    run()
