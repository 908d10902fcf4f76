"""Feature grids: where a model's pre-pool k x k grids come from, and how to read them.

DRLoc needs, from the same forward pass that produces the logits, the spatial grid(s) of embeddings
the classifier pools. We capture them with forward hooks on the modules that produce them:

* timm models name their stage / block outputs in `feature_info` (`layers.3` for Swin, `blocks.11`
  for ViT, `layer4` for ResNet, `stages.3` for ConvNeXt, ...). A hook on that module sees exactly the
  tensor the rest of the network consumes, while the model's own `forward()` runs unchanged, so the
  logits are bit-identical to `model(x)` by construction, whatever the model's forward does after the
  grid (pooling, heads, distillation tokens, ...).
* any `nn.Module` can be used by naming modules with `layers=[...]`.
* `forward_intermediates()` + `forward_head()` is the fallback for a timm model whose feature_info
  does not name a module that exists (it re-implements the forward per model, so hooks are preferred
  where both are possible).

A captured tensor can be laid out as NCHW (CNNs), NHWC (Swin and friends) or NLC tokens with N prefix
tokens (class / distillation / register tokens of ViTs). The layout is detected once with a probe pass
at wrap time (or given by the user) and every grid is turned into a (B, H, W, C) *view*, no copy.

    sources = probe_grids(model, (3, 224, 224))      # where each grid is, how it is read, its layout
    reader = GridReader(model, sources)             # hooks on the grid modules (or forward_intermediates)
    logits, features = reader(model, x)             # one pass; to_grid(features[i], sources[i], x.shape[-2:])
"""
import math
from dataclasses import dataclass
from enum import Enum
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from .errors import GridNotFoundError, ProbeError, SingleScaleError
from .head import check_grid_size

LAYOUTS = ('NCHW', 'NHWC', 'NLC')


class Route(str, Enum):
    """How a model's grids are read in its forward pass (all grids of a model the same way)."""
    HOOKS = 'hooks'  # forward hooks on the grid modules while the model's own forward() runs
    INTERMEDIATES = 'intermediates'  # timm's forward_intermediates(), then forward_head() for the logits

    def __str__(self) -> str:
        return self.value


@dataclass
class GridSource:
    """Where one grid comes from, how it is read and how it is laid out.

    Args:
        name: module path inside the model (as `named_modules()` lists it; feature_info's name on the
            intermediates route, where it is only shown).
        num_chs: channels C of the grid.
        layout: 'NCHW', 'NHWC' or 'NLC' (tokens).
        num_prefix_tokens: tokens before the grid tokens (NLC layout only).
        grid_size: (H, W) of the grid seen in the probe pass.
        input_size: (H, W) of the probe input, to scale the grid with the input for token layouts.
        route: read by a hook on `name`, or as forward_intermediates' feature `feature_index`.
        output_index: element of the module's output that is the grid, when it outputs a tuple / list
            (CrossViT's blocks output one token sequence per branch).
        feature_index: the feature_info index forward_intermediates is asked for (intermediates route).
    """
    name: str
    num_chs: int
    layout: str
    num_prefix_tokens: int
    grid_size: Tuple[int, int]
    input_size: Tuple[int, int]
    route: Route = Route.HOOKS
    output_index: int = 0
    feature_index: Optional[int] = None


def to_grid(x: torch.Tensor, source: GridSource, input_hw: Tuple[int, int]) -> torch.Tensor:
    """View a captured feature tensor as a (B, H, W, C) grid, without copying.

    Args:
        x: NCHW (B, C, H, W), NHWC (B, H, W, C) or NLC (B, N + H * W, C) tensor, as `source.layout` says.
        source: the GridSource describing x.
        input_hw: (H, W) of the network input of this call, used to split NLC tokens into rows.

    Returns:
        (B, H, W, C) view of x.
    """
    if source.layout == 'NCHW':
        return x.permute(0, 2, 3, 1)
    if source.layout == 'NHWC':
        return x
    tokens = x[:, source.num_prefix_tokens:]  # B, H * W, C
    height, width = token_grid_size(tokens.shape[1], source, input_hw)
    return tokens.unflatten(1, (height, width))


