"""DRLocModel: a timm (or any) model plus DRLoc heads, one backbone pass for logits and grids.

`wrap(model)` returns a DRLocModel. In train mode it returns `DRLocOutput(logits, drloc_loss)`; in eval
mode exactly `model(x)`. The original model object is kept untouched as `.model`, so its state_dict
keys do not change; `unwrap()` gets it back through DRLocModel, DDP and torch.compile wrappers.
"""
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from .grids import (
    LAYOUTS, GridSource, default_input_size, feature_modules, find_layout, resolve_module, to_grid)
from .head import DRLocHead, check_grid_size, check_head_args, check_head_memory


# backbone attributes that training code reads from the module it trains
_PASSTHROUGH = (
    'pretrained_cfg', 'default_cfg', 'num_classes', 'num_features', 'head_hidden_size',
    'set_grad_checkpointing', 'get_classifier', 'reset_classifier')


class DRLocOutput(NamedTuple):
    """What a DRLocModel returns in train mode: `logits, drloc_loss = drloc(x)`."""
    logits: torch.Tensor
    drloc_loss: torch.Tensor


class GridCapture:
    """Forward hook that keeps a module's output while a DRLocModel forward is running."""

    def __init__(self, output_index: Optional[int] = 0):
        self.output_index = output_index  # element of a tuple / list output that is the grid; None: all
        self.active = False
        self.output: Optional[torch.Tensor] = None

    def start(self) -> None:
        self.active, self.output = True, None

    def stop(self) -> Optional[torch.Tensor]:
        output, self.active, self.output = self.output, False, None
        return output

    def __call__(self, module: nn.Module, args, output) -> None:
        if self.active:  # not in eval forwards, nor in activation-checkpointing recomputation
            is_seq = isinstance(output, (tuple, list)) and self.output_index is not None
            self.output = output[self.output_index] if is_seq else output


