"""The run's folder and checkpoints: where it writes, checkpoints that appear whole, and where a run continues from.

A fresh run into a folder that holds an earlier run moves that run aside; `--resume auto` continues in place
from the newest readable checkpoint (recovery files written inside an epoch included); a bare state dict or a
checkpoint without DRLoc heads resumes with what it holds. Checkpoints are read with timm_drloc.checkpoint, so
an unreadable or unsafe file is named, never loaded.
"""
import argparse
import errno
import logging
import os
import random
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Dict, Optional, Sequence

import numpy as np
import torch
from timm import utils
from timm.models import load_state_dict, safe_model_name
from timm.task import TrainingTask, resume_task_checkpoint
from timm.utils import NativeScaler
from timm.utils.model import unwrap_model

from timm_drloc.checkpoint import is_weights_only, read_checkpoint, saved_args
from timm_drloc.errors import CheckpointError, ConfigError, first_lines
from timm_drloc.summary import SUMMARY_FILE

_logger = logging.getLogger('train_drloc')

CHECKPOINT_EXT = '.pth.tar'
LAST = 'last' + CHECKPOINT_EXT


def experiment_dir(args: argparse.Namespace, input_size: Sequence[int]) -> str:
    """Where the run writes: <output or ./output/train>/<experiment or date-model-size>."""
    name = args.experiment or '-'.join([
        datetime.now().strftime('%Y%m%d-%H%M%S'), safe_model_name(args.model), str(input_size[-1])])
    return os.path.join(args.output if args.output else './output/train', name)


def open_run_folder(args: argparse.Namespace, args_text: str, output_dir: str, in_place: bool,
                    start_epoch: int) -> str:
    """Primary process: the experiment folder, made ready for this run; returns its path.

    A fresh run (not continuing in place) into a folder that holds an earlier run moves that run aside first
    (see move_earlier_run_aside): a finished run's files are never overwritten, deleted or mixed in. A run
    continuing in place keeps the summary rows of the epochs before `start_epoch` (timm's trim_summary).
    args.yaml records the command line; wandb starts when asked for.
    """
    if not in_place:
        move_earlier_run_aside(output_dir)
    output_dir = utils.get_outdir(output_dir)
    if in_place:
        utils.trim_summary(os.path.join(output_dir, SUMMARY_FILE), start_epoch)
    with open(os.path.join(output_dir, 'args.yaml'), 'w') as f:
        f.write(args_text)
    if args.log_wandb:
        try:
            import wandb
        except ImportError:
            _logger.warning('--log-wandb given but wandb is not installed (pip install wandb); metrics go to '
                            'summary.csv only')
        else:
            wandb.init(project=args.wandb_project, name=os.path.basename(output_dir), config=args,
                       tags=args.wandb_tags, resume='must' if args.wandb_resume_id else None,
                       id=args.wandb_resume_id or None)
    return output_dir


def move_earlier_run_aside(output_dir: str) -> None:
    """Move the run in `output_dir` (a last checkpoint or a summary.csv) to the first free `<output_dir>.N`, so a
    fresh run starts in an empty folder and the earlier one stays whole; log both folders in one line."""
    if not any(os.path.exists(os.path.join(output_dir, name)) for name in (LAST, SUMMARY_FILE)):
        return
    number = 1
    while os.path.lexists(f'{output_dir}.{number}'):
        number += 1
    aside = f'{output_dir}.{number}'
    os.rename(output_dir, aside)
    _logger.warning(f'{output_dir} already held a run: it is now in {aside}, and this fresh run starts in '
                    f'{output_dir}; to continue the earlier run instead, pass --resume auto --experiment '
                    f'{os.path.basename(aside)}, and give each new run its own --experiment')


class AtomicCheckpointSaver(utils.CheckpointSaver):
    """timm's CheckpointSaver, with every file it writes appearing whole or not at all.

    timm already writes `last` (and recovery files) to a temporary file and renames it into place. The
    copies it makes of `last` (checkpoint-N, model_best, milestone-N) are hard links, or byte copies where
    links are not possible; here they too go through a temporary name and an atomic rename, so a run killed
    mid-save never leaves a truncated checkpoint, and the previous model_best stays until the new one is whole.
    A write that fails (a full disk) or is interrupted (Ctrl-C) removes its temporary file; a failed write
    ends the run with a ConfigError naming the cause and the folder, the checkpoints already written untouched.
    """

    def state_dict(self, epoch: Optional[int] = None, metric: Optional[float] = None) -> Dict[str, Any]:
        """timm's bookkeeping for a resume into the same folder, plus the random generators' states: a resumed
        single-process run then draws the pairs, shuffles and augmentations a straight run would."""
        return dict(super().state_dict(epoch, metric), rng=rng_state())

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
                              f'{continue_hint(self.args, self.checkpoint_dir)}') from e


