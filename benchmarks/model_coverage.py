"""Model coverage: does `timm_drloc.wrap()` train one step on one small model of every timm module?

For each module of `timm.list_modules()` (or those named with --modules):

1. pick its smallest model: rank names by size words ('atto' ... 'small'), build the best few on the
   meta device and keep the one with the fewest parameters;
2. build it (pretrained=False, num_classes=10) at the smallest input size it runs at, among
   --sizes, passing `img_size` to models that take it (fixed-size ViTs and friends);
3. wrap it with `timm_drloc.wrap(model, hidden_dim=64, input_size=...)`;
4. run one training step (train-mode forward, loss = CE + DRLoc, backward) and check that the DRLoc
   loss alone reaches the backbone, that every head parameter gets a gradient (not all zero), and that
   eval-mode logits of the wrapped model equal the unwrapped model's;
5. check the grid is the right one: its channels are the last feature_info entry's (and whether they
   equal `model.num_features`), its size is the input size over that entry's stride, and its cells
   match the spatial size of `forward_features()`.

Each module ends in one status: `ok`, `suspect grid` (runs, but a grid check failed: maybe a wrong
grid), `unsupported (clear error)` (wrap raised our ValueError and forward_features shows no grid),
`unsupported (has a grid)` (our ValueError, although forward_features has a spatial grid: a gap),
`bug` (any other exception, our probe breaking a model that runs, or a failed gradient / logits
check), `model does not run` (the plain model fails at every size tried: not a DRLoc matter),
`not a classifier` (its forward does not return (B, 10) logits: an encoder), or `timeout`.

Usage:
    python benchmarks/model_coverage.py                      # all modules, ~10 min on 2 CPU cores
    python benchmarks/model_coverage.py --modules resnet vision_transformer --limit 5
"""
import argparse
import functools
import math
import multiprocessing
import re
import signal
import sys
import time
import traceback
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

import timm_drloc

# name parts that mark small variants, smallest first; a name's rank is its first matching word
SIZE_WORDS = (
    'atto', 'zepto', 'femto', 'pico', 'nano', 'xxxs', 'micro', 'xxs', 'tiny', 't0', 'mini', 'xs', 'lite0',
    'b0', 's0', 'm0', 'small', 's', 't', 'b1', 'light', 'base', 'b')
TOKEN_SPLIT = re.compile(r'[_.]')

STATUSES = (
    'ok', 'suspect grid', 'unsupported (clear error)', 'unsupported (has a grid)', 'bug', 'model does not run',
    'not a classifier', 'timeout')


@dataclass
class Result:
    """Outcome of one module."""
    module: str
    model: str = ''
    params: int = 0
    size: int = 0
    status: str = ''
    detail: str = ''
    notes: List[str] = field(default_factory=list)
    seconds: float = 0.0


class NotAClassifier(Exception):
    """The model's forward does not return (B, num_classes) logits (an encoder without a classifier head)."""


class Timeout(BaseException):
    """Raised by the alarm when one module takes longer than --timeout seconds (not caught as an Exception)."""


def _alarm(signum, frame):
    raise Timeout()


def name_rank(name: str) -> Tuple[int, int, int]:
    """Sort key of a model name: size word rank, then the first number in it (depth, width), then length."""
    tokens = TOKEN_SPLIT.split(name.lower())
    rank = len(SIZE_WORDS)
    for i, word in enumerate(SIZE_WORDS):
        if word in tokens or any(t.startswith(word) and t[len(word):].isdigit() for t in tokens if len(word) > 1):
            rank = i
            break
    numbers = [int(n) for n in re.findall(r'\d+', name)]
    return rank, numbers[0] if numbers else 10 ** 6, len(name)


def count_meta(name: str) -> Optional[Tuple[int, float]]:
    """(parameters, stride of the last feature_info entry) of `name` with num_classes=10, built on the
    meta device (no memory, no init); None when it cannot be built there."""
    try:
        with torch.device('meta'):
            model = timm.create_model(name, pretrained=False, num_classes=10)
    except Exception:
        return None
    info = getattr(model, 'feature_info', None)
    reduction = float(info[-1].get('reduction') or 0) if info else 0.0
    return sum(p.numel() for p in model.parameters()), reduction


def pick_model(module: str, candidates: int) -> Tuple[str, Optional[int], float]:
    """The smallest model of a timm module among its `candidates` best-ranked names.

    Returns:
        (name, parameters or None, stride of its last feature map or 0 when unknown)
    """
    names = sorted(timm.list_models(module=module), key=name_rank)
    if not names:
        raise ValueError(f"timm module '{module}' registers no models")
    counted = [(count_meta(n), n) for n in names[:candidates]]
    counted = [(c[0], c[1], n) for c, n in counted if c is not None]
    if not counted:
        return names[0], None, 0.0
    params, reduction, name = min(counted)
    return name, params, reduction


