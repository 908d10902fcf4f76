"""DRLocTrainableModule: another timm task's trainable module with the DRLoc heads beside it.

`DRLocTask(model, base_task=task)` adds DRLoc to any `timm.task.TrainingTask` (logit, feature or token
distillation, classification, your own). It does so by putting a DRLocTrainableModule where the base
task keeps its trainable module:

    base_task.trainable_module = DRLocTrainableModule(heads, module=<the base task's old module>)
    DRLocTask.trainable_module = the same object (then its compiled / DDP-wrapped form)

Its forward runs the inner module with the grid hooks on (the hooks sit on the student's grid modules,
so they fire whether the base task calls `student(x)` or `student.forward_features(x)`), computes the
DRLoc loss of the grids that one pass produced, keeps it, and returns the inner module's output
unchanged, so the base task's own forward and loss run exactly as without DRLoc. DRLocTask then reads
the kept loss (`pop_drloc_loss()`) and adds lambda times it to the base task's loss.

Why this shape:

* One student forward per step: the base task's pass is the only pass.
* The heads are inside the module that DDP wraps (the base task's `prepare_distributed` wraps its
  trainable module, which is now this one), so their gradients are averaged across ranks with the
  student's in the same buckets, and `torch.compile` compiles heads and student as one forward.
* The inner module is held as `module`, so timm's `unwrap_model` (which peels `.module` and
  `_orig_mod`) sees through this wrapper as through DDP: a checkpoint's `state_dict` is the plain student
  and the base task's `get_task_state` / `get_eval_model` / `get_clip_parameters` find their own module.
* The heads are registered before `module`: timm's default `get_clip_parameters(exclude_head=True)`
  drops the last two parameters as the classifier's, and they are still the classifier's.

The kept loss is a side channel beside the module output, which DDP cannot see: DDP with
`find_unused_parameters=True` would mark the heads unused, so DRLocTask refuses it.
"""
from typing import Any, Optional, Type

import torch
import torch.nn as nn
from timm.task import TrainingTask

from .errors import ConfigError
from .grids import GridReader, Route
from .model import DRLocModel, WrapsModel, drloc_loss


class DRLocTrainableModule(WrapsModel):
    """A base task's trainable module plus DRLoc heads; returns the inner output, keeps the DRLoc loss.

    Build it through `DRLocTask(model, base_task=...)`.

    Args:
        heads: one DRLocHead per grid.
        module: the base task's trainable module (the student, or the student with its projection).
        reader: the grid hooks on the student inside `module`.
    """
    inner_name = 'module'

    def __init__(self, heads: nn.ModuleList, module: nn.Module, reader: GridReader):
        super().__init__()
        self.heads = heads
        self.module = module
        self.reader = reader
        self.kept_loss: Optional[torch.Tensor] = None  # the DRLoc loss of the last train-mode forward

    @property
    def sources(self):
        return self.reader.sources

    def forward(self, input: torch.Tensor, *args, **kwargs) -> Any:
        """input: (B, C, H, W) images. Returns the inner module's output; in train mode also keeps the
        DRLoc loss of the grids of this pass for `pop_drloc_loss()`."""
        if not self.training:
            return self.module(input, *args, **kwargs)
        output, features = self.reader.read(lambda: self.module(input, *args, **kwargs))
        self.kept_loss = drloc_loss(self.heads, self.sources, features, tuple(input.shape[-2:]))
        return output

    def pop_drloc_loss(self) -> torch.Tensor:
        """The DRLoc loss of the last train-mode forward (a () tensor), handed over once."""
        loss, self.kept_loss = self.kept_loss, None
        if loss is None:
            raise RuntimeError(
                "The base task's forward did not run its trainable module in train mode, so there is no DRLoc "
                "loss: call task.train() before training steps.")
        return loss


def find_inside(module: Optional[nn.Module], kind: Type[nn.Module]) -> Optional[nn.Module]:
    """The first `kind` module inside EMA, DDP and torch.compile wrappers (`.module`, `_orig_mod`), or None."""
    while module is not None and not isinstance(module, kind):
        inner = getattr(module, '_orig_mod', None)  # before `.module`: a compiled module forwards that name
        module = inner if inner is not None else getattr(module, 'module', None)
    return module


def check_base_task(base_task: TrainingTask, model: nn.Module) -> None:
    """Refuse, before anything is changed, a base task DRLoc cannot be added to.

    Raises:
        ConfigError: not a TrainingTask, no trainable module, already compiled / DDP-wrapped / with EMA /
            with DRLoc, or `model` is not inside its trainable module.
    """
    if not isinstance(base_task, TrainingTask):
        raise ConfigError(f"base_task must be a timm.task.TrainingTask, got {type(base_task).__name__}. "
                          f"Build a timm task (e.g. LogitDistillationTask(model, teacher)) and pass it.")
    inner = base_task._modules.get('trainable_module')
    if inner is None:
        raise ConfigError(f"{type(base_task).__name__} keeps no `trainable_module`: DRLoc needs the module the task "
                          f"trains to put its heads beside it.")
    if find_inside(inner, DRLocTrainableModule) is not None:
        raise ConfigError(f"{type(base_task).__name__} already has DRLoc: add DRLoc to a task once.")
    if getattr(inner, '_orig_mod', None) is not None or isinstance(inner, nn.parallel.DistributedDataParallel):
        raise ConfigError(f"the trainable module of {type(base_task).__name__} is already compiled or DDP-wrapped "
                          f"({type(inner).__name__}). Add DRLoc first; DRLocTask.compile() and "
                          f"prepare_distributed() then do both for the base task too.")
    if base_task.has_ema():
        raise ConfigError(f"{type(base_task).__name__} already has an EMA, whose copy would lack the DRLoc heads. "
                          f"Call setup_ema() on the DRLocTask instead.")
    if not any(m is model for m in inner.modules()):
        raise ConfigError(
            f"the model ({type(model).__name__}) is not inside the trainable module of {type(base_task).__name__} "
            f"({type(inner).__name__}). Pass the student that the base task trains, the same object.")


def attach(base_task: TrainingTask, drloc: DRLocModel) -> DRLocTrainableModule:
    """Put the heads of `drloc` (built on the base task's student) beside the base task's trainable module.

    Replaces `base_task.trainable_module` with the DRLocTrainableModule and returns it. Call
    `check_base_task` first.

    Raises:
        ConfigError: the student's grid is read with forward_intermediates(), a pass of its own.
    """
    if drloc.route != Route.HOOKS:
        names = [s.name for s in drloc.sources]
        raise ConfigError(
            f"{type(drloc.model).__name__}'s grid is read with forward_intermediates() ({names}), a forward pass of "
            f"its own; over a base task the grid must come from the pass the base task runs. Name the module that "
            f"outputs the grid with layers=[...] (--drloc-layers).")
    trainable = DRLocTrainableModule(drloc.heads, base_task.trainable_module, drloc.reader)
    base_task.trainable_module = trainable
    return trainable