def token_grid_size(num_tokens: int, source: GridSource, input_hw: Tuple[int, int]) -> Tuple[int, int]:
    """Rows and columns of `num_tokens` grid tokens produced from an input of size `input_hw`."""
    probe_h, probe_w = source.grid_size
    if (probe_h * probe_w) == num_tokens and tuple(input_hw) == tuple(source.input_size):
        return probe_h, probe_w
    red_h = source.input_size[0] / probe_h
    red_w = source.input_size[1] / probe_w
    for rnd in (math.floor, math.ceil):
        h, w = int(rnd(input_hw[0] / red_h)), int(rnd(input_hw[1] / red_w))
        if h * w == num_tokens:
            return h, w
    raise GridNotFoundError(
        f"Cannot split {num_tokens} tokens of '{source.name}' into a grid for an input of {tuple(input_hw)} "
        f"(the probe saw a {probe_h}x{probe_w} grid for {tuple(source.input_size)}). Pass layout='NCHW' or "
        f"'NHWC' if this module does not output tokens, or name another module with layers=[...].")


def find_layout(
        shape: Sequence[int],
        input_hw: Tuple[int, int],
        num_chs: Optional[int] = None,
        num_prefix_tokens: Optional[int] = None,
        prefer: Optional[str] = None,
) -> Tuple[str, int, Tuple[int, int]]:
    """Guess the layout of a probe output from its shape.

    Args:
        shape: shape of the captured tensor, 4D (NCHW or NHWC) or 3D (NLC).
        input_hw: (H, W) of the probe input.
        num_chs: channels, when known (timm's feature_info), to tell NCHW from NHWC.
        num_prefix_tokens: prefix tokens of a token layout, when known (timm's `num_prefix_tokens`).
        prefer: 'NCHW' or 'NHWC' for a 4D shape that fits both (timm's `output_fmt`).

    Returns:
        (layout, num_prefix_tokens, (grid_h, grid_w))

    Raises:
        GridNotFoundError: the shape is not a spatial grid.
    """
    if len(shape) == 4:
        _, a, b, c = shape
        nchw_fits = _looks_spatial((b, c), input_hw) and (num_chs is None or a == num_chs)
        nhwc_fits = _looks_spatial((a, b), input_hw) and (num_chs is None or c == num_chs)
        if nchw_fits and nhwc_fits:
            layout = prefer if prefer in ('NCHW', 'NHWC') else 'NCHW'
        elif nchw_fits or nhwc_fits:
            layout = 'NCHW' if nchw_fits else 'NHWC'
        else:
            raise GridNotFoundError(
                f"Output of shape {tuple(shape)} for an input of {tuple(input_hw)} is not a spatial grid "
                f"(neither NCHW nor NHWC fits). Pass layout='NCHW' or 'NHWC', or name another module with layers=[...].")
        grid = (b, c) if layout == 'NCHW' else (a, b)
        return layout, 0, grid
    if len(shape) == 3:
        length = shape[1]
        # the model's num_prefix_tokens first; then none (CaiT's blocks output patch tokens only, its class
        # token joins later), then the fewest that leave a square grid
        candidates = [num_prefix_tokens] if num_prefix_tokens is not None else []
        for prefix in dict.fromkeys(candidates + [0, _square_prefix(length)]):
            grid = _token_grid(length - prefix, input_hw)
            if grid is not None and _looks_spatial(grid, input_hw):
                return 'NLC', prefix, grid
        raise GridNotFoundError(
            f"Tokens of shape {tuple(shape)} do not form a grid for an input of {tuple(input_hw)}, with "
            f"{num_prefix_tokens} (the model's), 0 or any square-leaving number of prefix tokens. "
            f"Name a module that outputs a spatial grid with layers=[...].")
    raise GridNotFoundError(
        f"Output of shape {tuple(shape)} has no spatial grid (need NCHW, NHWC or NLC tokens). "
        f"Name a module that outputs a grid with layers=[...].")


def _token_grid(spatial: int, input_hw: Tuple[int, int]) -> Optional[Tuple[int, int]]:
    """(h, w) with h * w == spatial and the input's aspect ratio, or None."""
    ratio = input_hw[1] / input_hw[0]
    h = round(math.sqrt(spatial / ratio)) if spatial > 0 else 0
    w = spatial // h if h else 0
    return (h, w) if h >= 1 and h * w == spatial else None


def _looks_spatial(hw: Tuple[int, int], input_hw: Tuple[int, int]) -> bool:
    """True when (h, w) is the input size divided by one common stride s >= 1, rounded the same way on both axes.

    Convolutions and patch embeddings round every axis alike: down (h = floor(H / s), no padding) or up
    (h = ceil(H / s), padding). An attention tensor (B, heads, N, head_dim) whose N and head_dim happen to be
    near the same size fits neither for one s (17 x 16 from a 32 x 32 input), so it is not read as a grid.
    """
    (h, w), (height, width) = hw, input_hw
    if h < 1 or w < 1:
        return False
    # floor: s in (H / (h + 1), H / h] on each axis; ceil: s in [H / h, H / (h - 1)), unbounded for h = 1
    floor_low, floor_high = max(height / (h + 1), width / (w + 1)), min(height / h, width / w)
    if floor_low < floor_high and floor_high >= 1:
        return True
    ceil_low = max(height / h, width / w, 1)
    ceil_high = min(height / (h - 1) if h > 1 else math.inf, width / (w - 1) if w > 1 else math.inf)
    return ceil_low < ceil_high


