"""The digits demo: the same small ViT trained from scratch with and without DRLoc, on real data.

`timm-drloc demo` (or `python -m timm_drloc.demo`) does three things:

1. writes scikit-learn's handwritten digits (1,797 real 8x8 grayscale scans, shipped inside
   scikit-learn, no download) as an ImageFolder, `OUT/data/{train,validation}/<digit>/<n>.png`, upscaled
   to RGB PNGs, with a fixed stratified split (`--train-per-class` images of each digit to train on,
   `--val-per-class` others to evaluate on);
2. runs train_drloc.py (`python -m timm_drloc.cli train`, one subprocess per run) on a tiny ViT from
   scratch, once with `--drloc-lambda 0` (plain timm training) and once with DRLoc, same seed and recipe,
   for every seed in `--seeds`;
3. writes `OUT/results.md` and `OUT/results.json` (final and best eval top-1 of each run, the paired
   delta per seed, and its mean, range and 95 % t-interval over seeds) and `OUT/curves.png` (eval top-1
   and loss of every run, each seed's top-1 gain, the DRLoc loss).

On the CPU the two runs of a seed train at the same time, one torch thread each (`--jobs`). The pieces
shared with `benchmarks/small_data_study.py` (commands, runs, statistics, reports) are timm_drloc.paired.
Arguments it does not know are passed on to train_drloc.py (e.g. `--lr 5e-4`), after its own recipe.
"""
import argparse
import json
import os
import shutil
import sys
import time
from typing import Dict, List, Optional, Sequence, Tuple

from .errors import ExitCode, SummaryError
from .paired import Pair, RunFailedError, default_device, json_report, markdown_report, pair_runs, pair_up, run_all
from .plot import EVAL_LOSS_PANEL, GAIN_PANEL, PANELS, paired_gain, plot_experiments, read_experiment

SPLITS = ('train', 'validation')
NUM_CLASSES = 10

# The default recipe: a 4-block, 64-wide ViT on 32x32 inputs in 4x4 patches (an 8x8 grid, as in PAPER.md's
# measurement; the model's img_size follows --img-size), AdamW + cosine at batch 16 (25 steps an epoch, so that
# 30 epochs bring the baseline close to its plateau), mild crops, no flips (a flipped digit is another symbol).
MODEL = 'vit_tiny_patch16_224'
MODEL_KWARGS = ('patch_size=4', 'embed_dim=64', 'depth=4', 'num_heads=2')
RECIPE = (
    '--opt', 'adamw', '--weight-decay', '0.05', '--sched', 'cosine', '--warmup-epochs', '2',
    '--scale', '0.75', '1.0', '--ratio', '0.9', '1.1', '--hflip', '0', '--color-jitter', '0', '--smoothing', '0.1',
    '--mean', '0.5', '0.5', '0.5', '--std', '0.5', '0.5', '0.5', '--crop-pct', '1.0',
    '--workers', '0', '--checkpoint-hist', '1', '--log-interval', '1000',
)


def write_digits(
        root: str,
        train_per_class: int = 40,
        val_per_class: Optional[int] = 30,
        img_size: int = 32,
        seed: int = 0,
) -> Dict[str, Dict[str, int]]:
    """Write scikit-learn's digits as an ImageFolder under `root`: root/{train,validation}/<digit>/<n>.png.

    Each digit's images are shuffled with `seed` (the split is fixed by it), the first `train_per_class`
    go to train and the next `val_per_class` (all the rest when None) to validation. Each 8x8 scan
    (values 0-16) becomes an `img_size` x `img_size` RGB PNG (bilinear upscaling, white on black).
    Existing `train` / `validation` folders under `root` are replaced.

    Returns:
        {'train': {'0': count, ...}, 'validation': {...}} images written per split and class.

    Raises:
        ValueError: a split size that the digits cannot fill (the rarest digit has 174 images).
    """
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    images, labels = digits.images, digits.target  # (1797, 8, 8) floats in [0, 16], (1797,)
    smallest = int(np.bincount(labels).min())
    wanted = train_per_class + (val_per_class or 1)
    if train_per_class < 1 or (val_per_class is not None and val_per_class < 1) or wanted > smallest:
        raise ValueError(
            f'train_per_class={train_per_class}, val_per_class={val_per_class}: each must be >= 1 and together '
            f'at most {smallest} (the rarest digit has {smallest} images). Lower them.')
    rng = np.random.RandomState(seed)
    counts = {split: {} for split in SPLITS}
    for split in SPLITS:
        shutil.rmtree(os.path.join(root, split), ignore_errors=True)
    for digit in range(NUM_CLASSES):
        order = rng.permutation(np.flatnonzero(labels == digit))
        stop = None if val_per_class is None else train_per_class + val_per_class
        for split, indices in zip(SPLITS, (order[:train_per_class], order[train_per_class:stop])):
            folder = os.path.join(root, split, str(digit))
            os.makedirs(folder, exist_ok=True)
            for index in indices:
                pixels = (images[index] * (255.0 / 16.0)).round().astype(np.uint8)  # 8, 8
                image = Image.fromarray(pixels, mode='L').resize((img_size, img_size), Image.BILINEAR)
                image.convert('RGB').save(os.path.join(folder, f'{index:04d}.png'))
            counts[split][str(digit)] = len(indices)
    return counts


