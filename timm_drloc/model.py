"""DRLocModel: a timm (or any) model plus DRLoc heads, one backbone pass for logits and grids.

`wrap(model)` returns a DRLocModel. In train mode it returns `DRLocOutput(logits, drloc_loss)`; in eval
mode exactly `model(x)`. The original model object is kept untouched as `.model`, so its state_dict
keys do not change; `unwrap()` gets it back through DRLocModel, DDP and torch.compile wrappers.
"""
import re
from typing import List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from timm.utils.model import unwrap_model

from .grids import LAYOUTS, GridReader, GridSource, Route, default_input_size, probe_grids, to_grid
from .head import DRLocHead, check_head_memory
from .settings import check_settings


# backbone attributes that training code reads from the module it trains
_PASSTHROUGH = (
    'pretrained_cfg', 'default_cfg', 'num_classes', 'num_features', 'head_hidden_size',
    'set_grad_checkpointing', 'get_classifier', 'reset_classifier')


class DRLocOutput(NamedTuple):
    """What a DRLocModel returns in train mode: `logits, drloc_loss = drloc(x)`."""
    logits: torch.Tensor
    drloc_loss: torch.Tensor


def drloc_loss(
        heads: Sequence[DRLocHead],
        sources: Sequence[GridSource],
        features: Sequence[torch.Tensor],
        input_hw: Tuple[int, int],
) -> torch.Tensor:
    """The DRLoc loss of one forward pass: the sum over grids of each grid's head loss.

    Args:
        heads: one DRLocHead per grid.
        sources: where each grid came from (its layout).
        features: the raw captured tensors, one per source (NCHW, NHWC or NLC, as the source says).
        input_hw: (H, W) of the network input, to split token layouts into rows.

    Returns:
        () scalar loss.
    """
    losses = [head(to_grid(feat, source, input_hw)) for head, source, feat in zip(heads, sources, features)]
    return sum(losses[1:], losses[0])  # from the first loss: no `0 + loss` operator


class WrapsModel(nn.Module):
    """A module that holds another one under `inner_name` and stands in for it in timm's training code.

    timm's optimizer hooks (`no_weight_decay`, `group_matcher`, for layer decay) answer with the inner
    module's parameter names, prefixed; the attributes in `_PASSTHROUGH` read the inner module's. What
    the wrapper adds itself (the DRLoc heads) trains like the classifier.
    """
    inner_name = 'model'

    def no_weight_decay(self):
        inner = getattr(self._modules[self.inner_name], 'no_weight_decay', None)
        return {f'{self.inner_name}.{n}' for n in inner()} if inner is not None else set()

    def group_matcher(self, coarse: bool = False):
        inner = getattr(self._modules[self.inner_name], 'group_matcher', None)
        if inner is None:
            raise AttributeError(f"{type(self._modules[self.inner_name]).__name__} has no group_matcher")
        return _prefix_matcher(inner(coarse=coarse), f'{self.inner_name}.')

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name not in _PASSTHROUGH:
                raise
            return getattr(self._modules[self.inner_name], name)


class DRLocModel(WrapsModel):
    """A model whose forward also returns the DRLoc loss of its spatial grid(s).

    Build it with `timm_drloc.wrap()`. Grids are read with forward hooks on the modules that output
    them (see grids.py), so the model's own forward runs once and its logits are unchanged.

    Args:
        model: the backbone (any timm model, or any nn.Module with `layers` named).
        sources: where each grid comes from and how it is read (one DRLocHead per source).
        heads: the DRLoc heads, one per source.
    """

    def __init__(self, model: nn.Module, sources: Sequence[GridSource], heads: Sequence[DRLocHead]):
        super().__init__()
        self.model = model
        self.heads = nn.ModuleList(heads)
        self.sources = list(sources)
        self.training = model.training  # the wrapper (and its heads) take the backbone's mode
        self.heads.train(model.training)
        # hooks on the grid modules; deepcopy (EMA) copies the reader together with the model and its hooks
        self.reader = GridReader(model, self.sources)

    @property
    def route(self) -> Route:
        """How the grids are read: 'hooks' or 'intermediates'."""
        return self.reader.route

    def forward(self, x: torch.Tensor) -> Union[DRLocOutput, torch.Tensor]:
        """x: (B, C, H, W) images. Train mode: DRLocOutput(logits, drloc_loss); eval mode: logits."""
        if not self.training:
            return self.model(x)
        if x.ndim != 4:
            raise ValueError(f"DRLocModel needs a batch of images, (B, C, H, W), got a {x.ndim}-D input of shape "
                             f"{tuple(x.shape)}" + (". Add the batch dimension with x.unsqueeze(0)." if x.ndim == 3
                                                    else "."))
        logits, features = self.forward_logits_and_features(x)
        return DRLocOutput(logits, drloc_loss(self.heads, self.sources, features, tuple(x.shape[-2:])))

    def forward_logits_and_features(self, x: torch.Tensor) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """One backbone pass on x (B, C, H, W): the logits and the raw feature tensor of each source, as its module
        outputs it (NCHW, NHWC or NLC; `grids.to_grid` views it as (B, H, W, C))."""
        return self.reader(self.model, x)

    def remove_hooks(self) -> None:
        """Detach the grid hooks from the backbone, leaving it as it was before wrap().

        The DRLocModel cannot compute its loss after this (a train-mode forward raises); eval forwards,
        which run the backbone alone, still work.
        """
        self.reader.remove()


