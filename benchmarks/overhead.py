"""What DRLoc costs per training step: DRLocTask against timm's ClassificationTask, or (with `--kd`)
DRLocTask over timm's distillation task against the distillation task alone.

Both tasks train two copies of the same model (same weights) on the same batch, in one process. Steps
alternate between the two (which one goes first flips every round, so neither profits from a warmer
cache), each step is forward + backward + optimizer step, and the step time reported is the median of
`--steps` steps after `--warmup` warm-up steps, in wall-clock time and in process CPU time (steadier
when other processes share the cores: their work does not count). The `min ratio` compares the
fastest step of each task (CPU time on a CPU, wall clock on CUDA): interference only adds time, so it
is the steadiest of the three; `--aa` puts a second plain timm task in DRLoc's place to show how far
from 1.0 each ratio strays with nothing to measure. The `paired` ratio is the median, over rounds, of
DRLoc's step over the timm step timed next to it (same clock as the min ratio), with a distribution-free
95 % interval for that median: the two steps of a round see the same machine, so drift in the load
cancels, and the interval says what the run can resolve. Peak memory is measured on one extra step per task:

* CUDA: `torch.cuda.max_memory_allocated()` during the step, minus what was allocated before it.
* CPU: the peak of live bytes allocated by torch's CPU allocator during the step, minus the bytes live
  at its start, read from torch.profiler's memory events (activations, gradients, optimizer state
  created in the step, temporaries). It is not the process RSS: allocator caching, Python objects and
  shared libraries are not in it. The first optimizer step creates AdamW state, so warm-up comes first.

The head alone (sampling, gather, MLP, L1 loss; forward and backward) is also timed against the
reference code's approach as PAPER.md describes it, re-implemented here: pair positions drawn on the
CPU and copied to the grid's device, the whole feature map permuted and copied to a (C, B*H*W) matrix
before an index gather. Both run on the same grids (each model's real grid shape) with the same MLP.

    python benchmarks/overhead.py                      # CPU, the three default models, batch 8
    python benchmarks/overhead.py --device cuda --amp --batch-size 64 --compile
    python benchmarks/overhead.py --aa                 # the same set-up, timm against timm
    python benchmarks/overhead.py --models vit_small_patch16_224 --kd logit --kd-teacher resnet18

With `--kd logit|feature|token` both sides distil from the same `--kd-teacher` (random weights, frozen):
'timm' is timm's distillation task alone, 'drloc' is `DRLocTask(model, base_task=<that task>)`, so the
ratio is what DRLoc adds on top of distillation (teacher forward included on both sides). Token
distillation needs a distilled student (`--models deit_small_distilled_patch16_224`).
"""
import argparse
import copy
import functools
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

DEFAULT_MODELS = ('swin_tiny_patch4_window7_224', 'vit_small_patch16_224', 'resnet50')
TINY_VIT = 'tiny_vit'  # the digits demo's ViT (timm_drloc.demo): 4 blocks, 64 wide, patch 4; at 16 px here
FIRST_LAYER_CHOICES = ('auto', 'as-on-gpu', 'gather-then-project', 'project-then-gather')


@dataclass
class StepStats:
    """One task's step: median wall-clock and process-CPU seconds, the fastest step, peak memory (bytes).

    `fastest` is the shortest timed step on the clock that fits the device: process CPU time on a CPU,
    wall clock on CUDA. Interference from other work only ever adds time, so the fastest steps are the
    steadiest comparison (see `--aa`).
    """
    seconds: float
    cpu_seconds: float
    fastest: float
    peak_bytes: int


