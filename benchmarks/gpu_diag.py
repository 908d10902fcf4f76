"""Where DRLoc's step time goes on a GPU: GPU kernel time vs the whole step, and the first-layer paths.

A diagnostic companion of overhead.py (same tasks, same alternating steps). Per model it times three
tasks on copies of one model: timm's ClassificationTask, DRLocTask as shipped on a GPU ('gather': the
heads gather the pairs, then apply the first layer), and DRLocTask whose heads project every cell with
the first layer before gathering ('project', what a CPU head does on a grid with fewer cells than pairs
and at least as many channels as the hidden width). Then it profiles one step of each with torch.profiler and prints
the GPU's busy time (the sum of its kernels' durations) and the kernel count: when the step takes much
longer than the GPU is busy, the step is bound by the host launching kernels, and what DRLoc adds is
mostly its kernel launches. Eager runs also check the DRLoc step for host-device synchronizations.

    python benchmarks/gpu_diag.py --models resnet50 vit_small_patch16_224      # eager
    python benchmarks/gpu_diag.py --models resnet50 --compile --top 12          # + top kernels
"""
import argparse
import copy
import os
import statistics
import sys
import time
import warnings
from typing import Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # overhead.py beside this file
from overhead import (  # noqa: E402
    create_model, force_first_layer, make_batch, make_step, synchronize, time_alternating)


def build(model_name: str, args: argparse.Namespace, device: torch.device):
    """The three tasks on copies of one freshly initialized model, and an AdamW optimizer for each."""
    from timm.optim import create_optimizer_v2
    from timm.task import ClassificationTask
    from timm_drloc import DRLocTask
    model = create_model(model_name, args.img_size, seed=0)
    tasks = {'timm': ClassificationTask(copy.deepcopy(model).to(device), device=device, verbose=False)}
    for name, path in (('gather', 'gather-then-project'), ('project', 'project-then-gather')):
        task = DRLocTask(copy.deepcopy(model).to(device), drloc_lambda=0.5, device=device, verbose=False,
                         input_size=(3, args.img_size, args.img_size))
        force_first_layer(path, task.trainable_module.heads)
        tasks[name] = task
    for task in tasks.values():
        task.train()
        if args.compile:
            task.compile()
    optimizers = {n: create_optimizer_v2(t.get_trainable_module(), 'adamw', lr=1e-4, weight_decay=0.05)
                  for n, t in tasks.items()}
    return tasks, optimizers


def profile_step(step: Callable[[], None], device: torch.device):
    """(profiler, number of GPU kernels, their summed duration in us) of one call of `step`."""
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == 'cuda' else [])
    synchronize(device)
    with profile(activities=activities) as prof:
        step()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return prof, len(kernels), sum(e.time_range.elapsed_us() for e in kernels)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--models', nargs='+', default=['resnet50'])
    parser.add_argument('--device', default='cuda')
    parser.add_argument('--batch-size', type=int, default=64)
    parser.add_argument('--img-size', type=int, default=224)
    parser.add_argument('--compile', action='store_true')
    parser.add_argument('--steps', type=int, default=10)
    parser.add_argument('--warmup', type=int, default=3)
    parser.add_argument('--top', type=int, default=0, help='print the N costliest ops of each DRLoc step')
    args = parser.parse_args()
    device = torch.device(args.device)
    print(f'# torch {torch.__version__}, {torch.cuda.get_device_name(0) if device.type == "cuda" else "CPU"}; '
          f'batch {args.batch_size}, bf16 autocast, compile={args.compile}', flush=True)
    for model_name in args.models:
        started = time.time()
        tasks, optimizers = build(model_name, args, device)
        images, labels = make_batch(args.batch_size, args.img_size, 0, device)
        steps = {n: make_step(t, optimizers[n], images, labels, True) for n, t in tasks.items()}
        wall, _ = time_alternating(steps, args.steps, args.warmup)
        base = statistics.median(wall['timm'])
        print(f'{model_name}: median step ms ' + ', '.join(
            f'{n} {statistics.median(w) * 1e3:.2f} ({statistics.median(w) / base:.3f})' for n, w in wall.items())
            + f'  [{time.time() - started:.0f}s with model build and compile]', flush=True)
        for name, step in steps.items() if device.type == 'cuda' else ():  # a CPU run only times the steps
            prof, count, gpu_us = profile_step(step, device)
            step_ms = statistics.median(wall[name]) * 1e3
            print(f'  {name:8s} GPU busy {gpu_us / 1e3:6.2f} ms of a {step_ms:6.2f} ms step '
                  f'({gpu_us / 1e3 / step_ms:4.0%}), {count} kernels', flush=True)
            if name != 'timm' and args.top > 0:
                table = prof.key_averages().table(sort_by='self_device_time_total', row_limit=args.top,
                                                  max_name_column_width=70)
                print('\n'.join('    ' + line for line in table.splitlines()), flush=True)
        if device.type == 'cuda' and not args.compile:
            torch.cuda.set_sync_debug_mode('warn')
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter('always')
                steps['gather']()  # as shipped
                synchronize(device)
            torch.cuda.set_sync_debug_mode('default')
            syncs = [str(c.message).splitlines()[0] for c in caught if 'synchroniz' in str(c.message)]
            print(f'  host-device syncs in one DRLoc step: {len(syncs)} {syncs[:3]}', flush=True)
        del tasks, optimizers, steps
    return 0


if __name__ == '__main__':
    sys.exit(main())
