"""The digits demo: the same small ViT trained from scratch with and without DRLoc, on real data.

`timm-drloc demo` (or `python -m timm_drloc.demo`) does three things:

1. writes scikit-learn's handwritten digits (1,797 real 8x8 grayscale scans, shipped inside
   scikit-learn, no download) as an ImageFolder, `OUT/data/{train,validation}/<digit>/<n>.png`, upscaled
   to RGB PNGs, with a fixed stratified split (`--train-per-class` images of each digit to train on,
   `--val-per-class` others to evaluate on);
2. runs train_drloc.py (`python -m timm_drloc.cli train`, one subprocess per run) on a tiny ViT from
   scratch, once with `--drloc-lambda 0` (plain timm training) and once with DRLoc, same seed and recipe,
   for every seed in `--seeds`;
3. writes `OUT/results.md` and `OUT/results.csv` (final and best eval top-1 of each run, the paired
   delta per seed, and its mean and range over seeds) and `OUT/curves.png` (timm_drloc.plot).

Arguments it does not know are passed on to train_drloc.py (e.g. `--lr 5e-4`), after its own recipe.
"""
import argparse
import csv
import os
import shutil
import statistics
import subprocess
import sys
import time
from typing import Dict, List, Optional, Sequence, Tuple

from .errors import ExitCode, SummaryError
from .plot import plot_experiments, read_experiment

SPLITS = ('train', 'validation')
NUM_CLASSES = 10

# The default recipe: a 4-block, 64-wide ViT on 16x16 inputs in 4x4 patches (a 4x4 grid: 16 tokens keep an epoch
# cheap on 2 CPU cores; PAPER.md's measurement used 32x32 inputs, an 8x8 grid, with `--img-size 32
# --model-kwargs img_size=32 ...`), AdamW + cosine, mild crops, no flips (a flipped digit is another symbol).
MODEL = 'vit_tiny_patch16_224'
MODEL_KWARGS = ('img_size=16', 'patch_size=4', 'embed_dim=64', 'depth=4', 'num_heads=2')
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


def train_command(args: argparse.Namespace, data_dir: str, runs_dir: str, experiment: str, seed: int,
                  drloc_lambda: float, extra: Sequence[str]) -> List[str]:
    """The train_drloc.py command line of one demo run."""
    import torch
    device = 'cuda' if torch.cuda.is_available() else 'cpu'
    command = [
        sys.executable, '-m', 'timm_drloc.cli', 'train', data_dir,
        '--model', args.model, '--model-kwargs', *args.model_kwargs,
        '--num-classes', str(NUM_CLASSES), '--img-size', str(args.img_size),
        '--epochs', str(args.epochs), '-b', str(args.batch_size), '--lr', str(args.lr),
        *RECIPE,
        '--seed', str(seed), '--device', device, '--output', runs_dir, '--experiment', experiment,
        '--drloc-lambda', str(drloc_lambda), '--drloc-hidden-dim', str(args.drloc_hidden_dim),
        '--drloc-samples', str(args.drloc_samples),
    ]
    if device == 'cpu':
        command.append('--no-prefetcher')
    return command + list(extra)


class TrainingRunFailed(RuntimeError):
    """A training subprocess ended with a non-zero status (`returncode`, an ExitCode of train_drloc.py)."""

    def __init__(self, message: str, returncode: int):
        super().__init__(message)
        self.returncode = returncode


def run_training(command: Sequence[str], log_path: str) -> None:
    """Run one training subprocess, its output in `log_path`; TrainingRunFailed with the log's tail if it fails."""
    with open(log_path, 'w') as log:
        result = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        with open(log_path) as log:
            tail = ''.join(log.readlines()[-25:])
        raise TrainingRunFailed(f'training failed (exit {result.returncode}); command:\n  {" ".join(command)}\n'
                                f'last lines of {log_path}:\n{tail}', result.returncode)


def top1(folder: str) -> Tuple[float, float]:
    """(final, best) eval top-1 of an experiment folder's summary.csv."""
    values = read_experiment(folder).columns.get('eval_top1') or []
    values = [v for v in values if v == v]  # drop NaN
    if not values:
        raise SummaryError(f"'{folder}/summary.csv' has no eval_top1 values: did the run evaluate (--val-split)?")
    return values[-1], max(values)


def summarize(results: Dict[int, Dict[str, Tuple[float, float]]]) -> Tuple[List[Dict], Dict[str, Tuple]]:
    """Rows per seed and (mean, min, max) of the paired deltas (DRLoc minus baseline) over seeds."""
    rows = []
    for seed, runs in sorted(results.items()):
        (base_final, base_best), (drloc_final, drloc_best) = runs['baseline'], runs['drloc']
        rows.append(dict(seed=seed, baseline_final=base_final, drloc_final=drloc_final,
                         delta_final=drloc_final - base_final, baseline_best=base_best,
                         drloc_best=drloc_best, delta_best=drloc_best - base_best))
    stats = {}
    for key in ('delta_final', 'delta_best'):
        values = [row[key] for row in rows]
        stats[key] = (statistics.mean(values), min(values), max(values))
    return rows, stats