class GridReader:
    """Forward hooks on a model's grid modules: `read(run)` calls `run()` and returns what it returned
    together with the grid tensors the hooked modules output during that call.

    The hooks stay on the model and do nothing outside `read()` (eval forwards, activation-checkpointing
    recomputation). A deepcopy of the model together with its reader (timm's EMA copies the module
    holding both) captures its own grids.

    Args:
        model: the module holding the grid modules.
        sources: the grids to read (GridSource.name is the module path inside `model`).
    """

    def __init__(self, model: nn.Module, sources: Sequence[GridSource]):
        self.sources = list(sources)
        self.captures = [GridCapture(s.output_index) for s in self.sources]
        self.handles = [
            model.get_submodule(source.name).register_forward_hook(capture)
            for source, capture in zip(self.sources, self.captures)]
        self.removed = False  # a flag, not the handles: torch.compile cannot trace a RemovableHandle

    def read(self, run: Callable[[], Any]) -> Tuple[Any, List[torch.Tensor]]:
        """(run(), [raw output of each grid module during run()]), in the order of `sources`."""
        if self.removed:
            raise RuntimeError("remove_hooks() was called: this model no longer reads grids. Train with a fresh "
                               "timm_drloc.wrap(model), or run the plain backbone for inference.")
        for capture in self.captures:
            capture.start()
        try:
            result = run()
        finally:
            features = [capture.stop() for capture in self.captures]
        missing = [s.name for s, f in zip(self.sources, features) if f is None]
        if missing:
            raise RuntimeError(f"The forward pass did not run module(s) {missing}: no grid to read.")
        return result, features

    def remove(self) -> None:
        """Detach the hooks from the model."""
        for handle in self.handles:
            handle.remove()
        self.handles = []
        self.removed = True


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
        sources: where each grid comes from (one DRLocHead per source).
        heads: the DRLoc heads, one per source.
        route: 'hooks' or 'intermediates'.
    """

    def __init__(self, model: nn.Module, sources: Sequence[GridSource], heads: Sequence[DRLocHead], route: str):
        super().__init__()
        self.model = model
        self.heads = nn.ModuleList(heads)
        self.sources = list(sources)
        self.route = route
        self.training = model.training  # the wrapper (and its heads) take the backbone's mode
        self.heads.train(model.training)
        self.reader = GridReader(model, self.sources) if route == 'hooks' else None

    def forward(self, x: torch.Tensor) -> Union[DRLocOutput, torch.Tensor]:
        """x: (B, C, H, W) images. Train mode: DRLocOutput(logits, drloc_loss); eval mode: logits."""
        if not self.training:
            return self.model(x)
        if x.ndim != 4:
            raise ValueError(f"DRLocModel needs a batch of images, (B, C, H, W), got a {x.ndim}-D input of shape "
                             f"{tuple(x.shape)}" + (". Add the batch dimension with x.unsqueeze(0)." if x.ndim == 3
                                                    else "."))
        logits, features = self.forward_with_grids(x)
        return DRLocOutput(logits, drloc_loss(self.heads, self.sources, features, tuple(x.shape[-2:])))

    def forward_with_grids(self, x: torch.Tensor) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """One backbone pass: the logits and the raw captured features, one per source."""
        if self.route == 'intermediates':
            indices = [int(s.name.split('.')[-1]) for s in self.sources]
            final, features = self.model.forward_intermediates(x, indices=indices, norm=False)
            return self.model.forward_head(final), list(features)
        return self.reader.read(lambda: self.model(x))

    def remove_hooks(self) -> None:
        """Detach the grid hooks from the backbone, leaving it as it was before wrap().

        The DRLocModel cannot compute its loss after this (a train-mode forward raises); eval forwards,
        which run the backbone alone, still work.
        """
        if self.reader is not None:
            self.reader.remove()


def _prefix_matcher(matcher, prefix: str):
    """Re-anchor timm group_matcher regexes at `prefix` (the backbone is `.model` inside DRLocModel)."""
    import re
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
    if isinstance(unwrap_once(model), DRLocModel) or isinstance(model, DRLocModel):
        raise ValueError("This model is already wrapped by timm_drloc.wrap(); wrap the plain model once "
                         "(timm_drloc.unwrap(m) gives it back).")
    check_head_args(mode, num_samples, hidden_dim, normalize, compile_head)
    if layout is not None and layout not in LAYOUTS:
        raise ValueError(f"Unknown layout '{layout}'. Use one of {', '.join(LAYOUTS)}.")
    if layers is not None and multiscale:
        raise ValueError("multiscale=True picks the stages itself; with layers=[...] name each grid module instead.")
    input_size = tuple(input_size) if input_size is not None else default_input_size(model)
    if len(input_size) != 3:
        raise ValueError(f"input_size must be (C, H, W), got {input_size}.")
    sources, route = probe_grids(model, input_size, multiscale=multiscale, layers=layers, layout=layout)
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device('cpu')
    # the heads live where the grids are, in the model's dtype (--model-dtype bfloat16)
    dtype = param.dtype if param is not None and param.is_floating_point() else None
    check_head_memory([(s.num_chs, s.grid_size) for s in sources], hidden_dim, num_samples, mode, use_abs, device)
    heads = [
        DRLocHead(s.num_chs, s.grid_size, mode=mode, num_samples=num_samples, use_abs=use_abs,
                  normalize=normalize, hidden_dim=hidden_dim, compiled=compile_head).to(device=device, dtype=dtype)
        for s in sources]
    return DRLocModel(model, sources, heads, route)


def probe_grids(
        model: nn.Module,
        input_size: Tuple[int, int, int],
        multiscale: bool = False,
        layers: Optional[Sequence[str]] = None,
        layout: Optional[str] = None,
) -> Tuple[List[GridSource], str]:
    """Find the grid source(s) with one no-grad pass in eval mode on a zero input of `input_size`.

    Returns:
        (sources, route): the GridSource of each grid, and 'hooks' or 'intermediates'.
    """
    if layers is not None:
        if isinstance(layers, str):
            layers = [layers]
        if not layers:
            raise ValueError("layers=[] names no module. Name the grid module(s) as model.named_modules() lists "
                             "them, e.g. layers=['blocks.11'], or leave layers=None to use timm's feature_info.")
        repeated = sorted({n for n in layers if list(layers).count(n) > 1})
        if repeated:
            raise ValueError(f"layers names {repeated} more than once; name each grid module once.")
        names, hints, route = list(layers), [{} for _ in layers], 'hooks'
        for name in names:
            resolve_module(model, name)
    else:
        entries = feature_modules(model, multiscale)
        names = [e['module'] for e in entries]
        hints = entries
        route = 'hooks' if all(_is_called_module(model, n) for n in names) else 'intermediates'
        if len(names) > 1 and hasattr(model, 'reroll'):
            # Hiera keeps its tokens "unrolled" (not row-major) before the last stage; only
            # forward_intermediates puts the earlier stages back in grid order
            route = 'intermediates'
        if route == 'intermediates':
            if not hasattr(model, 'forward_intermediates'):
                raise ValueError(
                    f"{type(model).__name__}: feature_info names {names}, which are not modules that run, and "
                    f"there is no forward_intermediates(). Name the grid module(s) with layers=[...].")
            names = [f"intermediates.{e['index']}" for e in entries]  # by position: names can repeat (CoaT)

    outputs = _probe_outputs(model, input_size, names, route)
    unmatched = [n for n, out, hint in zip(names, outputs, hints)
                 if isinstance(out, (tuple, list)) and _matching_index(out, hint.get('num_chs')) is None]
    if unmatched and layers is None and hasattr(model, 'forward_intermediates'):
        # a multi-branch module (HRNet's last stage) none of whose outputs is the feature_info map:
        # timm's forward_intermediates builds that map, so read it there
        route, names = 'intermediates', [f"intermediates.{e['index']}" for e in hints]
        outputs = _probe_outputs(model, input_size, names, route)
    prefix_hint = getattr(model, 'num_prefix_tokens', None)
    prefer = layout or getattr(model, 'output_fmt', None)
    sources = []
    for name, out, hint in zip(names, outputs, hints):
        out, output_index = _pick_output(out, hint.get('num_chs'))
        if route == 'intermediates':
            found = ('NCHW', 0, tuple(out.shape[-2:]))
        elif layout is not None and layout != 'NLC' and out.ndim == 4:
            found = (layout, 0, tuple(out.shape[1:3] if layout == 'NHWC' else out.shape[2:4]))
        else:
            found = find_layout(out.shape, input_size[1:], hint.get('num_chs'), prefix_hint, prefer)
        grid_layout, prefix, grid_size = found
        num_chs = out.shape[1] if grid_layout == 'NCHW' else out.shape[-1]
        check_grid_size(grid_size)
        sources.append(GridSource(
            name, int(num_chs), grid_layout, prefix, tuple(grid_size), tuple(input_size[1:]), output_index))
    return sources, route


def _pick_output(output, num_chs: Optional[int]) -> Tuple[torch.Tensor, int]:
    """The grid tensor of a module output and its index: the tuple / list element with `num_chs`
    channels (feature_info's), else the first; a tensor output is itself (index 0)."""
    if not isinstance(output, (tuple, list)):
        return output, 0
    index = _matching_index(output, num_chs) or 0
    return output[index], index


def _matching_index(output: Sequence, num_chs: Optional[int]) -> Optional[int]:
    """Index of the first tuple / list element with `num_chs` channels (dim 1 or last), or None."""
    for i, o in enumerate(output):
        if num_chs is not None and torch.is_tensor(o) and o.ndim >= 3 and num_chs in (o.shape[1], o.shape[-1]):
            return i
    return None


def _is_called_module(model: nn.Module, name: str) -> bool:
    """True when `name` is a module the forward calls (a ModuleList / ModuleDict is only iterated)."""
    try:
        return not isinstance(model.get_submodule(name), (nn.ModuleList, nn.ModuleDict))
    except AttributeError:
        return False


def _probe_outputs(model: nn.Module, input_size, names: Sequence[str], route: str) -> List[torch.Tensor]:
    """Run the model once (eval, no grad) and return the output of each named grid source."""
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device('cpu')
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    x = torch.zeros(1, *input_size, device=device, dtype=dtype)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            if route == 'intermediates':
                indices = [int(n.split('.')[-1]) for n in names]
                _, feats = model.forward_intermediates(x, indices=indices, norm=False)
                return list(feats)
            captures = {n: GridCapture(output_index=None) for n in names}
            handles = [model.get_submodule(n).register_forward_hook(captures[n]) for n in names]
            for capture in captures.values():
                capture.start()
            try:
                model(x)
            finally:
                for h in handles:
                    h.remove()
    except ValueError:
        raise
    except Exception as e:
        raise ValueError(
            f"The probe pass of {type(model).__name__} on an input of {tuple(input_size)} failed ({e}). "
            f"Pass the input size the model is used with: input_size=(C, H, W).") from e
    finally:
        model.train(was_training)
    outputs = [captures[n].stop() for n in names]
    missing = [n for n, out in zip(names, outputs) if out is None]
    if missing:
        raise ValueError(f"Module(s) {missing} did not run in {type(model).__name__}'s forward: no grid to read there.")
    return outputs


def unwrap_once(m: nn.Module) -> nn.Module:
    """Strip one DDP / DataParallel / torch.compile wrapper, if any."""
    if hasattr(m, '_orig_mod'):
        return m._orig_mod
    if isinstance(m, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        return m.module
    return m


def unwrap(m: nn.Module) -> nn.Module:
    """The original model inside DRLocModel, DDP, DataParallel and torch.compile wrappers, in any nesting."""
    while True:
        inner = unwrap_once(m)
        if isinstance(inner, DRLocModel):
            inner = inner.model
        if inner is m:
            return m
        m = inner