def add_first_layer_flag(parser: argparse.ArgumentParser, default: str = 'auto', why: str = '') -> None:
    """`--first-layer`: make every DRLoc head take one first-layer path (`force_first_layer`)."""
    parser.add_argument('--first-layer', default=default, choices=FIRST_LAYER_CHOICES,
                        help="make every DRLoc head compute its first layer this way (DRLocHead's two paths give the "
                             "same values): auto, the head's own choice on this device; as-on-gpu, the choice of a "
                             f"GPU head (gather first, unless compiled); or one path (default: {default}{why})")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--models', nargs='+', default=list(DEFAULT_MODELS), help='timm model names')
    parser.add_argument('--device', default='cpu', help="'cpu' or 'cuda' (default: cpu)")
    parser.add_argument('--batch-size', type=int, default=8)
    parser.add_argument('--img-size', type=int, default=224)
    parser.add_argument('--samples', type=int, default=64, help='DRLoc pairs per image (m)')
    parser.add_argument('--hidden-dim', type=int, default=512, help='DRLoc MLP width')
    parser.add_argument('--multiscale', action='store_true', help='one DRLoc head per stage (hierarchical models)')
    parser.add_argument('--amp', action='store_true', help='bfloat16 autocast')
    parser.add_argument('--compile', action='store_true', help='torch.compile both tasks (task.compile())')
    parser.add_argument('--compile-head', action='store_true',
                        help='compile the DRLoc heads only (DRLocTask(compile_head=True)); the rest stays eager')
    parser.add_argument('--steps', type=int, default=7, help='timed steps per task (median reported)')
    parser.add_argument('--warmup', type=int, default=2, help='untimed steps per task first')
    parser.add_argument('--head-steps', type=int, default=30, help='timed steps of the head-alone comparison')
    parser.add_argument('--skip-head', action='store_true', help='do not run the head-alone comparison')
    parser.add_argument('--skip-count', action='store_true',
                        help='do not count the operators DRLoc adds per step (benchmarks/opcount.py)')
    parser.add_argument('--phases', action='store_true', help='also print CPU time of forward / backward / optimizer')
    add_first_layer_flag(parser)
    parser.add_argument('--opt', default='adamw', help="timm optimizer for both tasks (default: adamw)")
    parser.add_argument('--threads', type=int, default=None,
                        help='torch CPU threads (default: torch\'s); 1 gives the steadiest CPU-time ratio on shared cores')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--kd', choices=('logit', 'feature', 'token'), default=None,
                        help="compare DRLoc over timm's distillation task of this type with that task alone")
    parser.add_argument('--kd-teacher', default='resnet18', help='timm model name of the teacher for --kd')
    parser.add_argument('--aa', action='store_true',
                        help="A/A check: time a second plain timm task in DRLoc's place (same set-up) to see "
                             "the measurement's own spread; every ratio should then read 1.0")
    args = parser.parse_args(argv)
    if args.steps < 5:
        parser.error(f'--steps {args.steps}: use at least 5 timed steps so the median means something.')
    if args.device.startswith('cuda') and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: torch sees no CUDA device here. Use --device cpu.")
    return args


def device_name(device: torch.device) -> str:
    """What a benchmark's header names the device by: the GPU's name, or the CPU and its torch threads."""
    return torch.cuda.get_device_name(device) if device.type == 'cuda' else f'CPU, {torch.get_num_threads()} threads'


def synchronize(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def make_step(task: nn.Module, optimizer: torch.optim.Optimizer, images: torch.Tensor, labels: torch.Tensor,
              amp: bool, phases: Optional[Dict[str, List[float]]] = None) -> Callable[[], None]:
    """One training step of `task` on a fixed batch: images (B, 3, H, W), labels (B,).

    With `phases` (a dict), the process CPU seconds of 'forward' (with the loss), 'backward' and
    'optimizer' are appended to it at every call (CPU runs; CUDA work is asynchronous).
    """
    device = images.device

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        marks = [time.process_time()]
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp):
            result = task(images, labels)
        marks.append(time.process_time())
        result['loss'].backward()
        marks.append(time.process_time())
        optimizer.step()
        synchronize(device)
        marks.append(time.process_time())
        if phases is not None:
            for name, start, stop in zip(('forward', 'backward', 'optimizer'), marks, marks[1:]):
                phases.setdefault(name, []).append(stop - start)
    return step


def peak_step_memory(step: Callable[[], None], device: torch.device) -> int:
    """Peak bytes allocated by torch during one call of `step`, above what was live before it."""
    if device.type == 'cuda':
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        step()
        return torch.cuda.max_memory_allocated(device) - start
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = [e for e in prof.profiler.kineto_results.events()
              if e.name() == '[memory]' and str(e.device_type()).endswith('CPU')]
    live, peak = 0, 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        live += event.nbytes()
        peak = max(peak, live)
    return peak


