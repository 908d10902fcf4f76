"""Step-time ratios of DRLoc against plain timm on a GPU, with the A/A spread beside them, in one process.

Per model and batch size, the tasks below train copies of one freshly initialized model on one fixed
batch, their steps alternating (the order reverses every round), bf16 autocast, foreach AdamW:

* eager:    timm | timm again (A/A) | DRLoc, eager head | DRLoc, head compiled (compile_head=True, or
            with --head-mode reduce-overhead the head's step in CUDA graphs)
* compiled: the same with task.compile() (the whole model, heads inside): timm | timm again | DRLoc

Each ratio is a task's step time over timm's: the median of `--steps` timed steps after `--warmup`, and
the fastest over the fastest (interference only adds time, so min is the steadier one), and the paired
ratio (overhead.paired_ratio: the median of per-round ratios, with its 95 % interval). The A/A row is
the yardstick: with nothing to measure it shows how far a ratio strays from 1.0. In eager mode the
first batch size also reports the GPU kernels one step launches (torch.profiler), the count that
benchmarks/opcount.py estimates on a CPU.

    python benchmarks/gpu_ratios.py --mode eager --batch-sizes 64 128
    python benchmarks/gpu_ratios.py --mode compiled --batch-sizes 64 --time-limit 300
    python benchmarks/gpu_ratios.py --device cpu --models tiny_vit --batch-sizes 4 --steps 5 --warmup 1   # toy run

benchmarks/gpu_ratios.sh runs both modes within about ten minutes of an H100.
"""
import argparse
import copy
import os
import statistics
import sys
import time
from typing import Dict, Optional, Sequence

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # overhead.py, gpu_diag.py beside this file
from gpu_diag import profile_step  # noqa: E402
from overhead import (  # noqa: E402
    DEFAULT_MODELS, create_model, make_batch, make_step, model_img_size, paired_ratio, time_alternating)


def build_tasks(model_name: str, mode: str, img_size: int, device: torch.device,
                head_mode: str = 'default') -> Dict[str, nn.Module]:
    """The tasks of `mode` (see the module docstring) on copies of one freshly initialized model; the
    compiled heads use torch.compile mode `head_mode` ('reduce-overhead': CUDA graphs)."""
    from timm.task import ClassificationTask
    from timm_drloc import DRLocTask
    model = create_model(model_name, img_size, seed=0)
    input_size = (3, img_size, img_size)

    def drloc(**kwargs) -> nn.Module:
        return DRLocTask(copy.deepcopy(model).to(device), drloc_lambda=0.5, input_size=input_size, device=device,
                         verbose=False, **kwargs)
    tasks = {
        'timm': ClassificationTask(copy.deepcopy(model).to(device), device=device, verbose=False),
        'A/A timm': ClassificationTask(copy.deepcopy(model).to(device), device=device, verbose=False),
        'DRLoc': drloc(),
    }
    if mode == 'eager':
        tasks[f'DRLoc compile_head {head_mode}'] = drloc(compile_head=True if head_mode == 'default' else head_mode)
    for task in tasks.values():
        task.train()
        if mode == 'compiled':
            task.compile(dynamic=False)  # one static graph per batch size, as a fixed-batch training run has
    return tasks


def bench(model_name: str, args: argparse.Namespace, device: torch.device) -> None:
    """Print the ratio table of `model_name` for each batch size (and GPU kernel counts in eager mode)."""
    from timm.optim import create_optimizer_v2
    img_size = model_img_size(model_name, args.img_size)
    tasks = build_tasks(model_name, args.mode, img_size, device, args.head_mode)
    optimizers = {name: create_optimizer_v2(task.get_trainable_module(), 'adamw', lr=1e-4, weight_decay=0.05,
                                            foreach=True)
                  for name, task in tasks.items()}
    for index, batch_size in enumerate(args.batch_sizes):
        started = time.perf_counter()
        images, labels = make_batch(batch_size, img_size, 0, device)
        steps = {name: make_step(task, optimizers[name], images, labels, amp=True) for name, task in tasks.items()}
        wall, cpu = time_alternating(steps, args.steps, args.warmup)
        fastest = wall if device.type == 'cuda' else cpu
        base_median, base_min = statistics.median(wall['timm']), min(fastest['timm'])
        print(f'{model_name} batch {batch_size} ({args.mode}; {time.perf_counter() - started:.0f} s with warm-up '
              f'and compilation): timm {base_median * 1e3:.1f} ms/step median', flush=True)
        for name in list(tasks)[1:]:
            paired, low, high = paired_ratio(fastest['timm'], fastest[name])
            print(f'  {name:<20} median ratio {statistics.median(wall[name]) / base_median:6.3f}   '
                  f'min ratio {min(fastest[name]) / base_min:6.3f}   paired {paired:6.3f} [{low:.3f}, {high:.3f}]',
                  flush=True)
        if index == 0 and args.mode == 'eager' and device.type == 'cuda':
            counts = {name: profile_step(steps[name], device)[1] for name in tasks}
            print('  GPU kernels per step: ' + ', '.join(
                f'{name} {count} ({count - counts["timm"]:+d})' for name, count in counts.items()), flush=True)
    del tasks, optimizers


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--mode', choices=('eager', 'compiled'), default='eager')
    parser.add_argument('--models', nargs='+', default=list(DEFAULT_MODELS))
    parser.add_argument('--batch-sizes', type=int, nargs='+', default=[64, 128])
    parser.add_argument('--img-size', type=int, default=224)
    parser.add_argument('--steps', type=int, default=20, help='timed steps per task')
    parser.add_argument('--warmup', type=int, default=5, help='untimed steps per task first (compilation included)')
    parser.add_argument('--head-mode', default='default', choices=('default', 'reduce-overhead'),
                        help="torch.compile mode of the compiled heads (eager mode); reduce-overhead: CUDA graphs")
    parser.add_argument('--device', default='cuda')
    parser.add_argument('--time-limit', type=float, default=None,
                        help='start no further model after this many seconds (what is done is printed)')
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'
    print(f'# torch {torch.__version__}, {name}; bf16 autocast, {args.img_size} px, m=64, hidden 512, foreach '
          f'AdamW; {args.steps} timed steps after {args.warmup} warm-up; mode {args.mode}', flush=True)
    started = time.perf_counter()
    for model_name in args.models:
        if args.time_limit is not None and time.perf_counter() - started > args.time_limit:
            print(f'# time limit: {model_name} and later models not run', flush=True)
            break
        bench(model_name, args, device)
        if device.type == 'cuda':
            torch.cuda.empty_cache()
    return 0


if __name__ == '__main__':
    sys.exit(main())
