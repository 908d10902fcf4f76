"""timm-drloc: the Dense Relative Localization loss (DRLoc, NeurIPS 2021) for any timm model."""
from .head import DRLocHead, relative_targets, sample_positions
from .model import DRLocModel, DRLocOutput, unwrap, wrap
from .settings import add_drloc_args, drloc_kwargs, drloc_lambda_at, drloc_lambda_for_epoch
from .task import DRLocTask

__version__ = '0.1.0'

__all__ = [
    'DRLocHead', 'DRLocModel', 'DRLocOutput', 'DRLocTask', 'add_drloc_args', 'drloc_kwargs', 'drloc_lambda_at',
    'drloc_lambda_for_epoch', 'relative_targets', 'sample_positions', 'unwrap', 'wrap', 'export', 'push_to_hub',
]


def __getattr__(name):
    # the Hub functions import huggingface_hub only when used
    if name in ('export', 'push_to_hub'):
        from . import hub
        return getattr(hub, name)
    raise AttributeError(f"module 'timm_drloc' has no attribute '{name}'")
