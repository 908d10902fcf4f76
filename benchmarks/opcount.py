"""How many operators DRLoc adds to a training step: the figure that does not depend on the machine.

On a GPU whose step is bound by the host launching kernels (benchmarks/README.md, H100), every operator
the head dispatches costs host time, whatever its FLOPs. This counts, for one training step (zero_grad,
forward with the loss, backward, AdamW step), the operators timm's ClassificationTask and DRLocTask
dispatch on the same model and batch, with a TorchDispatchMode below autograd (what the device runs,
forward and backward), split into

* kernel ops: operators that run a kernel (matmul, add, gather, fill, copy, random draw, ...) and the
  kernels torch.compile generated (each one a launch, counted from the profiler), and
* views: operators that only make a new view or allocate (view, expand, permute, t, detach, empty).

Reads of CPU scalars (AdamW's per-parameter step counts, on the CPU also when training on CUDA) are
counted apart and left out of both.

The DRLoc columns are DRLoc's count minus timm's. The optimizer is AdamW with foreach=True, as CUDA
runs it by default (one launch per operator for all parameters), so the head's six parameters add no
operators there; on a CPU, torch's default AdamW loops over parameters instead. The head alone is
DRLocHead's forward and backward on a (B, H, W, C) grid of each model's shape and storage.

    python benchmarks/opcount.py                       # fp32 and bf16 autocast, eager head
    python benchmarks/opcount.py --compile-head        # the same with the head compiled
    python benchmarks/opcount.py --models tiny_vit --list    # which operators the DRLoc step adds

`tiny_vit` is the digits demo's ViT (4 blocks, 64 wide) at 16 px inputs, a 4x4 grid (the demo's inputs
before issue 11; it now trains at 32 px, an 8x8 grid). The counts do not
depend on the batch size from 2 on (at batch 1 some copies of strided grids are views); they do depend
on autocast (casts) and on the head's first-layer path (`DRLocHead.projects_cells_first`). An eager GPU
head gathers the pairs first; a CPU head, or a compiled one, projects every cell first on grids with fewer
cells than pairs and at least as many channels as the hidden width (ResNet-50's and Swin-T's 7x7), 1-3
operators more eager, fewer compiled. The counts follow a GPU head by default (`--first-layer as-on-gpu`),
whatever the machine; `--first-layer auto` counts this machine's choice.
"""
import argparse
import collections
import os
import sys
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # overhead.py beside this file
from overhead import (  # noqa: E402
    DEFAULT_MODELS, TINY_VIT, add_first_layer_flag, build_tasks, force_first_layer, make_batch, make_step,
    model_img_size)
from overhead import parse_args as overhead_args  # noqa: E402

# operators that dispatch but launch no kernel besides the views torch marks as such: allocation only
NO_KERNEL = frozenset((
    'aten.empty.memory_format', 'aten.empty_strided.default', 'aten.empty_like.default',
    'aten.new_empty.default', 'aten.new_empty_strided.default', 'aten._unsafe_view.default',
    'aten.lift_fresh.default', 'aten.detach.default', 'aten.alias.default',
))
# reads of a CPU scalar: AdamW's per-parameter step count lives on the CPU even when training on CUDA
HOST_ONLY = frozenset(('aten._local_scalar_dense.default',))
COMPILED_KERNEL_MARKS = ('cpp_fused', 'triton_')  # names of torch.compile's generated kernels


@dataclass
class OpCount:
    """Operators dispatched by one step: name -> calls, kernel-launching ones and views apart."""
    kernels: collections.Counter = field(default_factory=collections.Counter)
    views: collections.Counter = field(default_factory=collections.Counter)
    host: collections.Counter = field(default_factory=collections.Counter)

    @property
    def num_kernels(self) -> int:
        return sum(self.kernels.values())

    @property
    def num_views(self) -> int:
        return sum(self.views.values())