def time_alternating(steps: Dict[str, Callable[[], None]], num_steps: int, warmup: int
                     ) -> Tuple[Dict[str, List[float]], Dict[str, List[float]]]:
    """Run the steps in turn (order flipped every round).

    Returns:
        (wall, cpu): per name, the wall-clock and the process CPU seconds of each timed step. CPU time
        is the steadier of the two on a shared machine (other processes do not add to it).
    """
    names = list(steps)
    for _ in range(warmup):
        for name in names:
            steps[name]()
    wall = {name: [] for name in names}
    cpu = {name: [] for name in names}
    for i in range(num_steps):
        for name in (names if i % 2 == 0 else names[::-1]):
            start, start_cpu = time.perf_counter(), time.process_time()
            steps[name]()
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    return wall, cpu


def paired_ratio(base: Sequence[float], ours: Sequence[float], level: float = 0.95) -> Tuple[float, float, float]:
    """The median of the per-round ratios ours[i] / base[i], and a distribution-free interval for it.

    The interval is [r_(k), r_(n+1-k)] of the sorted ratios, k the largest rank whose binomial tail
    P(Binomial(n, 1/2) < k) stays within (1 - level) / 2; it covers the true median ratio with at least
    `level` probability if rounds are independent. With fewer than 6 rounds no rank qualifies at 95 %, and
    the interval is the whole range of the ratios.

    Returns:
        (median, low, high).
    """
    ratios = sorted(o / b for b, o in zip(base, ours, strict=True))
    n = len(ratios)
    if n == 0:
        raise ValueError('paired_ratio needs at least one round')
    k, tail = 0, 0.0
    while True:  # the tail P(B <= k) for B ~ Binomial(n, 1/2)
        tail += math.comb(n, k) / 2 ** n
        if tail > (1 - level) / 2:
            break
        k += 1
    k = max(k, 1)
    return statistics.median(ratios), ratios[k - 1], ratios[n - k]


def model_img_size(model_name: str, img_size: int) -> int:
    """The input size a model is benchmarked at: `img_size`, except the tiny ViT's own 16 px."""
    return 16 if model_name == TINY_VIT else img_size


def create_model(model_name: str, img_size: int, seed: int) -> nn.Module:
    """A freshly initialized timm model (no pretrained weights) for `img_size` inputs, seeded.

    `tiny_vit` is the digits demo's model (timm_drloc.demo's MODEL and MODEL_KWARGS, at `img_size`).
    """
    import timm
    torch.manual_seed(seed)
    if model_name == TINY_VIT:
        from timm_drloc.demo import MODEL, MODEL_KWARGS
        kwargs = {key: int(value) for key, value in (item.split('=') for item in MODEL_KWARGS)}
        return timm.create_model(MODEL, pretrained=False, **{**kwargs, 'img_size': img_size})
    try:
        return timm.create_model(model_name, pretrained=False, img_size=img_size)
    except TypeError:  # CNNs take any input size and have no img_size argument
        return timm.create_model(model_name, pretrained=False)