def create(name: str, img_size: Optional[int], device: str = 'cpu') -> nn.Module:
    """timm.create_model(name, pretrained=False, num_classes=10[, img_size=img_size]) on `device`."""
    kwargs = dict(pretrained=False, num_classes=10)
    if img_size is not None:
        kwargs['img_size'] = img_size
    with torch.device(device):
        return timm.create_model(name, **kwargs)


def build_at_smallest_size(name: str, sizes: Sequence[int], reduction: float = 0.0) -> Tuple[nn.Module, int, List[str]]:
    """Build `name` at the first size with a grid of 2x2 or more (S >= 2 * `reduction`, the last stride)
    that it runs a (2, 3, S, S) eval forward at.

    Models that take `img_size` (fixed-size token models) are rebuilt for each size; the others are
    built once and fed each size.

    Returns:
        (model in eval mode, S, notes)

    Raises:
        RuntimeError: the plain model runs at none of `sizes` (nor at its pretrained_cfg input size).
    """
    errors = []
    default = timm.get_pretrained_cfg(name)
    default_size = int(default.input_size[-1]) if default is not None and default.input_size else 224
    takes_img_size, model = True, None
    tried = [s for s in sizes if s >= 2 * reduction] or [max(sizes)]
    for size in list(dict.fromkeys(tried + [default_size])):
        try:
            if takes_img_size:
                try:
                    model = create(name, size)
                except TypeError as e:
                    if 'img_size' not in str(e):
                        raise
                    takes_img_size, model = False, None
            if model is None:
                model = create(name, None)
            model.eval()
            with torch.no_grad():
                out = model(torch.randn(2, 3, size, size))
            if not torch.is_tensor(out) or tuple(out.shape) != (2, 10):
                shape = tuple(out.shape) if torch.is_tensor(out) else type(out).__name__
                raise NotAClassifier(f'with num_classes=10 its forward returns {shape}, not (2, 10) logits')
            notes = [] if size in tried else [f'runs only at its default size {size}']
            return model, size, notes
        except NotAClassifier:
            raise
        except Exception as e:
            errors.append(f'{size}: {type(e).__name__}: {_first_line(e)}')
    raise RuntimeError('; '.join(errors[-2:]))


def expected_cells(model: nn.Module, x: torch.Tensor) -> Optional[int]:
    """Spatial cells of `forward_features(x)` (H * W of a 4D map, tokens less prefix tokens), None if unclear."""
    try:
        with torch.no_grad():
            feats = model.forward_features(x)
    except Exception:
        return None
    if not torch.is_tensor(feats):
        return None
    num_features = getattr(model, 'num_features', None)
    if feats.ndim == 4:
        if feats.shape[1] == num_features:
            return feats.shape[2] * feats.shape[3]
        if feats.shape[3] == num_features:
            return feats.shape[1] * feats.shape[2]
        return None
    if feats.ndim == 3:
        return feats.shape[1] - int(getattr(model, 'num_prefix_tokens', 0) or 0)
    return None


def check_grids(model: nn.Module, drloc: timm_drloc.DRLocModel, size: int, x: torch.Tensor) -> Tuple[List[str], List[str]]:
    """Compare the grid DRLoc reads with what timm says the last feature map is.

    Returns:
        (problems, notes): problems suggest a wrong grid; notes are facts worth reading.
    """
    problems, notes = [], []
    source = drloc.sources[-1]
    info = getattr(model, 'feature_info', None)
    last = dict(info[-1]) if info else {}
    height, width = source.grid_size
    if last.get('num_chs') is not None and source.num_chs != last['num_chs']:
        problems.append(f"grid has {source.num_chs} channels, feature_info[-1] ({last.get('module')}) has {last['num_chs']}")
    reduction = last.get('reduction')
    if reduction:
        want = size / reduction
        for cells in (height, width):
            if cells > math.ceil(want) + 1 or cells < want / 2 - 1:
                problems.append(f"grid is {height}x{width}, input {size} / stride {reduction} = {want:g}")
                break
            if cells < math.floor(want):  # unpadded convolutions (Inception) lose a few cells on the way
                notes.append(f"grid is {height}x{width}, under input {size} / stride {reduction} = {want:g}")
                break
    cells = expected_cells(model, x)
    if cells is not None and cells != height * width:
        notes.append(f'forward_features has {cells} spatial cells, the grid {height * width}')
    num_features = getattr(model, 'num_features', None)
    if num_features is not None and num_features != source.num_chs:
        notes.append(f'grid channels {source.num_chs} != num_features {num_features} (a layer after the last stage)')
    return problems, notes