class OpCounter(TorchDispatchMode):
    """Counts every operator dispatched below autograd while active.

    It declares itself an infrastructure mode so that torch.compile'd code still runs compiled under it
    (dynamo runs a function eagerly under a user dispatch mode); the compiled code's calls into aten
    (matmuls, random draws) are counted here, its generated kernels by `count_step` from the profiler.
    """

    def __init__(self):
        super().__init__()
        self.count = OpCount()

    @classmethod
    def is_infra_mode(cls) -> bool:
        return True

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if func.is_view or name in NO_KERNEL:
            self.count.views[name] += 1
        elif name in HOST_ONLY:
            self.count.host[name] += 1
        else:
            self.count.kernels[name] += 1
        return func(*args, **(kwargs or {}))


def count_step(step: Callable[[], None], compiled: bool = False) -> OpCount:
    """Operators of one call of `step`; with `compiled`, also the kernels torch.compile generated.

    `compiled` needs inductor's kernel profiling on before the compilation:
    `torch._inductor.config.cpp.enable_kernel_profile = True` (see `profile_compiled_kernels`).
    """
    if not compiled:
        with OpCounter() as counter:
            step()
        return counter.count
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof, OpCounter() as counter:
        step()
    for event in prof.events():
        on_device = event.device_type != torch.autograd.DeviceType.CPU
        if any(mark in event.name for mark in COMPILED_KERNEL_MARKS) and (on_device or 'cpp_fused' in event.name):
            counter.count.kernels[f'compiled:{event.name}'] += 1
    return counter.count


def profile_compiled_kernels() -> None:
    """Make the CPU kernels torch.compile generates from now on show up in the profiler (by name)."""
    import torch._inductor.config as inductor_config
    inductor_config.cpp.enable_kernel_profile = True


def count_task_steps(tasks: Dict[str, nn.Module], images: torch.Tensor, labels: torch.Tensor,
                     amp: bool, compiled: bool = False) -> Dict[str, OpCount]:
    """One counted training step of each task (after a warm-up step), with a fresh foreach AdamW.

    images: (B, 3, H, W); labels: (B,). The warm-up step creates the AdamW state and compiles what is compiled.
    """
    from timm.optim import create_optimizer_v2
    counts = {}
    for name, task in tasks.items():
        optimizer = create_optimizer_v2(task.get_trainable_module(), 'adamw', lr=1e-4, weight_decay=0.05,
                                        foreach=True)
        step = make_step(task, optimizer, images, labels, amp)
        step()
        counts[name] = count_step(step, compiled)
    return counts


def count_head(grid_size: Sequence[int], chans: int, layout: str, batch_size: int, amp: bool,
               compile_head: bool, device: torch.device) -> OpCount:
    """Operators of the head alone, forward and backward, on a (B, H, W, C) grid stored as `layout`."""
    from timm_drloc import DRLocHead
    head = DRLocHead(chans, tuple(grid_size), **({'compiled': True} if compile_head else {})).to(device)
    height, width = grid_size
    if layout == 'NCHW':
        grid = torch.randn(batch_size, chans, height, width, device=device).permute(0, 2, 3, 1)
    else:
        grid = torch.randn(batch_size, height, width, chans, device=device)
    grid.requires_grad_()
    seed = torch.ones((), device=device)  # the backward's seed, made once: a step makes it for its total loss

    def step() -> None:
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp):
            loss = head(grid)
        loss.backward(seed)
        head.zero_grad(set_to_none=True)
        grid.grad = None
    step()
    return count_step(step, compile_head)


def added_ops(counts: Dict[str, OpCount]) -> Tuple[int, int]:
    """(kernel-launching operators, views) of counts['drloc'] beyond counts['timm']."""
    drloc, timm = counts['drloc'], counts['timm']
    return drloc.num_kernels - timm.num_kernels, drloc.num_views - timm.num_views


def added(drloc: collections.Counter, timm: collections.Counter) -> collections.Counter:
    """Per operator, the calls DRLoc's step makes beyond timm's (negative: fewer)."""
    return collections.Counter({k: drloc[k] - timm[k] for k in set(drloc) | set(timm) if drloc[k] != timm[k]})