def _square_prefix(length: int) -> int:
    """Smallest number of prefix tokens that leaves a square number of grid tokens (ViTs with no attribute)."""
    for prefix in range(0, min(length, 64)):
        side = math.isqrt(length - prefix)
        if side * side == length - prefix and side > 0:
            return prefix
    return 0


def default_input_size(model: nn.Module) -> Tuple[int, int, int]:
    """The (C, H, W) input a model was built for, as the model itself records it.

    Channels: timm's `in_chans` attribute, else the in_channels of the first convolution (a CNN's stem, a
    ViT's patch projection), else the pretrained_cfg's, else 3. Size: the `img_size` the model or its input
    embedding records where the model fixes it at creation, else the pretrained_cfg's, else 224 x 224.
    """
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    cfg_size = tuple(cfg.get('input_size') or (3, 224, 224))
    return (_input_channels(model, cfg_size[0]), *_input_hw(model, cfg_size[1:]))


def _input_channels(model: nn.Module, default: int) -> int:
    """Input channels: the model's `in_chans`, else its first convolution's in_channels, else `default`."""
    in_chans = getattr(model, 'in_chans', None)
    if isinstance(in_chans, int):
        return in_chans
    first_conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    return first_conv.in_channels if first_conv is not None else int(default)


def _input_hw(model: nn.Module, default: Sequence[int]) -> Tuple[int, int]:
    """(H, W) the model was built for: the `img_size` of its patch embedding, or its own, or that of the first of
    its modules that records one (the input embedding under another name: MLP-Mixer's `stem`, TNT's
    `pixel_embed`, CoaT's `patch_embed1`, Twins' `patch_embeds.0`), else `default`."""
    for owner in (getattr(model, 'patch_embed', None), *model.modules()):
        img_size = getattr(owner, 'img_size', None)
        if isinstance(img_size, int):
            return img_size, img_size
        if isinstance(img_size, (tuple, list)) and len(img_size) == 2:
            return int(img_size[0]), int(img_size[1])
    return int(default[0]), int(default[1])


def feature_modules(model: nn.Module, multiscale: bool) -> List[Dict]:
    """The feature_info entries DRLoc reads: the last one, or one per stride for `multiscale`.

    Multi-scale keeps, for each output stride of 4 or more, the last entry with that stride (the stage
    outputs of Swin, ConvNeXt, ResNet...); a stride-2 stem is not a stage.

    Raises:
        GridNotFoundError: the model has no feature_info.
        SingleScaleError: multiscale on a model with a single stride (ViT).
    """
    info = getattr(model, 'feature_info', None)
    if not info:
        raise GridNotFoundError(
            f"{type(model).__name__} has no timm feature_info to find its spatial grid. "
            f"Name the module(s) that output the grid with layers=['module.path'].")
    entries = [dict(e, index=i) for i, e in enumerate(info)]
    if not multiscale:
        return entries[-1:]
    by_stride = {}
    for e in entries:
        if e.get('reduction', 0) >= 4:
            by_stride[e['reduction']] = e
    if len(by_stride) < 2:
        raise SingleScaleError(_single_scale_message(type(model).__name__, entries))
    return [by_stride[r] for r in sorted(by_stride)]


def _single_scale_message(model_name: str, entries: List[Dict]) -> str:
    """Why multiscale found fewer than two stages, and the fix: one head, or the grids named with `layers=`."""
    strides = sorted({e['reduction'] for e in entries if 'reduction' in e})
    if len(strides) < 2:
        return (f"multiscale=True needs a hierarchical model with stages at several strides, but {model_name} has "
                f"features at stride(s) {strides} only. Use multiscale=False (one head on the last grid).")
    last_per_stride = {e['reduction']: e['module'] for e in entries if 'reduction' in e}
    modules = [last_per_stride[r] for r in strides]
    return (f"multiscale=True reads one grid per stage at stride 4 or more (it takes stride-2 features for a stem), "
            f"and {model_name} has features at strides {strides}, so one stage at most. Use multiscale=False (one "
            f"head on the last grid), or name each grid to read, one head each: layers={modules}.")