def make_batch(batch_size: int, img_size: int, seed: int, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """A fixed random batch: images (B, 3, H, W) and ImageNet labels (B,), on `device`."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(batch_size, 3, img_size, img_size, generator=generator).to(device)
    labels = torch.randint(0, 1000, (batch_size,), generator=generator).to(device)
    return images, labels


def timm_task(args: argparse.Namespace, model: nn.Module, teacher: Optional[nn.Module], device: torch.device):
    """timm's task without DRLoc: ClassificationTask, or with `--kd` the distillation task from `teacher`."""
    from timm.task import ClassificationTask, FeatureDistillationTask, LogitDistillationTask, TokenDistillationTask
    if args.kd is None:
        return ClassificationTask(model, device=device, verbose=False)
    kd_task = {'logit': LogitDistillationTask, 'feature': FeatureDistillationTask, 'token': TokenDistillationTask}
    return kd_task[args.kd](model, teacher, device=device, verbose=False)


def compile_head_kwargs(compile_head: bool) -> Dict[str, bool]:
    """`compile_head=True` only when asked, so that the benchmarks also run on versions without the option."""
    return {'compile_head': True} if compile_head else {}


def build_tasks(args: argparse.Namespace, model_name: str, device: torch.device):
    """(timm's task, DRLocTask) on two copies of one freshly initialized model; with `--kd`, timm's
    distillation task and DRLocTask over it, one teacher for both."""
    from timm.optim import create_optimizer_v2
    from timm_drloc import DRLocTask

    model = create_model(model_name, args.img_size, args.seed)
    teacher = create_model(args.kd_teacher, args.img_size, args.seed + 1).to(device) if args.kd else None
    plain = copy.deepcopy(model)  # before wrap(): the copy carries no DRLoc hooks
    baseline = timm_task(args, plain.to(device), teacher, device)
    model = model.to(device)
    base = timm_task(args, model, teacher, device) if args.kd else None
    drloc = DRLocTask(model, drloc_lambda=0.5, num_samples=args.samples, hidden_dim=args.hidden_dim,
                      multiscale=args.multiscale, input_size=(3, args.img_size, args.img_size), base_task=base,
                      device=device, verbose=False, **compile_head_kwargs(args.compile_head))
    if args.aa:  # the same model object in the same place, without DRLoc
        trainable = drloc.trainable_module
        if trainable.reader is not None:
            trainable.reader.remove()
        if base is None:
            drloc = timm_task(args, trainable.model, teacher, device)
        else:
            base.trainable_module, drloc = trainable.module, base
    tasks = {'timm': baseline, 'drloc': drloc}
    for task in tasks.values():
        task.train()
        if args.compile:
            task.compile()
    optimizers = {name: create_optimizer_v2(task.get_trainable_module(), args.opt, lr=1e-4, weight_decay=0.05)
                  for name, task in tasks.items()}
    return tasks, optimizers, drloc


def bench_model(args: argparse.Namespace, model_name: str, device: torch.device):
    """Step time and memory of both tasks on `model_name` (StepStats by task name), the paired ratio
    (median, low, high; see paired_ratio), the DRLoc grid shapes and the operators DRLoc adds (count_added_ops)."""
    tasks, optimizers, drloc = build_tasks(args, model_name, device)
    images, labels = make_batch(args.batch_size, args.img_size, args.seed, device)
    phases = {name: {} for name in tasks}
    steps = {name: make_step(task, optimizers[name], images, labels, args.amp, phases[name])
             for name, task in tasks.items()}
    wall, cpu = time_alternating(steps, args.steps, args.warmup)
    if args.phases:
        for name, times in phases.items():
            medians = ', '.join(f'{phase} {statistics.median(v[args.warmup:]):.3f}' for phase, v in times.items())
            print(f'#   {model_name} {name}: process CPU s per phase (median): {medians}')
    fastest = wall if device.type == 'cuda' else cpu
    stats = {name: StepStats(statistics.median(wall[name]), statistics.median(cpu[name]), min(fastest[name]),
                             peak_step_memory(steps[name], device)) for name in steps}
    sources = [] if args.aa else drloc.trainable_module.sources
    grids = [(s.grid_size, s.num_chs, s.layout) for s in sources]
    paired = paired_ratio(fastest['timm'], fastest['drloc'])
    return stats, paired, grids, count_added_ops(args, tasks, images, labels)


def count_added_ops(args: argparse.Namespace, tasks: Dict[str, nn.Module], images: torch.Tensor,
                    labels: torch.Tensor) -> Optional[Tuple[int, int]]:
    """(kernel-launching operators, views) one DRLoc step dispatches beyond timm's, as benchmarks/opcount.py
    counts them (one more step per task, with a foreach AdamW of its own); None with --skip-count."""
    if args.skip_count:
        return None
    from opcount import added_ops, count_task_steps
    return added_ops(count_task_steps(tasks, images, labels, args.amp, compiled=args.compile or args.compile_head))


# --- head alone -------------------------------------------------------------------------------------------

def ours_head_loss(head: nn.Module, grid: torch.Tensor) -> torch.Tensor:
    """timm_drloc's path: DRLocHead.forward on a (B, H, W, C) grid view (NCHW storage, as hooks see it)."""
    return head(grid)


def reference_style_loss(head: nn.Module, grid_nchw: torch.Tensor) -> torch.Tensor:
    """PAPER.md's description of the reference head, written from scratch.

    grid_nchw: (B, C, H, W). Positions are drawn on the CPU and copied to the device; the whole map is
    permuted and copied to a (C, B*H*W) matrix, then the sampled columns are gathered.
    """
    batch, chans, height, width = grid_nchw.shape
    device, num_samples = grid_nchw.device, head.num_samples
    def draw() -> torch.Tensor:  # B, M, (row, col), drawn on the host and copied over
        return torch.stack((torch.randint(height, (batch, num_samples)), torch.randint(width, (batch, num_samples))),
                           dim=-1).to(device)

    first, second = draw(), draw()
    target = (first - second).abs().float()  # B, M, 2
    flat = grid_nchw.permute(1, 0, 2, 3).reshape(chans, batch * height * width)  # C, B*H*W: copies the map
    base = (torch.arange(batch, device=device) * height * width).view(batch, 1)

    def gather(pos: torch.Tensor) -> torch.Tensor:
        index = (base + pos[..., 0] * width + pos[..., 1]).view(-1)  # B*M
        return flat[:, index].view(chans, batch, num_samples).permute(1, 2, 0)  # B, M, C

    pairs = torch.cat((gather(first), gather(second)), dim=-1)  # B, M, 2C
    return F.l1_loss(head.mlp(pairs).float(), target)


def bench_head(args: argparse.Namespace, grid_size: Tuple[int, int], chans: int, layout: str,
               device: torch.device) -> Tuple[float, float]:
    """Median fwd+bwd CPU (on CUDA: wall) seconds of (ours, reference-style) on one grid.

    The grid is stored as the model stores it (`layout` 'NCHW' for CNNs; 'NHWC' / 'NLC' tokens are
    channels-last); ours reads the (B, H, W, C) view of it, the reference-style path the NCHW view.
    """
    from timm_drloc import DRLocHead
    head = DRLocHead(chans, grid_size, num_samples=args.samples, hidden_dim=args.hidden_dim).to(device)
    height, width = grid_size
    if layout == 'NCHW':
        storage = torch.randn(args.batch_size, chans, height, width, device=device, requires_grad=True)
        nchw, nhwc = storage, storage.permute(0, 2, 3, 1)
    else:
        storage = torch.randn(args.batch_size, height, width, chans, device=device, requires_grad=True)
        nchw, nhwc = storage.permute(0, 3, 1, 2), storage

    def run(fn: Callable, grid: torch.Tensor) -> Callable[[], None]:
        def step() -> None:
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=args.amp):
                loss = fn(head, grid)
            loss.backward()
            head.zero_grad(set_to_none=True)
            storage.grad = None
            synchronize(device)
        return step

    steps = {'ours': run(ours_head_loss, nhwc), 'reference': run(reference_style_loss, nchw)}
    wall, cpu = time_alternating(steps, args.head_steps, warmup=3)
    times = wall if device.type == 'cuda' else cpu
    return statistics.median(times['ours']), statistics.median(times['reference'])


