"""DRLocTask: timm training task that adds the DRLoc loss to classification.

A sibling of timm's FeatureDistillationTask: the trainable module is a DRLocModel (backbone + DRLoc
heads), the eval model is the plain backbone, and the heads are task state, kept out of the model's
state_dict, so every checkpoint `state_dict` is a plain timm state dict.
"""
import logging
from typing import Any, Callable, Dict, Optional, Sequence, Union

import torch
import torch.nn as nn
from timm.task import TrainingTask
from timm.task.classification import resolve_classification_loss
from timm.utils.model import unwrap_model

from .model import DRLocModel, DRLocOutput, wrap
from .settings import check_settings

_logger = logging.getLogger(__name__)


def _find_drloc(module: Optional[nn.Module]) -> Optional[DRLocModel]:
    """The DRLocModel inside EMA / DDP / compile wrappers."""
    inner = unwrap_model(module) if module is not None else None  # timm strips EMA, DDP and compile wrappers
    return inner if isinstance(inner, DRLocModel) else None


class DRLocTask(TrainingTask):
    """Classification with the DRLoc auxiliary loss: loss = task_loss + lambda * drloc_loss.

    Args:
        model: the model to train (a timm model, or any nn.Module with `layers`).
        drloc_lambda: weight of the DRLoc loss (>= 0); change it per epoch with `set_drloc_lambda`.
        criterion: classification loss; created from `criterion_kwargs` with timm's
            create_classification_loss when None (label smoothing, soft targets for mixup, BCE...).
        criterion_kwargs: arguments of create_classification_loss.
        mode, num_samples, multiscale, use_abs, normalize, hidden_dim, layers, layout, input_size:
            passed to `timm_drloc.wrap()`.
        device: device for the task, its heads and criterion.
        dtype: dtype for task tensors.
        verbose: log the set-up.

    Returns (forward):
        {'loss', 'output', 'task_loss', 'drloc_loss'}

    Example:
        >>> task = DRLocTask(model, drloc_lambda=0.5, criterion_kwargs=dict(smoothing=0.1))
        >>> optimizer = create_optimizer_v2(task.get_trainable_module(), 'adamw', lr=1e-3)
        >>> result = task(images, labels)
        >>> result['loss'].backward()
    """

    def __init__(
            self,
            model: nn.Module,
            drloc_lambda: float = 0.5,
            criterion: Optional[Union[nn.Module, Callable]] = None,
            criterion_kwargs: Optional[Dict[str, Any]] = None,
            mode: str = 'l1',
            num_samples: int = 64,
            multiscale: bool = False,
            use_abs: bool = True,
            normalize: bool = False,
            hidden_dim: int = 512,
            layers: Optional[Sequence[str]] = None,
            layout: Optional[str] = None,
            input_size: Optional[Sequence[int]] = None,
            device: Optional[torch.device] = None,
            dtype: Optional[torch.dtype] = None,
            verbose: bool = True,
    ):
        super().__init__(device=device, dtype=dtype, verbose=verbose)
        self.set_drloc_lambda(drloc_lambda)
        self.trainable_module = wrap(
            model, mode=mode, num_samples=num_samples, multiscale=multiscale, use_abs=use_abs,
            normalize=normalize, hidden_dim=hidden_dim, layers=layers, layout=layout, input_size=input_size,
        ).to(device=self.device)
        self.criterion = resolve_classification_loss(criterion, self.device, criterion_kwargs=criterion_kwargs)
        if self.verbose:
            grids = ', '.join(f'{s.name} {s.grid_size[0]}x{s.grid_size[1]}x{s.num_chs} ({s.layout})'
                              for s in self.trainable_module.sources)
            _logger.info(
                f"DRLocTask: lambda={self.drloc_lambda}, mode={mode}, samples={num_samples}, "
                f"abs={use_abs}, normalize={normalize}, grids: {grids}")

    def set_drloc_lambda(self, value: float) -> None:
        """Set the DRLoc weight, a finite number >= 0 (the training loop calls this each epoch for a schedule)."""
        check_settings(drloc_lambda=value)
        self.drloc_lambda = float(value)

    def prepare_distributed(self, device_ids: Optional[list] = None, **ddp_kwargs) -> 'DRLocTask':
        """Wrap the trainable module (backbone + heads) in DistributedDataParallel."""
        from torch.nn.parallel import DistributedDataParallel as DDP
        self.trainable_module = DDP(self.trainable_module, device_ids=device_ids, **ddp_kwargs)
        return self

    def compile(self, backend: str = 'inductor', mode: Optional[str] = None, **compile_kwargs) -> nn.Module:
        """Compile the train forward (backbone + heads) and the eval backbone, before DDP wrapping."""
        drloc = _find_drloc(self.trainable_module)
        self.eval_model = torch.compile(drloc.model, backend=backend, mode=mode, **compile_kwargs)
        self.trainable_module = torch.compile(self.trainable_module, backend=backend, mode=mode, **compile_kwargs)
        return self.eval_model

    def get_eval_model(self, module: Optional[nn.Module] = None, ema: bool = False) -> Optional[nn.Module]:
        """The plain backbone (what validation runs and checkpoints save), EMA or not."""
        resolved = super().get_eval_model(module=module, ema=ema)
        drloc = _find_drloc(resolved) if resolved is not None else None
        return drloc.model if drloc is not None else resolved

    def get_task_state(self, module: Optional[nn.Module] = None, ema: bool = False) -> Dict[str, Any]:
        """The DRLoc heads' state (kept out of the model state_dict)."""
        drloc = _find_drloc(module if module is not None else self.get_trainable_module(ema=ema))
        if drloc is None:
            return {}
        return {'drloc_heads': drloc.heads.state_dict()}

    def load_task_state(
            self,
            state: Optional[Dict[str, Any]],
            strict: bool = True,
            module: Optional[nn.Module] = None,
            ema: bool = False,
    ) -> None:
        """Load the DRLoc heads saved by `get_task_state`."""
        if not state or 'drloc_heads' not in state:
            if strict:
                raise RuntimeError(
                    "The checkpoint has no DRLoc head state ('drloc_heads' in task_state): it was not saved by a "
                    "DRLoc run. Resume it with --drloc-lambda 0, or start the heads fresh by loading it as "
                    "--initial-checkpoint.")
            return
        drloc = _find_drloc(module if module is not None else self.get_trainable_module(ema=ema))
        if drloc is None:
            raise RuntimeError("Cannot load EMA task state before setup_ema()." if ema else
                               "Cannot load task state without a trainable module.")
        drloc.heads.load_state_dict(state['drloc_heads'], strict=strict)

    def get_clip_parameters(self, exclude_head: bool = False):
        """Backbone parameters (less its classifier for AGC, as timm does) and the DRLoc heads."""
        drloc = _find_drloc(self.trainable_module)
        parameters = list(drloc.model.parameters())
        if exclude_head:
            parameters = parameters[:-2]
        return parameters + list(drloc.heads.parameters())

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Forward pass, classification loss and weighted DRLoc loss.

        Args:
            input: (B, C, H, W) images.
            target: (B,) labels or (B, num_classes) soft targets.

        Returns:
            {'loss': task_loss + lambda * drloc_loss, 'output': logits, 'task_loss', 'drloc_loss'}
        """
        out = self.trainable_module(input)
        if not isinstance(out, DRLocOutput) and isinstance(out, tuple) and len(out) == 2:
            out = DRLocOutput(*out)
        if not isinstance(out, DRLocOutput):
            raise RuntimeError("DRLocTask needs the trainable module in train mode (call task.train()).")
        if not torch.is_tensor(out.logits):
            backbone = _find_drloc(self.trainable_module).model
            kind = f'a dict (keys {list(out.logits)[:5]})' if isinstance(out.logits, dict) else \
                f'a {type(out.logits).__name__}'
            raise ValueError(f"{type(backbone).__name__}'s forward returns {kind}, not the logits tensor the "
                             f"classification loss needs. Give DRLocTask a model whose forward returns the logits "
                             f"(e.g. a small nn.Module that calls it and returns the logits entry).")
        task_loss = self.criterion(out.logits, target)
        return {
            'loss': task_loss + self.drloc_lambda * out.drloc_loss,
            'output': out.logits,
            'task_loss': task_loss,
            'drloc_loss': out.drloc_loss,
        }