def resolve_module(model: nn.Module, name: str) -> nn.Module:
    """model.get_submodule(name) with an error listing close names."""
    try:
        return model.get_submodule(name)
    except AttributeError:
        names = [n for n, _ in model.named_modules() if n]
        head = name.split('.')[0]
        close = [n for n in names if n.startswith(head)][:8] or names[:8]
        raise GridNotFoundError(
            f"layers: no module named '{name}' in {type(model).__name__}. "
            f"Some module names it has: {close}. Name modules as model.named_modules() lists them.") from None


# ---------------------------------------------------------------------------------------------------------
# discovery: one probe pass at wrap time finds each grid, its route and layout; reading it in training

class GridCapture:
    """Forward hook that keeps a module's output while a DRLoc forward is running."""

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
    """Reads a model's grid features in its own forward pass, as their sources say.

    On the hooks route a GridCapture hook sits on each grid module from construction until `remove()`. A
    deepcopy of the model together with its reader (an EMA copy of a DRLocModel) reads the copy's own grids.

    Args:
        model: the backbone.
        sources: the grid sources found by `probe_grids` (one route for all).
    """

    def __init__(self, model: nn.Module, sources: Sequence[GridSource]):
        self.sources = list(sources)
        self.route = self.sources[0].route
        hooked = self.sources if self.route == Route.HOOKS else []
        self.captures = [GridCapture(s.output_index) for s in hooked]
        self.handles = [model.get_submodule(s.name).register_forward_hook(c) for s, c in zip(hooked, self.captures)]
        self.removed = False

    def __call__(self, model: nn.Module, x: torch.Tensor) -> Tuple[Union[torch.Tensor, object], List[torch.Tensor]]:
        """One pass of `model` on x (B, C, H, W): its output (the logits) and the raw feature tensor of each source,
        as the module outputs it (see `to_grid` for its (B, H, W, C) view)."""
        if self.route == Route.INTERMEDIATES:
            final, features = model.forward_intermediates(
                x, indices=[s.feature_index for s in self.sources], norm=False)
            return model.forward_head(final), list(features)
        return self.read(lambda: model(x))

    def read(self, run: Callable[[], Any]) -> Tuple[Any, List[torch.Tensor]]:
        """Hooks route: `run()`'s result and the raw feature tensor each hooked module output during it, for a
        forward that someone else calls (a timm task running the student inside its own step)."""
        if self.route != Route.HOOKS:
            raise RuntimeError("These grids are read through forward_intermediates(), which only DRLocModel's own "
                               "forward calls; name the grid module(s) with layers=[...] to read them with hooks.")
        if self.removed:
            raise RuntimeError("remove_hooks() was called on this DRLocModel: it no longer reads grids. Train with "
                               "a fresh timm_drloc.wrap(model), or use the plain backbone (.model) for inference.")
        for capture in self.captures:
            capture.start()
        try:
            output = run()
        finally:
            features = [capture.stop() for capture in self.captures]
        missing = [s.name for s, f in zip(self.sources, features) if f is None]
        if missing:
            raise RuntimeError(f"The forward pass did not run module(s) {missing}: no grid to read.")
        return output, features

    def remove(self) -> None:
        """Take the hooks off the model, leaving it as it was before."""
        for handle in self.handles:
            handle.remove()
        self.handles, self.removed = [], True


def probe_grids(
        model: nn.Module,
        input_size: Tuple[int, int, int],
        multiscale: bool = False,
        layers: Optional[Sequence[str]] = None,
        layout: Optional[str] = None,
) -> List[GridSource]:
    """Find the grid source(s) with one no-grad pass in eval mode on a zero input of `input_size` (C, H, W).

    The grids are the outputs of the modules `layers` names, else the last (with `multiscale`: each stage's)
    module of timm's feature_info; where hooks cannot read those, forward_intermediates' features.

    Raises:
        GridNotFoundError, SingleScaleError, GridTooSmallError, ProbeError: naming the fix.
    """
    if layers is not None:
        names = [layers] if isinstance(layers, str) else list(layers)
        for name in names:
            resolve_module(model, name)
        entries, route = [dict(module=name) for name in names], Route.HOOKS
    else:
        entries = feature_modules(model, multiscale)
        route = _feature_route(model, entries)
    outputs = _probe_outputs(model, input_size, entries, route)
    if route == Route.HOOKS and layers is None and hasattr(model, 'forward_intermediates') and any(
            isinstance(out, (tuple, list)) and _matching_index(out, e.get('num_chs')) is None
            for e, out in zip(entries, outputs)):
        # a multi-branch module (HRNet's last stage) none of whose outputs is the feature_info map:
        # timm's forward_intermediates builds that map, so read it there
        route = Route.INTERMEDIATES
        outputs = _probe_outputs(model, input_size, entries, route)
    return [_grid_source(model, entry, out, route, input_size, layout) for entry, out in zip(entries, outputs)]