@dataclass
class ModelCounts:
    """The op counts of one model: both tasks' steps and the head alone."""
    timm: OpCount
    drloc: OpCount
    head: OpCount
    grids: str

    @property
    def added(self) -> Tuple[int, int]:
        """(kernel-launching operators, views) DRLoc's step adds to timm's."""
        return added_ops({'timm': self.timm, 'drloc': self.drloc})


def count_model(model_name: str, amp: bool, compile_head: bool, batch_size: int, img_size: int,
                device: torch.device) -> ModelCounts:
    """Op counts of timm's step, DRLoc's step and the head alone for `model_name`."""
    size = model_img_size(model_name, img_size)
    # overhead.py's defaults (seed 0, m = 64, hidden 512, no kd / multiscale / A/A), so its new options follow
    args = overhead_args(['--img-size', str(size), *(['--compile-head'] if compile_head else [])])
    tasks, _, drloc = build_tasks(args, model_name, device)
    images, labels = make_batch(batch_size, size, 0, device)
    steps = count_task_steps(tasks, images, labels, amp, compile_head)
    sources = drloc.trainable_module.sources
    first = sources[0]  # one grid per model here (no multiscale)
    head = count_head(first.grid_size, first.num_chs, first.layout, batch_size, amp, compile_head, device)
    grids = ', '.join(f'{s.grid_size[0]}x{s.grid_size[1]}x{s.num_chs}' for s in sources)
    return ModelCounts(steps['timm'], steps['drloc'], head, grids)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--models', nargs='+', default=[*DEFAULT_MODELS, TINY_VIT])
    parser.add_argument('--precision', nargs='+', choices=('fp32', 'bf16'), default=['fp32', 'bf16'],
                        help='fp32, and/or bf16 autocast (what the GPU benchmarks run)')
    parser.add_argument('--compile-head', action='store_true', help='DRLoc heads compiled (compile_head=True)')
    parser.add_argument('--batch-size', type=int, default=2,
                        help='2: at batch 1 some copies of strided grids become views and are not counted')
    parser.add_argument('--img-size', type=int, default=224, help=f'input size (not for {TINY_VIT}: 16)')
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--list', action='store_true', help='print the operators DRLoc adds, by name')
    add_first_layer_flag(parser, 'as-on-gpu', ", so that any machine counts a GPU step's operators")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(min(torch.get_num_threads(), 2))
    device = torch.device(args.device)
    force_first_layer(args.first_layer)
    profile_compiled_kernels()
    print(f'# torch {torch.__version__}; operators per training step (forward, backward, foreach AdamW), '
          f'batch {args.batch_size}, m=64, hidden 512, head {"compiled" if args.compile_head else "eager"}, '
          f'first layer {args.first_layer}')
    print(f"{'model':<30} {'prec':<5} {'timm kernels':>12} {'DRLoc +kernels':>14} {'DRLoc +views':>12} "
          f"{'head kernels':>12} {'head views':>10}  grid")
    for model_name in args.models:
        for precision in args.precision:
            counts = count_model(model_name, precision == 'bf16', args.compile_head, args.batch_size,
                                 args.img_size, device)
            added_kernels, added_views = counts.added
            print(f'{model_name:<30} {precision:<5} {counts.timm.num_kernels:12d} {added_kernels:+14d} '
                  f'{added_views:+12d} {counts.head.num_kernels:12d} {counts.head.num_views:10d}  '
                  f'{counts.grids}', flush=True)
            if args.list:
                for kind in ('kernels', 'views', 'host'):
                    diff = added(getattr(counts.drloc, kind), getattr(counts.timm, kind))
                    print(f'    added {kind}: ' + ', '.join(
                        f'{name.replace("aten.", "")} {n:+d}' for name, n in sorted(diff.items())))
    return 0


if __name__ == '__main__':
    sys.exit(main())