def force_first_layer(choice: str, heads: Optional[Iterable[nn.Module]] = None) -> None:
    """Make DRLoc heads compute their first layer one way, whatever `DRLocHead.projects_cells_first` would
    choose on this device (both ways give the same values): `heads`, or every head of this process.

    Args:
        choice: one of FIRST_LAYER_CHOICES. 'auto' changes nothing; 'as-on-gpu' applies the rule of a GPU
            head (gather first, unless compiled); the other two name a path.
        heads: DRLocHead instances; None patches the class.
    """
    from timm_drloc import DRLocHead
    if choice == 'auto':
        return
    rule = DRLocHead.projects_cells_first

    def choose(head: nn.Module, grid: torch.Tensor, num_samples: int) -> bool:
        if choice == 'as-on-gpu':
            return rule(head, grid, num_samples, device_type='cuda')
        return choice == 'project-then-gather'

    if heads is None:
        DRLocHead.projects_cells_first = choose
        return
    for head in heads:
        head.projects_cells_first = functools.partial(choose, head)


def mib(num_bytes: int) -> str:
    return f'{num_bytes / 2 ** 20:8.1f}'


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    force_first_layer(args.first_layer)  # for this process only: the benchmark is the whole program
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    name = device_name(device)
    print(f'# torch {torch.__version__}, {name}; batch {args.batch_size}, {args.img_size}px, m={args.samples}, '
          f'hidden {args.hidden_dim}, amp={args.amp}, compile={args.compile}, multiscale={args.multiscale}, '
          f'opt={args.opt}, first layer {args.first_layer}, median of {args.steps} steps after {args.warmup} warm-up'
          + (f'; timm = {args.kd} distillation from {args.kd_teacher}, drloc = DRLoc over it' if args.kd else '')
          + ('; A/A CHECK: the drloc columns are a second plain timm task' if args.aa else ''))
    if device.type == 'cpu':
        load = os.getloadavg()[0]
        print(f'# load average {load:.1f} on {os.cpu_count()} cores at start'
              + (': the cores are shared, trust the CPU-time ratio more than wall clock' if load > 1.5 else ''))
    if device.type == 'cpu' and (args.compile or args.compile_head) and not args.skip_count:
        from opcount import profile_compiled_kernels
        profile_compiled_kernels()  # before anything compiles, so that the op count sees the generated kernels
    print(f"{'model':<32} {'timm s':>8} {'drloc s':>8} {'ratio':>6} {'cpu ratio':>9} {'min ratio':>9} {'img/s timm':>10} "
          f"{'img/s drloc':>11} {'MiB timm':>8} {'MiB drloc':>9} {'mem ratio':>9} {'ops +k/+v':>10} "
          f"{'paired [95 % interval]':>23}  grids")
    rows, head_shapes = [], {}
    for model_name in args.models:
        try:
            stats, paired, grids, ops = bench_model(args, model_name, device)
        except ValueError as e:  # e.g. --multiscale on a ViT
            print(f'{model_name:<32} skipped: {e}')
            continue
        base, ours = stats['timm'], stats['drloc']
        ratio = ours.seconds / base.seconds
        cpu_ratio = ours.cpu_seconds / base.cpu_seconds
        min_ratio = ours.fastest / base.fastest
        mem_ratio = ours.peak_bytes / max(base.peak_bytes, 1)
        grid_text = ', '.join(f'{h}x{w}x{c}' for (h, w), c, _ in grids)
        print(f'{model_name:<32} {base.seconds:8.3f} {ours.seconds:8.3f} {ratio:6.3f} {cpu_ratio:9.3f} {min_ratio:9.3f} '
              f'{args.batch_size / base.seconds:10.1f} {args.batch_size / ours.seconds:11.1f} '
              f'{mib(base.peak_bytes)} {mib(ours.peak_bytes):>9} {mem_ratio:9.3f} '
              f'{"n/a" if ops is None else f"{ops[0]:+d}/{ops[1]:+d}":>10} '
              f'{f"{paired[0]:.3f} [{paired[1]:.3f}, {paired[2]:.3f}]":>23}  {grid_text}', flush=True)
        rows.append((model_name, ratio, cpu_ratio, min_ratio, paired[0]))
        for grid in grids:
            head_shapes.setdefault(grid, model_name)
    if rows:
        worst = max(rows, key=lambda r: r[1])
        print(f'# worst wall-clock step-time ratio: {worst[1]:.3f} ({worst[0]}); '
              f'worst CPU-time ratio: {max(r[2] for r in rows):.3f}; worst min ratio: {max(r[3] for r in rows):.3f}; '
              f'worst paired ratio: {max(r[4] for r in rows):.3f}')
    if args.skip_head or not head_shapes:
        return 0
    clock = 'wall' if device.type == 'cuda' else 'process CPU'
    print(f"\n# head alone (sample, gather, MLP, L1; fwd+bwd), median {clock} time of {args.head_steps}, "
          f"batch {args.batch_size}")
    print(f"{'grid (H x W x C)':<20} {'from':<32} {'ours ms':>8} {'ref-style ms':>12} {'ref/ours':>8}")
    for ((height, width), chans, layout), model_name in head_shapes.items():
        ours_s, ref_s = bench_head(args, (height, width), chans, layout, device)
        print(f'{f"{height}x{width}x{chans}":<20} {model_name:<32} {ours_s * 1e3:8.2f} {ref_s * 1e3:12.2f} '
              f'{ref_s / ours_s:8.2f}', flush=True)
    return 0


if __name__ == '__main__':
    sys.exit(main())