def _prefix_matcher(matcher, prefix: str):
    """Re-anchor timm group_matcher regexes at `prefix` (the backbone is `.model` inside DRLocModel)."""
    escaped = re.escape(prefix)

    def fix(pattern):
        if isinstance(pattern, str):
            body = re.sub(r'(^|(?<=[|(]))\^', '', pattern)
            return f'^{escaped}(?:{body})'
        if isinstance(pattern, (list, tuple)):
            return type(pattern)(
                (fix(p[0]), *p[1:]) if isinstance(p, (list, tuple)) else fix(p) for p in pattern)
        return pattern
    if callable(matcher):
        return lambda name: matcher(name[len(prefix):]) if name.startswith(prefix) else matcher(name)
    return {k: fix(v) for k, v in matcher.items()}


def wrap(
        model: nn.Module,
        *,
        mode: str = 'l1',
        num_samples: int = 64,
        multiscale: bool = False,
        use_abs: bool = True,
        normalize: bool = False,
        hidden_dim: int = 512,
        layers: Optional[Sequence[str]] = None,
        layout: Optional[str] = None,
        input_size: Optional[Sequence[int]] = None,
        compile_head: Union[bool, str] = False,
) -> DRLocModel:
    """Add DRLoc heads to a model.

    Args:
        model: a timm model, or any nn.Module when `layers` names the grid module(s).
        mode: 'l1' (paper), 'ce' or 'cbr'.
        num_samples: pairs of cells per image (reference: 64).
        multiscale: one head per stage of a hierarchical model (Swin, ConvNeXt, ResNet, ...).
        use_abs: absolute offsets (reference training) or signed ones.
        normalize: targets divided by the grid size (the paper's text); lambda must then be about k times larger.
        hidden_dim: MLP width (reference 512; smaller for tiny models).
        layers: module paths (as `named_modules()` lists them) whose outputs are the grids.
        layout: 'NCHW', 'NHWC' or 'NLC' for the `layers` outputs, when detection is ambiguous.
        input_size: (C, H, W) for the probe pass that finds the grids; default: the channels and size the model
            was built for (its `in_chans` or first convolution, its `img_size`), then its pretrained_cfg.
        compile_head: torch.compile each head's step (targets, MLP, loss and their backward): fewer kernel
            launches on a GPU, same random pairs as eager. True, or a torch.compile mode name
            ('reduce-overhead' adds CUDA graphs). The backbone stays as it is (compile it, or the whole
            task, as usual; inside a whole-model compile this option changes nothing).

    Returns:
        DRLocModel: train mode -> DRLocOutput(logits, drloc_loss), eval mode -> logits.

    Example:
        >>> model = timm.create_model('vit_tiny_patch16_224', img_size=64, num_classes=10)
        >>> drloc = timm_drloc.wrap(model)
        >>> logits, drloc_loss = drloc(images)
        >>> loss = F.cross_entropy(logits, labels) + 0.5 * drloc_loss
    """
    if isinstance(unwrap_model(model), DRLocModel):
        raise ValueError("This model is already wrapped by timm_drloc.wrap(); wrap the plain model once "
                         "(timm_drloc.unwrap(m) gives it back).")
    check_settings(mode=mode, num_samples=num_samples, hidden_dim=hidden_dim, normalize=normalize,
                   multiscale=multiscale, layers=layers, compile_head=compile_head)
    if layout is not None and layout not in LAYOUTS:
        raise ValueError(f"Unknown layout '{layout}'. Use one of {', '.join(LAYOUTS)}.")
    if input_size is None:
        input_size = default_input_size(model)
    if not isinstance(input_size, (tuple, list, torch.Size)) or len(input_size) != 3:
        raise ValueError(f"input_size must be (C, H, W), got {input_size}.")
    input_size = tuple(input_size)
    sources = probe_grids(model, input_size, multiscale=multiscale, layers=layers, layout=layout)
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device('cpu')
    # the heads live where the grids are, in the model's dtype (--model-dtype bfloat16)
    dtype = param.dtype if param is not None and param.is_floating_point() else None
    check_head_memory([(s.num_chs, s.grid_size) for s in sources], hidden_dim, num_samples, mode, use_abs, device)
    heads = [
        DRLocHead(s.num_chs, s.grid_size, mode=mode, num_samples=num_samples, use_abs=use_abs,
                  normalize=normalize, hidden_dim=hidden_dim, compiled=compile_head).to(device=device, dtype=dtype)
        for s in sources]
    return DRLocModel(model, sources, heads)


def unwrap(m: nn.Module) -> nn.Module:
    """The original model inside DRLocModel and the EMA, DDP and torch.compile wrappers timm's unwrap_model strips,
    in any nesting."""
    while True:
        inner = unwrap_model(m)
        if isinstance(inner, DRLocModel):
            inner = inner.model
        if inner is m:
            return m
        m = inner