def train_step(model: nn.Module, size: int) -> Tuple[str, str, List[str]]:
    """Wrap, compare eval logits, run one training step and check gradients; returns (status, detail, notes)."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, size, size)
    target = torch.tensor([1, 7])
    with torch.no_grad():
        reference = model(x)
    try:
        drloc = timm_drloc.wrap(model, hidden_dim=64, input_size=(3, size, size))
    except ValueError as e:
        cause = e.__cause__ or e
        if cause is not e or not _raised_by_us(e):  # the model failed in our probe pass, yet it ran at this size
            return 'bug', f'wrap probe: {type(cause).__name__}: {_first_line(cause)} [{_where(cause)}]', []
        cells = expected_cells(model, x)
        if cells is not None and cells >= 2:  # forward_features shows a grid that wrap() did not find
            return 'unsupported (has a grid)', f'ValueError: {_first_line(e)} [forward_features: {cells} cells]', []
        return 'unsupported (clear error)', f'ValueError: {_first_line(e)}', []
    except Exception as e:
        return 'bug', f'wrap: {type(e).__name__}: {_first_line(e)} [{_where(e)}]', []

    sources = ', '.join(f'{s.name} {s.grid_size[0]}x{s.grid_size[1]}x{s.num_chs} {s.layout}'
                        + (f'+{s.num_prefix_tokens}' if s.num_prefix_tokens else '') for s in drloc.sources)
    route = f'{sources} ({drloc.route})'
    try:
        drloc.eval()
        with torch.no_grad():
            wrapped = drloc(x)
        if not torch.equal(wrapped, reference):
            return 'bug', f'{route}: eval logits differ from the unwrapped model (max diff {(wrapped - reference).abs().max():.3g})', []
        if timm_drloc.unwrap(drloc) is not model:
            return 'bug', f'{route}: unwrap() did not return the original model', []
        problems, notes = check_grids(model, drloc, size, x)

        drloc.train()
        logits, drloc_loss = drloc(x)
        if tuple(logits.shape) != (2, 10):
            return 'bug', f'{route}: train logits have shape {tuple(logits.shape)}, expected (2, 10)', notes
        if not torch.isfinite(drloc_loss):
            return 'bug', f'{route}: DRLoc loss is {drloc_loss.item()}', notes
        backbone = [p for p in model.parameters() if p.requires_grad]
        drloc_grads = torch.autograd.grad(drloc_loss, backbone, retain_graph=True, allow_unused=True)
        if not any(g is not None and g.abs().sum() > 0 for g in drloc_grads):
            return 'bug', f'{route}: the DRLoc loss does not reach the backbone', notes
        loss = F.cross_entropy(logits, target) + 0.5 * drloc_loss
        loss.backward()
        # every head parameter gets a gradient; a single one may be exactly zero (the L1 output bias, when
        # as many predictions are above their targets as below), the heads' gradient as a whole may not
        heads_missing = [n for n, p in drloc.heads.named_parameters() if p.grad is None]
        if heads_missing or not any(p.grad.abs().sum() > 0 for p in drloc.heads.parameters()):
            return 'bug', f'{route}: head parameters without gradient: {heads_missing or "all zero"}', notes
    except Exception as e:
        return 'bug', f'{route}: {type(e).__name__}: {_first_line(e)} [{_where(e)}]', []
    detail = f'{route}, drloc {drloc_loss.item():.3f}'
    if problems:
        return 'suspect grid', f'{detail}: ' + '; '.join(problems), notes
    return 'ok', detail, notes


def run_module(module: str, sizes: Sequence[int], candidates: int, timeout: int) -> Result:
    """Pick, build, wrap and train one model of `module`, within `timeout` seconds."""
    result = Result(module)
    start = time.time()
    signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(timeout)
    try:
        result.model, params, reduction = pick_model(module, candidates)
        sizes_left = list(sizes)
        while True:
            try:
                model, result.size, result.notes = build_at_smallest_size(result.model, sizes_left, reduction)
            except RuntimeError as e:
                result.status, result.detail = 'model does not run', str(e)
                return result
            except NotAClassifier as e:
                result.status, result.detail = 'not a classifier', str(e)
                return result
            result.params = params or sum(p.numel() for p in model.parameters())
            result.status, result.detail, notes = train_step(model, result.size)
            result.notes += notes
            larger = [s for s in sizes_left if s > result.size]
            if not (result.status.startswith('unsupported') and 'grid is 1x1' in result.detail and larger):
                break
            sizes_left = larger  # a 1x1 grid at this size (valid padding, odd strides): try the next size
    except Timeout:
        result.status, result.detail = 'timeout', f'over {timeout} s'
    except Exception as e:
        result.status, result.detail = 'bug', f'{type(e).__name__}: {_first_line(e)} [{_where(e)}]'
    finally:
        signal.alarm(0)
        result.seconds = time.time() - start
    return result


def run_module_in_worker(module: str, sizes: Sequence[int], candidates: int, timeout: int) -> Result:
    """run_module in a pool worker, on one CPU thread."""
    torch.set_num_threads(1)
    return run_module(module, sizes, candidates, timeout)


def _raised_by_us(e: BaseException) -> bool:
    """True when the innermost frame of the traceback is in timm_drloc (our own error, not the model's)."""
    frames = traceback.extract_tb(e.__traceback__)
    return bool(frames) and 'timm_drloc' in frames[-1].filename


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:300] if text else ''