def parse_args(argv: Optional[Sequence[str]] = None) -> Tuple[argparse.Namespace, List[str]]:
    parser = argparse.ArgumentParser(
        prog='timm-drloc demo', description='Train a tiny ViT on the digits with and without DRLoc and compare.',
        epilog='Other arguments are passed on to train_drloc.py.', allow_abbrev=False)
    parser.add_argument('--out', default='drloc_demo', help='output folder (data, runs, results) (default: drloc_demo)')
    parser.add_argument('--epochs', type=int, default=30)
    parser.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2],
                        help='one baseline + DRLoc pair per seed (default 0 1 2: mean and range of the delta)')
    parser.add_argument('--train-per-class', type=int, default=40, help='training images per digit (default 40: 400)')
    parser.add_argument('--val-per-class', type=int, default=30, help='validation images per digit (default 30: 300)')
    parser.add_argument('--split-seed', type=int, default=0, help='seed of the fixed train/validation split')
    parser.add_argument('--img-size', type=int, default=32,
                        help="side of the upscaled digit images, and the model's img_size (default 32)")
    parser.add_argument('--model', default=MODEL)
    parser.add_argument('--model-kwargs', nargs='+', default=None, metavar='KEY=VALUE',
                        help=f'default for the default --model: {" ".join(MODEL_KWARGS)}, and img_size=--img-size '
                             f'unless given here; none for another --model (train_drloc.py sizes it by --img-size)')
    parser.add_argument('-b', '--batch-size', type=int, default=16)
    parser.add_argument('--lr', type=float, default=2e-3)
    parser.add_argument('--drloc-lambda', type=float, default=0.5,
                        help="DRLoc weight on the reference code's unnormalized targets (default 0.5)")
    parser.add_argument('--drloc-hidden-dim', type=int, default=128, help='DRLoc MLP width (default 128 for a 64-wide ViT)')
    parser.add_argument('--drloc-samples', type=int, default=64)
    parser.add_argument('--jobs', type=int, default=None,
                        help='trainings at the same time (default: 2 on the CPU, one torch thread each per core; 1 on a GPU)')
    parser.add_argument('--data-only', action='store_true', help='write the ImageFolder and stop')
    args, extra = parser.parse_known_args(argv)
    if args.model_kwargs is None:
        args.model_kwargs = list(MODEL_KWARGS) if args.model == MODEL else []
    if args.model == MODEL and not any(kwarg.startswith('img_size=') for kwarg in args.model_kwargs):
        args.model_kwargs = [f'img_size={args.img_size}', *args.model_kwargs]
    if args.epochs < 1:
        parser.error(f'--epochs {args.epochs}: train at least 1 epoch.')
    if args.jobs is not None and args.jobs < 1:
        parser.error(f'--jobs {args.jobs}: run at least 1 training at a time.')
    if args.drloc_lambda <= 0:
        parser.error(f'--drloc-lambda {args.drloc_lambda}: the DRLoc run needs a weight > 0 (the baseline is lambda 0).')
    return args, extra


