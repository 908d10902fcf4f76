"""DRLocTask: timm training task that adds the DRLoc loss to classification, or to any other timm task.

Alone it is a sibling of timm's FeatureDistillationTask: the trainable module is a DRLocModel (backbone +
DRLoc heads), the eval model is the plain backbone, and the heads are task state, kept out of the model's
state_dict, so every checkpoint `state_dict` is a plain timm state dict.

Over a base task (`base_task=`: timm's logit, feature or token distillation, or any TrainingTask) the
base task computes its loss as it does without DRLoc, from the one student forward it runs; the DRLoc
heads read the grids of that same pass (trainable.py says how) and DRLocTask adds lambda times their
loss. Eval model, checkpoint `state_dict` and evaluator stay the base task's; the task state holds the
heads beside the base task's own (a feature projection).
"""
import logging
from typing import Any, Callable, Dict, Optional, Union

import torch
import torch.nn as nn
from timm.task import TrainingTask
from timm.task.classification import resolve_classification_loss

from .errors import ConfigError
from .model import DRLocModel, DRLocOutput, wrap
from .settings import check_settings
from .trainable import DRLocTrainableModule, attach, check_base_task, find_inside

_logger = logging.getLogger(__name__)


HEADS_KEY = 'drloc_heads'  # the heads' entry in the task state
_TRAINABLE = (DRLocModel, DRLocTrainableModule)  # what DRLocTask trains, alone / over a base task


def _find_trainable(module: Optional[nn.Module]) -> Optional[Union[DRLocModel, DRLocTrainableModule]]:
    """The DRLocModel / DRLocTrainableModule inside EMA, DDP and torch.compile wrappers, or None."""
    return find_inside(module, _TRAINABLE)