def _feature_route(model: nn.Module, entries: Sequence[Dict]) -> Route:
    """Hooks where the feature_info modules run in the forward; forward_intermediates where they do not."""
    names = [e['module'] for e in entries]
    hooks = all(_is_called_module(model, n) for n in names)
    if len(names) > 1 and hasattr(model, 'reroll'):
        # Hiera keeps its tokens "unrolled" (not row-major) before the last stage; only
        # forward_intermediates puts the earlier stages back in grid order
        hooks = False
    if hooks:
        return Route.HOOKS
    if not hasattr(model, 'forward_intermediates'):
        raise GridNotFoundError(
            f"{type(model).__name__}: feature_info names {names}, which are not modules that run, and "
            f"there is no forward_intermediates(). Name the grid module(s) with layers=[...].")
    return Route.INTERMEDIATES


def _grid_source(model: nn.Module, entry: Dict, output, route: Route, input_size: Sequence[int],
                 layout: Optional[str]) -> GridSource:
    """The GridSource of one probed output: which element is the grid, its layout, size and channels."""
    tensor, output_index = _pick_output(output, entry.get('num_chs'))
    probe_hw = (int(input_size[1]), int(input_size[2]))
    if route == Route.INTERMEDIATES:  # forward_intermediates gives NCHW maps
        grid_layout, prefix, grid_size = 'NCHW', 0, tuple(tensor.shape[-2:])
    elif layout is not None and layout != 'NLC' and tensor.ndim == 4:
        grid_layout, prefix = layout, 0
        grid_size = tuple(tensor.shape[1:3] if layout == 'NHWC' else tensor.shape[2:4])
    else:
        grid_layout, prefix, grid_size = find_layout(
            tensor.shape, probe_hw, entry.get('num_chs'), getattr(model, 'num_prefix_tokens', None),
            layout or getattr(model, 'output_fmt', None))
    check_grid_size(grid_size)
    num_chs = tensor.shape[1] if grid_layout == 'NCHW' else tensor.shape[-1]
    return GridSource(entry['module'], int(num_chs), grid_layout, prefix, tuple(grid_size), probe_hw, route,
                      output_index, entry['index'] if route == Route.INTERMEDIATES else None)


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
        if torch.is_tensor(o) and num_chs is not None and o.ndim >= 3 and num_chs in (o.shape[1], o.shape[-1]):
            return i
    return None


def _is_called_module(model: nn.Module, name: str) -> bool:
    """True when `name` is a module the forward calls (a ModuleList / ModuleDict is only iterated)."""
    try:
        return not isinstance(model.get_submodule(name), (nn.ModuleList, nn.ModuleDict))
    except AttributeError:
        return False


def _probe_outputs(model: nn.Module, input_size: Sequence[int], entries: Sequence[Dict], route: Route) -> List:
    """Run the model once (eval, no grad) and return the output of each entry's grid module (or feature)."""
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device('cpu')
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    x = torch.zeros(1, *input_size, device=device, dtype=dtype)
    was_training = model.training
    model.eval()
    captures = [GridCapture(output_index=None) for _ in entries]
    try:
        with torch.no_grad():
            if route == Route.INTERMEDIATES:
                _, features = model.forward_intermediates(x, indices=[e['index'] for e in entries], norm=False)
                return list(features)
            handles = [model.get_submodule(e['module']).register_forward_hook(c) for e, c in zip(entries, captures)]
            for capture in captures:
                capture.start()
            try:
                model(x)
            finally:
                for handle in handles:
                    handle.remove()
    except Exception as e:
        raise ProbeError(
            f"The probe pass of {type(model).__name__} on an input of {tuple(input_size)} failed ({e}). "
            f"Pass the input size the model is used with: input_size=(C, H, W).") from e
    finally:
        model.train(was_training)
    outputs = [capture.stop() for capture in captures]
    missing = [e['module'] for e, out in zip(entries, outputs) if out is None]
    if missing:
        raise GridNotFoundError(
            f"Module(s) {missing} did not run in {type(model).__name__}'s forward: no grid to read there.")
    return outputs
