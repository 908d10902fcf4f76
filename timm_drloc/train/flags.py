"""The command line of train_drloc.py: timm's train.py flags (same names, defaults and meanings), the DRLoc and
Hub flags, and -c/--config YAML files read as the command line would read them.

`build_parser()` makes a new parser at each call, so parsing (with a config file's defaults too) changes no
module-level object; `load_config()` checks each value of a config file against its flag.

    parser = build_parser()
    parser.set_defaults(**load_config(parser, 'config.yaml'))   # ConfigError naming the key and the value
    args = parser.parse_args(argv)
"""
import argparse
import logging
import os
import reprlib
from typing import Any, Dict, Optional

import yaml
from timm import utils
from timm.data.readers.targets import TARGET_FORMATS
from timm.loss import LOSS_TYPES

from timm_drloc.errors import ConfigError
from timm_drloc.settings import add_drloc_args

from .publish import add_push_args

_logger = logging.getLogger('train_drloc')

CONFIG_MAX_VALUES = 10_000  # scalars in a -c config, counted as written out: a flag file holds a few hundred


def build_config_parser() -> argparse.ArgumentParser:
    """The pre-parser that finds -c/--config before the flags are parsed."""
    config_parser = argparse.ArgumentParser(description='Training config file', add_help=False)
    config_parser.add_argument('-c', '--config', default='', type=str, metavar='FILE',
                               help='YAML file of flag values, used as defaults (command-line flags win)')
    return config_parser


def build_parser(prog: Optional[str] = None) -> argparse.ArgumentParser:
    """All flags of train_drloc.py: timm's train.py flags by group, then the DRLoc and Hub flags. `prog` names the
    command in the usage line (default: the script's name)."""
    parser = argparse.ArgumentParser(
        prog=prog, description='timm image classification training with the DRLoc auxiliary loss')
    parser.add_argument('data', nargs='?', metavar='DIR', const=None,
                        help='dataset root (positional form kept for old commands; prefer --data-dir)')

    _add_data_flags(parser.add_argument_group('Dataset parameters'))
    _add_model_flags(parser.add_argument_group('Model parameters'))
    _add_device_flags(parser.add_argument_group('Device parameters'))
    _add_optimizer_flags(parser.add_argument_group('Optimizer parameters'))
    _add_schedule_flags(parser.add_argument_group('Learning rate schedule parameters'))
    _add_augmentation_flags(parser.add_argument_group('Augmentation and regularization parameters'))
    _add_batch_norm_flags(parser.add_argument_group('Batch norm parameters', 'Honoured by models that accept them.'))
    _add_ema_flags(parser.add_argument_group('Model exponential moving average parameters'))
    _add_misc_flags(parser.add_argument_group('Miscellaneous parameters'))
    _add_distillation_flags(parser)
    add_drloc_args(parser)
    add_push_args(parser.add_argument_group('Hugging Face Hub parameters',
                                            "Upload the trained model in timm's Hub format."))
    return parser


def _add_data_flags(group: argparse._ArgumentGroup) -> None:
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


def _add_model_flags(group: argparse._ArgumentGroup) -> None:
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


def _add_device_flags(group: argparse._ArgumentGroup) -> None:
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


def _add_optimizer_flags(group: argparse._ArgumentGroup) -> None:
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


def _add_schedule_flags(group: argparse._ArgumentGroup) -> None:
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


def _add_augmentation_flags(group: argparse._ArgumentGroup) -> None:
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


def _add_batch_norm_flags(group: argparse._ArgumentGroup) -> None:
    group.add_argument('--bn-momentum', type=float, default=None, help='BatchNorm momentum')
    group.add_argument('--bn-eps', type=float, default=None, help='BatchNorm epsilon')
    group.add_argument('--sync-bn', action='store_true', help='synchronized BatchNorm across processes')
    group.add_argument('--dist-bn', type=str, default='reduce',
                       help='share BatchNorm statistics after each epoch: broadcast, reduce or ""')
    group.add_argument('--split-bn', action='store_true', help='one BatchNorm per augmentation split')


def _add_ema_flags(group: argparse._ArgumentGroup) -> None:
    group.add_argument('--model-ema', action='store_true', default=False, help='keep an EMA of the weights')
    group.add_argument('--model-ema-force-cpu', action='store_true', default=False,
                       help='keep the EMA on the CPU of rank 0; the EMA is then not evaluated')
    group.add_argument('--model-ema-decay', type=float, default=0.9998, help='EMA decay')
    group.add_argument('--model-ema-warmup', action='store_true', help='warm the EMA decay up')


def _add_misc_flags(group: argparse._ArgumentGroup) -> None:
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


def _add_distillation_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('--kd-model-name', default=None, type=str,
                        help='teacher model for distillation: a timm model name, or local-dir:PATH')
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



# ---------------------------------------------------------------------------------------------------------
# -c/--config: a YAML file of flag values, each checked and converted as the command line would