class DRLocTask(TrainingTask):
    """The DRLoc auxiliary loss added to classification, or to another timm task.

    loss = task_loss + lambda * drloc_loss alone; loss = (the base task's loss) + lambda * drloc_loss
    over a base task. Either way the student runs forward once per step.

    Args:
        model: the model to train (a timm model, or any nn.Module with `layers`); over a base task, the
            student that task trains (the same object).
        drloc_lambda: weight of the DRLoc loss (>= 0); change it per epoch with `set_drloc_lambda`.
        criterion: classification loss; created from `criterion_kwargs` with timm's
            create_classification_loss when None (label smoothing, soft targets for mixup, BCE...).
            Not with `base_task`, which has its own.
        criterion_kwargs: arguments of create_classification_loss.
        base_task: a timm TrainingTask to add DRLoc to (LogitDistillationTask, FeatureDistillationTask,
            TokenDistillationTask, ...), built on `model` and not yet compiled, DDP-wrapped or with EMA.
            DRLocTask then owns it: call compile / prepare_distributed / setup_ema on the DRLocTask.
        device: device for the task, its heads and criterion (default: the base task's).
        dtype: dtype for task tensors (default: the base task's).
        verbose: log the set-up.
        **wrap_kwargs: the DRLoc settings, as `timm_drloc.wrap()` takes them and with its defaults (mode,
            num_samples, multiscale, use_abs, normalize, hidden_dim, layers, layout, input_size, compile_head).

    Returns (forward):
        alone: {'loss', 'output', 'task_loss', 'drloc_loss'}; over a base task: the base task's
        dict ('loss', 'output', 'task_loss', 'kd_loss' or 'distill_loss', ...) plus 'drloc_loss'.

    Example:
        >>> task = DRLocTask(model, drloc_lambda=0.5, criterion_kwargs=dict(smoothing=0.1))
        >>> optimizer = create_optimizer_v2(task.get_trainable_module(), 'adamw', lr=1e-3)
        >>> result = task(images, labels)
        >>> result['loss'].backward()

        Over logit distillation:

        >>> kd = LogitDistillationTask(model, teacher, temperature=4.0)
        >>> task = DRLocTask(model, drloc_lambda=0.5, base_task=kd)
        >>> result = task(images, labels)  # {'loss', 'output', 'task_loss', 'kd_loss', 'drloc_loss'}
    """

    def __init__(
            self,
            model: nn.Module,
            drloc_lambda: float = 0.5,
            criterion: Optional[Union[nn.Module, Callable]] = None,
            criterion_kwargs: Optional[Dict[str, Any]] = None,
            base_task: Optional[TrainingTask] = None,
            device: Optional[torch.device] = None,
            dtype: Optional[torch.dtype] = None,
            verbose: bool = True,
            **wrap_kwargs: Any,
    ):
        if callable(drloc_lambda):  # DRLocTask(model, criterion), as timm's ClassificationTask is called
            raise ConfigError(f"DRLocTask's second argument is drloc_lambda, got {type(drloc_lambda).__name__}; pass "
                              f"the loss by name: DRLocTask(model, criterion=..., drloc_lambda=0.5)")
        if base_task is not None:
            _check_base_task(base_task, model, criterion, criterion_kwargs)
            device = device if device is not None else base_task.device
            dtype = dtype if dtype is not None else base_task.dtype
        super().__init__(device=device, dtype=dtype, verbose=verbose)
        self.set_drloc_lambda(drloc_lambda)
        drloc = wrap(model, **wrap_kwargs).to(device=self.device)
        self.base_task = base_task
        if base_task is None:
            self.trainable_module = drloc
            self.criterion = resolve_classification_loss(criterion, self.device, criterion_kwargs=criterion_kwargs)
        else:
            self.trainable_module = attach(base_task, drloc)
        if self.verbose:
            grids = ', '.join(f'{s.name} {s.grid_size[0]}x{s.grid_size[1]}x{s.num_chs} ({s.layout})'
                              for s in drloc.sources)
            over = f" over {type(base_task).__name__}" if base_task is not None else ''
            head = drloc.heads[0]  # every head has the same settings
            _logger.info(
                f"DRLocTask{over}: lambda={self.drloc_lambda}, mode={head.mode}, samples={head.num_samples}, "
                f"abs={head.use_abs}, normalize={head.normalize}, compile_head={head.compiled}, grids: {grids}")

    def set_drloc_lambda(self, value: float) -> None:
        """Set the DRLoc weight, a finite number >= 0 (the training loop calls this each epoch for a schedule)."""
        check_settings(drloc_lambda=value)
        self.drloc_lambda = float(value)

    def prepare_distributed(self, device_ids: Optional[list] = None, **ddp_kwargs) -> 'DRLocTask':
        """Wrap the trainable module (backbone + heads, and the base task's extras) in DistributedDataParallel.

        Over a base task, the base task's own prepare_distributed does it (it also freezes its teacher),
        on its trainable module, which holds the heads.
        """
        from torch.nn.parallel import DistributedDataParallel as DDP
        if self.base_task is None:
            self.trainable_module = DDP(self.trainable_module, device_ids=device_ids, **ddp_kwargs)
            return self
        if ddp_kwargs.get('find_unused_parameters'):
            raise ConfigError(
                "find_unused_parameters=True does not work with DRLoc over a base task: DDP looks for used "
                "parameters in the module output, and the DRLoc loss travels beside it. Leave it False (every "
                "head parameter gets a gradient at each step).")
        self.base_task.prepare_distributed(device_ids=device_ids, **ddp_kwargs)
        wrapped = self.base_task.trainable_module
        if find_inside(wrapped, DRLocTrainableModule) is None:
            raise RuntimeError(
                f"{type(self.base_task).__name__}.prepare_distributed() replaced its trainable module with "
                f"{type(wrapped).__name__}, which does not hold the DRLoc heads: their gradients would not be "
                f"averaged across ranks.")
        self.trainable_module = wrapped
        return self

    def compile(self, backend: str = 'inductor', mode: Optional[str] = None, **compile_kwargs) -> nn.Module:
        """Compile the train forward (backbone + heads) and the eval backbone, before DDP wrapping.

        Over a base task, the base task compiles what it compiles without DRLoc (its teacher, its eval
        model) and the train forward compiled is the base task's module with the heads.
        """
        inner = _find_trainable(self.trainable_module)
        if self.base_task is None:
            self.eval_model = torch.compile(inner.model, backend=backend, mode=mode, **compile_kwargs)
        else:
            self.eval_model = self._compile_base_task(inner, backend=backend, mode=mode, **compile_kwargs)
        self.trainable_module = torch.compile(self.trainable_module, backend=backend, mode=mode, **compile_kwargs)
        if self.base_task is not None:
            self.base_task.trainable_module = self.trainable_module
        return self.eval_model

    def _compile_base_task(self, inner: DRLocTrainableModule, **compile_kwargs) -> nn.Module:
        """Let the base task compile on its own module (as without DRLoc); return the eval model it compiled."""
        base = self.base_task
        base.trainable_module = inner.module
        try:
            eval_model = base.compile(**compile_kwargs)
        finally:
            base.trainable_module = self.trainable_module
        if eval_model is None:  # a base task that compiles nothing itself
            eval_model = torch.compile(self.get_eval_model(), **compile_kwargs)
        return eval_model

    def get_eval_model(self, module: Optional[nn.Module] = None, ema: bool = False) -> Optional[nn.Module]:
        """The plain backbone (what validation runs and checkpoints save), EMA or not."""
        resolved = super().get_eval_model(module=module, ema=ema)
        inner = _find_trainable(resolved)
        if inner is None:
            return resolved
        if self.base_task is None:
            return inner.model
        return self.base_task.get_eval_model(module=inner.module, ema=ema)

    def get_task_state(self, module: Optional[nn.Module] = None, ema: bool = False) -> Dict[str, Any]:
        """The DRLoc heads' state (kept out of the model state_dict), beside the base task's task state."""
        inner = _find_trainable(module if module is not None else self.get_trainable_module(ema=ema))
        if inner is None:
            return {}
        state = {}
        if self.base_task is not None:
            state = dict(self.base_task.get_task_state(module=inner.module, ema=ema))
            if HEADS_KEY in state:
                raise RuntimeError(f"{type(self.base_task).__name__} keeps task state named '{HEADS_KEY}' too; "
                                   f"DRLoc cannot be added to it.")
        state[HEADS_KEY] = inner.heads.state_dict()
        return state

    def load_task_state(
            self,
            state: Optional[Dict[str, Any]],
            strict: bool = True,
            module: Optional[nn.Module] = None,
            ema: bool = False,
    ) -> None:
        """Load the DRLoc heads (and the base task's state) saved by `get_task_state`."""
        heads = (state or {}).get(HEADS_KEY)
        if heads is None and strict:
            raise RuntimeError(
                "The checkpoint has no DRLoc head state ('drloc_heads' in task_state): it was not saved by a "
                "DRLoc run. Resume it with --drloc-lambda 0, or start the heads fresh by loading it as "
                "--initial-checkpoint.")
        if not state or (heads is None and self.base_task is None):
            return
        inner = _find_trainable(module if module is not None else self.get_trainable_module(ema=ema))
        if inner is None:
            raise RuntimeError("Cannot load EMA task state before setup_ema()." if ema else
                               "Cannot load task state without a trainable module.")
        if self.base_task is not None:
            base_state = {k: v for k, v in state.items() if k != HEADS_KEY}
            self._load_base_task_state(base_state, strict, inner, ema)
        if heads is not None:
            inner.heads.load_state_dict(heads, strict=strict)

    def _load_base_task_state(
            self, state: Dict[str, Any], strict: bool, inner: DRLocTrainableModule, ema: bool) -> None:
        """The base task's entries of the task state; with `strict`, exactly the entries it keeps."""
        expected = set(self.base_task.get_task_state(module=inner.module, ema=ema))
        if strict and set(state) != expected:
            raise RuntimeError(
                f"The checkpoint's task state for {type(self.base_task).__name__} has entries {sorted(state)}, this "
                f"task keeps {sorted(expected)} (a feature projection exists when student and teacher feature sizes "
                f"differ). Resume with the base task set up as when the checkpoint was saved, or load with "
                f"strict=False.")
        self.base_task.load_task_state(state, strict=strict, module=inner.module, ema=ema)

    def update_ema(self, step: Optional[int] = None) -> None:
        """Move the EMA copy (backbone, heads, the base task's extras) towards the live module."""
        if self.has_ema():
            self.get_trainable_module(ema=True).update(_find_trainable(self.trainable_module), step=step)

    def get_clip_parameters(self, exclude_head: bool = False):
        """Backbone parameters (less its classifier for AGC, as timm does), or the base task's clip
        parameters, and the DRLoc heads."""
        inner = _find_trainable(self.trainable_module)
        if self.base_task is None:
            parameters = list(inner.model.parameters())
            if exclude_head:
                parameters = parameters[:-2]
        else:
            parameters = list(self.base_task.get_clip_parameters(exclude_head=exclude_head))
        listed = {id(p) for p in parameters}
        return parameters + [p for p in inner.heads.parameters() if id(p) not in listed]

    def create_evaluator(self, **kwargs):
        """The base task's evaluator over a base task, else timm's classification evaluator."""
        if self.base_task is not None:
            return self.base_task.create_evaluator(**kwargs)
        return super().create_evaluator(**kwargs)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Forward pass, the task's loss and the weighted DRLoc loss.

        Args:
            input: (B, C, H, W) images.
            target: (B,) labels or (B, num_classes) soft targets (what the base task takes).

        Returns:
            alone: {'loss': task_loss + lambda * drloc_loss, 'output': logits, 'task_loss', 'drloc_loss'};
            over a base task: its dict with 'loss' + lambda * drloc_loss and 'drloc_loss' added.
        """
        if self.base_task is not None:
            result = dict(self.base_task(input, target))
            drloc_loss = _find_trainable(self.trainable_module).pop_drloc_loss()
            result['loss'] = torch.add(result['loss'], drloc_loss, alpha=self.drloc_lambda)  # one operator, not two
            result['drloc_loss'] = drloc_loss
            return result
        out = self.trainable_module(input)
        if not isinstance(out, DRLocOutput) and isinstance(out, tuple) and len(out) == 2:
            out = DRLocOutput(*out)
        if not isinstance(out, DRLocOutput):
            raise RuntimeError("DRLocTask needs the trainable module in train mode (call task.train()).")
        if not torch.is_tensor(out.logits):
            backbone = _find_trainable(self.trainable_module).model
            kind = f'a dict (keys {list(out.logits)[:5]})' if isinstance(out.logits, dict) else \
                f'a {type(out.logits).__name__}'
            raise ValueError(f"{type(backbone).__name__}'s forward returns {kind}, not the logits tensor the "
                             f"classification loss needs. Give DRLocTask a model whose forward returns the logits "
                             f"(e.g. a small nn.Module that calls it and returns the logits entry).")
        task_loss = self.criterion(out.logits, target)
        return {
            'loss': torch.add(task_loss, out.drloc_loss, alpha=self.drloc_lambda),  # one operator, not two
            'output': out.logits,
            'task_loss': task_loss,
            'drloc_loss': out.drloc_loss,
        }


def _check_base_task(
        base_task: TrainingTask,
        model: nn.Module,
        criterion: Optional[Union[nn.Module, Callable]],
        criterion_kwargs: Optional[Dict[str, Any]],
) -> None:
    """What DRLocTask itself refuses about a base task, then what trainable.check_base_task does."""
    if isinstance(base_task, DRLocTask):
        raise ConfigError("base_task is a DRLocTask already: add DRLoc to a task once.")
    if criterion is not None or criterion_kwargs:
        raise ConfigError(f"criterion / criterion_kwargs with base_task: {type(base_task).__name__} computes the "
                          f"task loss with its own criterion. Pass the criterion to the base task instead.")
    check_base_task(base_task, model)
