"""The DRLoc head's two first-layer paths, timed against each other on the grids you give.

The first layer W [e_a; e_b] + b of each sampled pair can run on the gathered pairs ('gather': the pairs
first, then one Linear on B x M rows) or on every cell ('project': both halves of W on B x H x W rows,
then a gather of the projections). Both give the same values; `DRLocHead.projects_cells_first` picks one
per device and grid. This times the first layer alone, forward and backward into the grid, both paths
alternating on the same grid and pairs, and prints the paired ratio project / gather with its 95 %
interval (overhead.py's `paired_ratio`): below 1, projecting cells first is the cheaper path there.

    python benchmarks/first_layer.py                          # the benchmark models' grids and a few small ones
    python benchmarks/first_layer.py --grids 7x7x2048 4x4x64 --device cuda --batch-size 64

Times are process CPU time on a CPU, wall clock (synchronized) on CUDA.
"""
import argparse
import os
import statistics
import sys
from typing import Callable, Optional, Sequence, Tuple

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # overhead.py beside this file
from overhead import device_name, paired_ratio, synchronize, time_alternating  # noqa: E402

DEFAULT_GRIDS = ('7x7x2048', '7x7x768', '7x7x384', '4x4x512', '4x4x256', '4x4x64', '14x14x384')


def parse_grid(text: str) -> Tuple[int, int, int]:
    """'HxWxC' -> (H, W, C)."""
    try:
        height, width, channels = (int(part) for part in text.lower().split('x'))
    except ValueError:
        raise argparse.ArgumentTypeError(f"grid {text!r} is not HxWxC (for example 7x7x768)") from None
    return height, width, channels


def path_step(head: torch.nn.Module, grid: torch.Tensor, cells: torch.Tensor, per_cell: bool
              ) -> Callable[[], None]:
    """One forward and backward of the head's first layer on `grid` (B, H, W, C, requires grad) by one path."""
    path = head.project_then_gather if per_cell else head.gather_then_project
    seed = torch.ones((), device=grid.device)

    def step() -> None:
        grid.grad = None
        head.zero_grad(set_to_none=True)
        path(grid, cells).sum().backward(seed)
        synchronize(grid.device)
    return step


def time_grid(size: Tuple[int, int, int], args: argparse.Namespace, device: torch.device):
    """(rule's choice, median project s, median gather s, (ratio, low, high)) for one grid size."""
    from timm_drloc import DRLocHead
    from timm_drloc.head import draw_cells
    height, width, channels = size
    torch.manual_seed(args.seed)
    head = DRLocHead(channels, (height, width), num_samples=args.samples, hidden_dim=args.hidden_dim).to(device)
    grid = torch.randn(args.batch_size, channels, height, width, device=device).permute(0, 2, 3, 1)  # NCHW view
    grid = grid.detach().requires_grad_()
    cells = draw_cells(args.batch_size, height * width, args.samples, device)
    steps = {per_cell: path_step(head, grid, cells, per_cell) for per_cell in (True, False)}
    wall, cpu = time_alternating(steps, args.steps, args.warmup)
    times = wall if device.type == 'cuda' else cpu
    choice = 'project' if head.projects_cells_first(grid, args.samples) else 'gather'
    return choice, statistics.median(times[True]), statistics.median(times[False]), \
        paired_ratio(times[False], times[True])


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--grids', nargs='+', type=parse_grid, default=[parse_grid(g) for g in DEFAULT_GRIDS],
                        metavar='HxWxC', help='grid sizes (default: %(default)s)')
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--batch-size', type=int, default=8)
    parser.add_argument('--samples', type=int, default=64, help='DRLoc pairs per image (m)')
    parser.add_argument('--hidden-dim', type=int, default=512)
    parser.add_argument('--steps', type=int, default=21, help='timed rounds (each path once per round)')
    parser.add_argument('--warmup', type=int, default=3)
    parser.add_argument('--threads', type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument('--seed', type=int, default=0)
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    name = device_name(device)
    print(f'# torch {torch.__version__}, {name}; batch {args.batch_size}, m={args.samples}, hidden {args.hidden_dim}, '
          f'first layer forward + backward, median of {args.steps} rounds after {args.warmup} warm-up')
    print(f"{'grid':<12} {'head picks':>10} {'project ms':>10} {'gather ms':>10}  project / gather [95 % interval]")
    for size in args.grids:
        choice, project, gather, (ratio, low, high) = time_grid(size, args, device)
        label = 'x'.join(str(n) for n in size)
        print(f'{label:<12} {choice:>10} {project * 1e3:10.2f} {gather * 1e3:10.2f}  '
              f'{ratio:.3f} [{low:.3f}, {high:.3f}]', flush=True)
    return 0


if __name__ == '__main__':
    sys.exit(main())