_SHOWN_VALUE = reprlib.Repr()  # a repr cut at every level: a config value may be huge
_SHOWN_VALUE.maxlevel, _SHOWN_VALUE.maxstring, _SHOWN_VALUE.maxother = 2, 60, 60
_SHOWN_VALUE.maxlist = _SHOWN_VALUE.maxtuple = _SHOWN_VALUE.maxdict = 4


def shown(value: Any) -> str:
    """A value as an error message shows it: a repr cut to a few dozen characters, whatever its size."""
    return _SHOWN_VALUE.repr(value)


def one_line(text: str, size: int = 200) -> str:
    """`text` on one line, cut to `size` characters (library messages can quote a whole value)."""
    text = ' '.join(text.split())
    return text if len(text) <= size else text[:size] + '...'


def load_config(parser: argparse.ArgumentParser, path: str) -> Dict[str, Any]:
    """Flag defaults from the YAML file `path`: each value checked and converted as the command line would
    convert it; keys that name no flag are warned about and dropped.

    Raises:
        ConfigError: a missing or invalid file, or a value its flag cannot take, naming the key and the value.
    """
    if not os.path.isfile(path):
        raise ConfigError(f'config file {path!r} does not exist; pass the path of a YAML file to -c/--config')
    with open(path, 'rb') as f:  # bytes: PyYAML detects the encoding, and reports a binary file as bad YAML
        try:
            cfg = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f'config {path} is not valid YAML: {one_line(str(e))}') from None
    if not isinstance(cfg, dict):
        raise ConfigError(f'config {path} must be a mapping of flag names to values, got a {type(cfg).__name__}')
    if _scalars_in(cfg, CONFIG_MAX_VALUES) > CONFIG_MAX_VALUES:
        raise ConfigError(f'config {path} expands to more than {CONFIG_MAX_VALUES} values (YAML aliases repeated '
                          f'inside each other?); a config holds flag values: write them out plainly')
    actions = {a.dest: a for a in parser._actions if a.dest != 'help'}
    defaults = {}
    for key, value in cfg.items():
        dest = str(key).replace('-', '_')
        if dest not in actions:
            _logger.warning(f'config {path}: {shown(key)} is not a train_drloc.py flag; it is ignored')
            continue
        defaults[dest] = _FlagValue(actions[dest], f'config {path}: {key}').read(value)
    return defaults


def _scalars_in(value: Any, limit: int) -> int:
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


class _FlagValue:
    """Reads a config value for one flag: a switch, a key=value mapping, a list or a single value."""

    def __init__(self, action: argparse.Action, where: str):
        self.action, self.where = action, where  # where: 'config PATH: KEY', the start of every message

    def fail(self, value: Any, problem: str) -> ConfigError:
        return ConfigError(f'{self.where}={shown(value)} {problem}')

    def read(self, value: Any) -> Any:
        action = self.action
        if value is None:
            return None
        if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            if not isinstance(value, bool):
                raise self.fail(value, 'must be true or false')
            return value
        if isinstance(action, utils.ParseKwargs):
            if not isinstance(value, dict):
                raise self.fail(value, 'must be a mapping of names to values')
            return value
        if action.nargs in ('+', '*') or isinstance(action.nargs, int):
            if not isinstance(value, (list, tuple)):
                raise self.fail(value, 'must be a list')
            if isinstance(action.nargs, int) and len(value) != action.nargs:
                raise ConfigError(f'{self.where} needs {action.nargs} values, got {len(value)}')
            if action.nargs == '+' and not value and action.default != []:  # [] is the default of e.g. wandb_tags
                raise ConfigError(f'{self.where} needs at least one value')
            return [self.scalar(v) for v in value]
        if isinstance(value, (list, tuple, dict)):
            raise self.fail(value, f'must be a single value, not a {type(value).__name__}')
        return self.scalar(value)

    def scalar(self, value: Any) -> Any:
        """One value converted by the flag's type (numbers from YAML strings such as '3e-4' too), in its choices."""
        convert = self.action.type
        if value is None:
            return None
        if convert in (int, float):
            value = self.number(value, convert)
        elif convert in (None, str):
            if isinstance(value, (list, dict)):
                raise self.fail(value, 'must be a single string')
            value = value if isinstance(value, str) else str(value)
        elif isinstance(value, str):
            try:
                value = convert(value)
            except (TypeError, ValueError) as e:
                raise self.fail(value, f'is not valid ({one_line(str(e))})') from None
        if self.action.choices is not None and value not in self.action.choices:
            raise self.fail(value, f'is not one of {list(self.action.choices)}')
        return value

    def number(self, value: Any, convert: type) -> Any:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise self.fail(value, f'must be a number ({convert.__name__})')
        try:
            number = convert(value) if isinstance(value, str) else value
        except ValueError:
            raise self.fail(value, f'is not a valid {convert.__name__}') from None
        if convert is int and isinstance(number, float):
            if not number.is_integer():
                raise self.fail(value, 'must be a whole number')
            number = int(number)
        return convert(number)