def main(argv: Optional[Sequence[str]] = None) -> int:
    args, extra = parse_args(argv)
    out = os.path.abspath(args.out)
    data_dir, runs_dir = os.path.join(out, 'data'), os.path.join(out, 'runs')
    try:
        counts = write_digits(data_dir, args.train_per_class, args.val_per_class, args.img_size, args.split_seed)
    except ValueError as e:
        print(f'timm-drloc demo: {e}', file=sys.stderr)
        return ExitCode.BAD_INPUT
    num_train, num_val = sum(counts['train'].values()), sum(counts['validation'].values())
    print(f'digits ImageFolder at {data_dir}: {num_train} train, {num_val} validation images')
    if args.data_only:
        return ExitCode.OK
    device = default_device()
    recipe = [
        '--train-split', SPLITS[0], '--val-split', SPLITS[1],
        '--model', args.model, '--model-kwargs', *args.model_kwargs, '--num-classes', str(NUM_CLASSES),
        '--img-size', str(args.img_size), '-b', str(args.batch_size), '--lr', str(args.lr), *RECIPE,
        '--drloc-hidden-dim', str(args.drloc_hidden_dim), '--drloc-samples', str(args.drloc_samples), *extra]
    runs = [run for seed in args.seeds for run in pair_runs(
        data_dir, runs_dir, f'seed{seed}', args.train_per_class, seed, args.epochs, args.drloc_lambda, recipe, device)]
    jobs = args.jobs if args.jobs is not None else (2 if device == 'cpu' else 1)
    threads = max(1, (os.cpu_count() or 1) // jobs) if device == 'cpu' else None
    print(f'{len(runs)} trainings ({args.epochs} epochs each) on {device}, {jobs} at a time')
    started = time.time()
    try:
        results = run_all(runs, jobs=jobs, threads=threads, fresh=True, say=lambda line: print(line, flush=True))
    except RunFailedError as e:
        print(f'timm-drloc demo: {e}', file=sys.stderr)
        return e.exit_code  # the run's own ExitCode
    except SummaryError as e:  # a run that finished without evaluating
        print(f'timm-drloc demo: {e}', file=sys.stderr)
        return ExitCode.BAD_INPUT
    pairs = pair_up(results)
    title = (f'Digits demo: {args.model} {" ".join(args.model_kwargs)}, {args.epochs} epochs, {num_train} train / '
             f'{num_val} validation images, DRLoc lambda {args.drloc_lambda} (unnormalized targets), hidden '
             f'{args.drloc_hidden_dim}, m={args.drloc_samples}; eval top-1 %, {time.time() - started:.0f} s in all.')
    text = markdown_report(pairs, title, size_label='train / class')
    with open(os.path.join(out, 'results.md'), 'w') as f:
        f.write(text)
    with open(os.path.join(out, 'results.json'), 'w') as f:
        json.dump(json_report(pairs, dict(argv=list(sys.argv[1:] if argv is None else argv), device=device)), f,
                  indent=1)
    print('\n' + text)
    png = plot_curves(pairs, os.path.join(out, 'curves.png'))
    print(f"wrote {os.path.join(out, 'results.md')}, {os.path.join(out, 'results.json')}, {png}")
    return ExitCode.OK


def plot_curves(pairs: Sequence[Pair], out_path: str) -> str:
    """Eval top-1 of every run against epoch, each seed's top-1 gain, eval loss and DRLoc loss; one color per seed."""
    experiments, gains, colors = [], [], []
    for index, pair in enumerate(pairs):
        baseline, drloc = (read_experiment(r.run.folder, r.run.name) for r in (pair.baseline, pair.drloc))
        experiments += [baseline, drloc]
        gains.append(paired_gain(baseline, drloc, f'seed {pair.seed}'))
        colors += [f'C{index % 10}'] * 2
    colors += [f'C{index % 10}' for index in range(len(pairs))]
    panels = (PANELS[2], GAIN_PANEL, EVAL_LOSS_PANEL, PANELS[1])  # top-1, gain, eval loss, DRLoc loss
    return plot_experiments(experiments + gains, out_path, title='digits: plain timm (dashed) vs DRLoc (solid)',
                            panels=panels, colors=colors)


if __name__ == '__main__':
    raise SystemExit(main())