def write_tables(out: str, rows: List[Dict], stats: Dict[str, Tuple], header: str) -> str:
    """results.csv (one row per seed) and results.md (the same, plus mean and range); returns the markdown."""
    with open(os.path.join(out, 'results.csv'), 'w', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    lines = [header, '',
             '| seed | baseline final | DRLoc final | delta final | baseline best | DRLoc best | delta best |',
             '|---:|---:|---:|---:|---:|---:|---:|']
    for r in rows:
        lines.append(f"| {r['seed']} | {r['baseline_final']:.2f} | {r['drloc_final']:.2f} | {r['delta_final']:+.2f} | "
                     f"{r['baseline_best']:.2f} | {r['drloc_best']:.2f} | {r['delta_best']:+.2f} |")
    (mf, lo_f, hi_f), (mb, lo_b, hi_b) = stats['delta_final'], stats['delta_best']
    lines += ['', f'Paired delta (DRLoc - baseline, top-1 points) over {len(rows)} seed(s): '
                  f'final mean {mf:+.2f} (range {lo_f:+.2f} .. {hi_f:+.2f}), '
                  f'best mean {mb:+.2f} (range {lo_b:+.2f} .. {hi_b:+.2f}).']
    text = '\n'.join(lines) + '\n'
    with open(os.path.join(out, 'results.md'), 'w') as f:
        f.write(text)
    return text


def parse_args(argv: Optional[Sequence[str]] = None) -> Tuple[argparse.Namespace, List[str]]:
    parser = argparse.ArgumentParser(
        prog='timm-drloc demo', description='Train a tiny ViT on the digits with and without DRLoc and compare.',
        epilog='Other arguments are passed on to train_drloc.py.')
    parser.add_argument('--out', default='drloc_demo', help='output folder (data, runs, results) (default: drloc_demo)')
    parser.add_argument('--epochs', type=int, default=15)
    parser.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2],
                        help='one baseline + DRLoc pair per seed (default 0 1 2: mean and range of the delta)')
    parser.add_argument('--train-per-class', type=int, default=40, help='training images per digit (default 40: 400)')
    parser.add_argument('--val-per-class', type=int, default=30, help='validation images per digit (default 30: 300)')
    parser.add_argument('--split-seed', type=int, default=0, help='seed of the fixed train/validation split')
    parser.add_argument('--img-size', type=int, default=16, help='side of the upscaled digit images')
    parser.add_argument('--model', default=MODEL)
    parser.add_argument('--model-kwargs', nargs='+', default=list(MODEL_KWARGS), metavar='KEY=VALUE')
    parser.add_argument('-b', '--batch-size', type=int, default=32)
    parser.add_argument('--lr', type=float, default=2e-3)
    parser.add_argument('--drloc-lambda', type=float, default=0.5,
                        help="DRLoc weight on the reference code's unnormalized targets (default 0.5)")
    parser.add_argument('--drloc-hidden-dim', type=int, default=128, help='DRLoc MLP width (default 128 for a 64-wide ViT)')
    parser.add_argument('--drloc-samples', type=int, default=64)
    parser.add_argument('--data-only', action='store_true', help='write the ImageFolder and stop')
    args, extra = parser.parse_known_args(argv)
    if args.epochs < 1:
        parser.error(f'--epochs {args.epochs}: train at least 1 epoch.')
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
    print(f"digits ImageFolder at {data_dir}: {sum(counts['train'].values())} train, "
          f"{sum(counts['validation'].values())} validation images")
    if args.data_only:
        return ExitCode.OK
    os.makedirs(runs_dir, exist_ok=True)
    results, names, folders = {}, [], []
    started = time.time()
    for seed in args.seeds:
        results[seed] = {}
        for kind, weight in (('baseline', 0.0), ('drloc', args.drloc_lambda)):
            experiment = f'seed{seed}-{kind}'
            command = train_command(args, data_dir, runs_dir, experiment, seed, weight, extra)
            shutil.rmtree(os.path.join(runs_dir, experiment), ignore_errors=True)  # a fresh run, not a resume
            print(f'[{time.time() - started:6.0f}s] training {experiment} ({args.epochs} epochs) ...', flush=True)
            try:
                run_training(command, os.path.join(runs_dir, f'{experiment}.log'))
                results[seed][kind] = top1(os.path.join(runs_dir, experiment))
            except TrainingRunFailed as e:
                print(f'timm-drloc demo: {e}', file=sys.stderr)
                return e.returncode  # the run's own ExitCode
            except SummaryError as e:
                print(f'timm-drloc demo: {e}', file=sys.stderr)
                return ExitCode.BAD_INPUT
            names.append(experiment)
            folders.append(os.path.join(runs_dir, experiment))
            print(f'           final top-1 {results[seed][kind][0]:.2f}, best {results[seed][kind][1]:.2f}')
    rows, stats = summarize(results)
    header = (f'Digits demo: {args.model} {" ".join(args.model_kwargs)}, {args.epochs} epochs, '
              f"{sum(counts['train'].values())} train / {sum(counts['validation'].values())} validation images, "
              f'DRLoc lambda {args.drloc_lambda} (unnormalized targets), hidden {args.drloc_hidden_dim}, '
              f'm={args.drloc_samples}; eval top-1 %, {time.time() - started:.0f} s in all.')
    print('\n' + write_tables(out, rows, stats, header))
    experiments = [read_experiment(folder, name) for folder, name in zip(folders, names)]
    png = plot_experiments(experiments, os.path.join(out, 'curves.png'), title='digits: baseline vs DRLoc')
    print(f"wrote {os.path.join(out, 'results.md')}, {os.path.join(out, 'results.csv')}, {png}")
    return ExitCode.OK


if __name__ == '__main__':
    raise SystemExit(main())