def rng_state() -> Dict[str, Any]:
    """The states of the generators training draws from: torch's (CPU and each CUDA device), numpy's and Python's,
    as tensors, ints and tuples (what torch.load reads with weights_only=True)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        'torch': torch.get_rng_state(),
        'cuda': torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        'numpy': (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)),
        'python': random.getstate(),
    }


def set_rng_state(state: Dict[str, Any]) -> None:
    """Put the generators back in the states `rng_state()` gave."""
    torch.set_rng_state(state['torch'])
    if state['cuda'] and torch.cuda.is_available() and len(state['cuda']) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state['cuda'])
    kind, keys, pos, has_gauss, gauss = state['numpy']
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state['python']))


def continue_hint(args: Optional[argparse.Namespace], output_dir: Optional[str]) -> str:
    """How to go on from the checkpoints a stopped run left, as the end of a sentence ('continue with ...')."""
    if args is None or output_dir is None:
        return 'continue with --resume and the last checkpoint'
    last = os.path.join(output_dir, LAST)
    if not os.path.exists(last):
        return 'run it again (no checkpoint was written yet)'
    if args.experiment:
        return 'continue with the same command and --resume auto'
    return f'continue with --resume {last}'


# ---------------------------------------------------------------------------------------------------------
# reading checkpoints: --resume, --initial-checkpoint

def checkpoint_problem(path: str, weights_only_ok: bool = False) -> Optional[str]:
    """None when `path` loads as a training checkpoint (with `weights_only_ok`, also as a model state dict
    without an epoch, as timm's clean_checkpoint.py writes), else why it does not."""
    try:
        meta = read_checkpoint(path)
    except CheckpointError as e:
        return e.problem
    if 'epoch' in meta or (weights_only_ok and is_weights_only(meta)):
        return None
    return 'no epoch entry, not a training checkpoint' + (' nor a model state dict' if weights_only_ok else '')


def is_recovery(path: str) -> bool:
    """A recovery-E-B checkpoint (--recovery-interval), written inside epoch E after its update B."""
    stem = os.path.basename(path)[:-len(CHECKPOINT_EXT)] if path.endswith(CHECKPOINT_EXT) else ''
    parts = stem.split('-')
    return len(parts) == 3 and parts[0] == 'recovery' and parts[1].isdigit() and parts[2].isdigit()


def check_checkpoint_file(flag: str, path: str) -> None:
    """The checks --resume, --initial-checkpoint and --pretrained-path share: a file that exists and loads without
    running code.

    Raises:
        ConfigError: naming the flag, the path and what to give instead.
    """
    if os.path.isdir(path):
        raise ConfigError(f'{flag} {path} is a folder; give a checkpoint file in it, e.g. '
                          f'{os.path.join(path, LAST)}')
    if not os.path.isfile(path):
        other = ', or --resume auto with --experiment' if flag == '--resume' else ''
        raise ConfigError(f'{flag} {path}: no such file; give the path of a .pth.tar checkpoint{other}')
    problem = checkpoint_problem(path, weights_only_ok=True)
    if problem is not None:
        raise ConfigError(f'{flag} {path}: cannot read this checkpoint ({problem}); give an intact checkpoint '
                          f'written by training (an earlier checkpoint-N.pth.tar if this one is damaged)')


# the flags that shape what a checkpoint holds: the model, the DRLoc heads, the optimizer's parameter groups
_SHAPING_FLAGS = ('model', 'model_kwargs', 'num_classes', 'in_chans', 'img_size', 'input_size', 'opt', 'drloc_lambda',
                  'drloc_mode', 'drloc_signed', 'drloc_hidden_dim', 'drloc_multiscale', 'drloc_layers')


def checkpoint_misfit(flag: str, path: str, error: Exception,
                      run_args: Optional[argparse.Namespace] = None) -> ConfigError:
    """The error for a readable checkpoint whose weights do not fit the model (another architecture or size), or
    whose heads or optimizer state do not fit this run's; with `run_args`, it names the shaping flags whose values
    differ from the ones saved in the checkpoint."""
    saved = saved_args(read_checkpoint(path)) if run_args is not None else {}
    differing = [f'--{key.replace("_", "-")} {saved[key]} (this run: {getattr(run_args, key)})'
                 for key in _SHAPING_FLAGS if key in saved and saved[key] != getattr(run_args, key, saved[key])]
    trained = f'; it was trained with {", ".join(differing)}' if differing else ''
    return ConfigError(f'{flag} {path} does not fit this run ({first_lines(error, 2)}){trained}; use it with the '
                       f'flags it was trained with (see args.yaml next to it)')


@dataclass
class ResumePoint:
    """Where a run continues from: nothing (a fresh run), or a checkpoint file.

    Args:
        path: the checkpoint, '' for a fresh run.
        in_place: the checkpoint is in this run's experiment folder, so the run goes on there.
        epoch: the epoch to start at, once loaded (None: 0).
        ema: the file also seeds the EMA weights, once loaded.
    """
    path: str = ''
    in_place: bool = False
    epoch: Optional[int] = None
    ema: bool = False


def find_resume_point(args: argparse.Namespace, exp_dir: str) -> ResumePoint:
    """The checkpoint --resume names (checked before anything was built), or for 'auto' the newest readable one
    in `exp_dir`."""
    if not args.resume:
        return ResumePoint()
    if args.resume == 'auto':
        path = _auto_resume_path(exp_dir)
        if path is None:
            _logger.info(f'--resume auto: no checkpoint in {exp_dir} yet, starting a fresh run')
            return ResumePoint()
        return ResumePoint(path, in_place=True)
    same_dir = os.path.abspath(os.path.dirname(args.resume)) == os.path.abspath(exp_dir)
    return ResumePoint(args.resume, in_place=same_dir)


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
        if stem == 'last' or (prefix in ('checkpoint', 'milestone') and number.isdigit()) or is_recovery(name):
            path = os.path.join(exp_dir, name)
            candidates.append((os.path.getmtime(path), stem == 'last', path))
    if not candidates:
        return None
    for rank, (_, _, path) in enumerate(sorted(candidates, reverse=True)):
        problem = checkpoint_problem(path)
        if problem is None:
            if rank or is_recovery(path):
                _logger.warning(f'--resume auto: continuing from {path}')
            return path
        _logger.warning(f'--resume auto: {path} is unreadable ({problem}); trying the next newest checkpoint')
    raise ConfigError(f'--resume auto: no readable checkpoint in {exp_dir}; move the folder away to start fresh, '
                      f'or give --resume a good checkpoint')


def load_resume_point(point: ResumePoint, args: argparse.Namespace, task: TrainingTask,
                      optimizer: torch.optim.Optimizer, loss_scaler: Optional[NativeScaler]) -> None:
    """Load `point`'s checkpoint into the task with timm's resume_task_checkpoint; sets `point.epoch` and `.ema`.

    Two kinds of file get more than timm's function gives them: a checkpoint without an epoch (a bare state dict,
    as timm's clean_checkpoint.py writes) holds model weights only, and with DRLoc on and no heads in it the heads
    start fresh (timm would refuse the missing task state); a recovery-E-B file was written inside epoch E, so the
    run repeats epoch E from its start (timm would skip the rest of it).

    Raises:
        ConfigError: the checkpoint does not fit the model, heads or optimizer of this run.
    """
    try:
        point.epoch, point.ema = _load(point.path, args, task, optimizer, loss_scaler)
    except (RuntimeError, ValueError, KeyError) as e:  # another model, other DRLoc heads, other optimizer
        raise checkpoint_misfit('--resume', point.path, e, args) from e


def _load(path: str, args: argparse.Namespace, task: TrainingTask, optimizer: torch.optim.Optimizer,
          loss_scaler: Optional[NativeScaler]):
    meta = read_checkpoint(path)
    task_state = meta.get('task_state') if isinstance(meta.get('task_state'), dict) else {}
    primary = utils.is_primary(args)
    if is_weights_only(meta) and args.drloc_lambda > 0 and 'drloc_heads' not in task_state:
        unwrap_model(task.get_eval_model()).load_state_dict(load_state_dict(path, use_ema=False))
        if primary:
            _logger.info(f'--resume {path} holds model weights only (no epoch, optimizer or DRLoc heads): loaded '
                         f'them; training starts at epoch 0 with fresh DRLoc heads')
        return None, False
    keep_fresh = args.no_resume_opt
    epoch = resume_task_checkpoint(task, path, optimizer=None if keep_fresh else optimizer,
                                   loss_scaler=None if keep_fresh else loss_scaler, log_info=primary)
    if epoch is not None and is_recovery(path):
        epoch = int(meta['epoch'])
        if primary:
            _logger.info(f'--resume {path} was written inside epoch {epoch}: running epoch {epoch} again from its '
                         f'start, with the weights of the recovery checkpoint')
    elif epoch is not None and not args.distributed:  # each rank draws from its own generators; rank 0's were saved
        rng = (meta.get('saver') or {}).get('rng')
        if rng is not None:
            set_rng_state(rng)
    return epoch, True