def _where(e: BaseException) -> str:
    """file:line of the innermost frame of the traceback (to tell our code from timm's)."""
    frames = traceback.extract_tb(e.__traceback__)
    if not frames:
        return '?'
    ours = [f for f in frames if 'timm_drloc' in f.filename]
    frame = frames[-1]
    where = f'{frame.filename.split("site-packages/")[-1]}:{frame.lineno}'
    if ours and ours[-1] is not frame:
        where += f' via {ours[-1].filename.split("/")[-1]}:{ours[-1].lineno}'
    return where


def print_summary(results: Sequence[Result], argv: Sequence[str]) -> None:
    """Counts per status and one line per module that is not `ok`."""
    by_status: Dict[str, List[Result]] = defaultdict(list)
    for r in results:
        by_status[r.status].append(r)
    print()
    print(f'== summary: {len(by_status["ok"])} / {len(results)} timm modules train with DRLoc '
          f'(timm {timm.__version__}, torch {torch.__version__}, timm_drloc {timm_drloc.__version__})')
    print(f'   command: python benchmarks/model_coverage.py {" ".join(argv)}'.rstrip())
    for status in STATUSES:
        group = by_status.get(status, [])
        print(f'   {status}: {len(group)}')
    for status in STATUSES[1:]:
        for r in by_status.get(status, []):
            print(f'   [{status}] {r.module} / {r.model}: {r.detail}')
    noted = [r for r in results if r.status == 'ok' and r.notes]
    if noted:
        print('   notes on working models:')
        for r in noted:
            print(f'   [note] {r.module} / {r.model}: {"; ".join(r.notes)}')


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--modules', nargs='+', default=None, help='timm modules to test (default: all)')
    parser.add_argument('--limit', type=int, default=None, help='test only the first N modules')
    parser.add_argument('--sizes', type=int, nargs='+', default=[64, 96, 128, 160, 224],
                        help='input sizes to try, smallest first (default: 64 96 128 160 224)')
    parser.add_argument('--candidates', type=int, default=4,
                        help='best-ranked names per module whose parameters are counted (default: 4)')
    parser.add_argument('--timeout', type=int, default=180, help='seconds per module (default: 180)')
    parser.add_argument('--jobs', type=int, default=2,
                        help='modules tested at once, each in its own process with one thread (default: 2)')
    args = parser.parse_args(argv)
    modules = args.modules or timm.list_modules()
    unknown = sorted(set(modules) - set(timm.list_modules()))
    if unknown:
        parser.error(f'unknown timm module(s) {unknown}; timm.list_modules() lists the names')
    modules = modules[:args.limit] if args.limit else modules

    results = []
    one = functools.partial(run_module_in_worker, sizes=args.sizes, candidates=args.candidates, timeout=args.timeout)
    # a fresh process per module: one model's crash, leak or thread setting cannot touch the next
    with multiprocessing.get_context('fork').Pool(args.jobs, maxtasksperchild=1) as pool:
        for r in pool.imap(one, modules):
            results.append(r)
            params = f'{r.params / 1e6:.2f}M' if r.params else '?'
            notes = f'  [{"; ".join(r.notes)}]' if r.notes else ''
            print(f'[{r.status}] {r.module} / {r.model} ({params}, {r.size}px, {r.seconds:.1f}s): {r.detail}{notes}', flush=True)
    print_summary(results, sys.argv[1:] if argv is None else argv)
    fine = ('ok', 'unsupported (clear error)', 'model does not run', 'not a classifier')
    return 0 if all(r.status in fine for r in results) else 1


if __name__ == '__main__':
    sys.exit(main())
