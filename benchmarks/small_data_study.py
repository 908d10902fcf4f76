"""Small-data study: does DRLoc help when a model is trained from scratch on N images per class?

For each size N (`--sizes`) and seed (`--seeds`) this draws a class-balanced subset of N images per class
from an ImageFolder's train split (deterministic from the seed; the N=100 subset of a seed lies inside its
N=500 subset) and trains `train_drloc.py` on it twice, with the same recipe and seed: `--drloc-lambda 0`
(plain timm training) and `--drloc-lambda LAMBDA`. Every argument this script does not know is a
train_drloc.py flag and goes to both runs, so the recipe is yours.

    python benchmarks/small_data_study.py --data /data/cifar10 --eval-split test --sizes 100 500 \\
        --epochs 150 30 --seeds 0 1 2 --drloc-lambda 0.5 --out study --jobs 2 --threads 1 \\
        --model vit_tiny_patch16_224 --model-kwargs img_size=32 patch_size=4 --img-size 32 ...

Choose the recipe on held-out training images, not on the test split: `--holdout-per-class K` evaluates
on the last K images (by file name) of each class of the train split and draws the subsets from the rest.

Writes into `--out`: `data/` (the subsets, as ImageFolders of symbolic links), `runs/<n>-seed<s>-<arm>/`
(train_drloc.py experiment folders, with a `.log` beside each), and the report: `results.md` (every pair,
then per N the mean top-1 of both arms and the mean, range and 95 % t-interval of the paired delta over
seeds), `results.json` (the same) and `top1_by_size.png`. Running the same command again skips finished
runs and continues unfinished ones from their last checkpoint (`--resume auto`), so a long study can be
stopped (Ctrl-C) and continued.
"""
import argparse
import json
import os
import platform
import random
import shutil
import sys
import time
from typing import Dict, List, Optional, Sequence, Tuple

from timm.data.readers.img_extensions import get_img_extensions

from timm_drloc.errors import ConfigError, ExitCode, SummaryError
from timm_drloc.paired import (
    ARMS, Run, RunFailedError, default_device, json_report, markdown_report, pair_runs, pair_up, recorded_result,
    run_all)
from timm_drloc.plot import plot_top1_by_size

EVAL = 'eval'  # the evaluation split's name inside each subset's data folder
# train_drloc.py flags the study sets itself for each run; passing them would break the pairing
OWN_TRAIN_FLAGS = ('--seed', '--experiment', '--output', '--resume', '--train-split', '--val-split', '--data-dir',
                   '--stop-epoch', '--drloc-lambda', '--epochs', '--device', '--no-prefetcher')


# ---------------------------------------------------------------------------------------------------------
# Subsets
# ---------------------------------------------------------------------------------------------------------

def list_images(split_dir: str) -> Dict[str, List[str]]:
    """{class folder: sorted image file names} of one ImageFolder split (`split_dir/<class>/<image>`).

    Raises:
        ConfigError: the folder does not exist or holds no class folder with images.
    """
    if not os.path.isdir(split_dir):
        raise ConfigError(f"'{split_dir}' is not a folder: the data root needs <split>/<class>/<image> folders "
                         f'(pass --train-split / --eval-split with the names of yours)')
    extensions = tuple(get_img_extensions())
    classes = {}
    for name in sorted(os.listdir(split_dir)):
        folder = os.path.join(split_dir, name)
        if os.path.isdir(folder):
            classes[name] = sorted(f for f in os.listdir(folder) if f.lower().endswith(extensions))
    if not any(classes.values()):
        raise ConfigError(f"'{split_dir}' has no class folders with images in them")
    return classes


def split_holdout(pool: Dict[str, List[str]], per_class: int) -> Tuple[Dict[str, List[str]], Dict[str, List[str]]]:
    """(the rest, held out): the last `per_class` names of each class are held out for evaluation.

    Raises:
        ConfigError: a class has no more than `per_class` images (nothing would be left to train on).
    """
    for cls, names in pool.items():
        if len(names) <= per_class:
            raise ConfigError(f"class '{cls}' has {len(names)} images: holding out {per_class} leaves none to train "
                             f'on. Lower --holdout-per-class.')
    return ({cls: names[:-per_class] for cls, names in pool.items()},
            {cls: names[-per_class:] for cls, names in pool.items()})


def draw_subset(pool: Dict[str, List[str]], per_class: int, seed: int) -> Dict[str, List[str]]:
    """`per_class` names of every class, drawn without replacement, the same for the same (pool, seed).

    Each class is shuffled by its own generator seeded with (seed, class name) and the first `per_class`
    taken, so a subset of a seed contains the smaller subsets of that seed, and one class's draw does not
    depend on the others.

    Raises:
        ConfigError: a class has fewer than `per_class` images (names the class and its count).
    """
    if per_class < 1:
        raise ConfigError(f'{per_class} images per class: draw at least 1.')
    subset = {}
    for cls, names in sorted(pool.items()):
        if len(names) < per_class:
            raise ConfigError(f"class '{cls}' has only {len(names)} images, fewer than the {per_class} per class "
                             f'asked for. Lower the size (--sizes) or add images.')
        order = list(names)
        random.Random(f'{seed}/{cls}').shuffle(order)
        subset[cls] = sorted(order[:per_class])
    return subset


def write_links(dest: str, source: str, files: Dict[str, List[str]]) -> None:
    """An ImageFolder split of symbolic links: dest/<class>/<name> -> source/<class>/<name>; replaces dest."""
    shutil.rmtree(dest, ignore_errors=True)
    for cls, names in files.items():
        os.makedirs(os.path.join(dest, cls))
        for name in names:
            os.symlink(os.path.abspath(os.path.join(source, cls, name)), os.path.join(dest, cls, name))


def link_or_replace(target: str, link: str) -> None:
    """`link` -> `target` (a folder), replacing whatever `link` was."""
    if os.path.islink(link) or os.path.isfile(link):
        os.remove(link)
    elif os.path.isdir(link):
        shutil.rmtree(link)
    os.symlink(os.path.abspath(target), link)


# ---------------------------------------------------------------------------------------------------------
# The study
# ---------------------------------------------------------------------------------------------------------

def parse_args(argv: Optional[Sequence[str]] = None) -> Tuple[argparse.Namespace, List[str]]:
    parser = argparse.ArgumentParser(
        description='Train train_drloc.py with and without DRLoc on N images per class, for several N and seeds.',
        epilog='Other arguments are train_drloc.py flags, passed to every run (the recipe).', allow_abbrev=False)
    parser.add_argument('--data', required=True, metavar='DIR', help='ImageFolder root holding the splits')
    parser.add_argument('--train-split', default='train', help='split the subsets are drawn from (default: train)')
    parser.add_argument('--eval-split', default=None, help='split every run is evaluated on (e.g. validation, test)')
    parser.add_argument('--holdout-per-class', type=int, default=None, metavar='K',
                        help='evaluate on the last K images of each train class instead of --eval-split, and draw '
                             'the subsets from the rest: choose a recipe on these, never on the test split')
    parser.add_argument('--sizes', type=int, nargs='+', required=True, metavar='N', help='images per class')
    parser.add_argument('--epochs', type=int, nargs='+', required=True,
                        help='epochs of every run: one value, or one per size')
    parser.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2], help='subset and training seeds')
    parser.add_argument('--drloc-lambda', type=float, default=0.5, help='DRLoc weight of the DRLoc arm (default 0.5)')
    parser.add_argument('--out', required=True, help='output folder (subsets, runs, report)')
    parser.add_argument('--jobs', type=int, default=1, help='trainings run at the same time (default 1)')
    parser.add_argument('--threads', type=int, default=None, help='torch CPU threads per training (OMP_NUM_THREADS)')
    parser.add_argument('--device', default=None, help='cuda or cpu (default: cuda when available)')
    parser.add_argument('--progress-every', type=float, default=300, metavar='SECONDS',
                        help='how often to print the epoch each running training is at (default 300)')
    parser.add_argument('--report-only', action='store_true',
                        help='train nothing: write the report from the pairs that have finished')
    args, flags = parser.parse_known_args(argv)
    if (args.eval_split is None) == (args.holdout_per_class is None):
        parser.error('evaluate on one thing: give --eval-split NAME or --holdout-per-class K (not both)')
    if len(args.epochs) not in (1, len(args.sizes)):
        parser.error(f'--epochs: give one value or one per size ({len(args.sizes)} sizes), got {len(args.epochs)}')
    if min(args.epochs) < 1 or min(args.sizes) < 1:
        parser.error(f'--sizes {args.sizes} and --epochs {args.epochs} must all be >= 1')
    if args.drloc_lambda <= 0:
        parser.error(f'--drloc-lambda {args.drloc_lambda}: the DRLoc arm needs a weight > 0 (the baseline is 0)')
    if args.jobs < 1:
        parser.error(f'--jobs {args.jobs}: run at least 1 training at a time')
    owned = [f for f in flags if f.split('=')[0] in OWN_TRAIN_FLAGS]
    if owned:
        parser.error(f'{" ".join(owned)}: the study sets this for each run itself (subset, seed, folder, arm); '
                     f'use --seeds / --epochs / --out / --device instead')
    return args, flags


def prepare_data(args: argparse.Namespace) -> Tuple[Dict[Tuple[int, int], str], int, Dict[str, int]]:
    """Write the subsets; ({(size, seed): data root with train/ and eval/}, number of classes, pool sizes)."""
    source_train = os.path.join(args.data, args.train_split)
    pool = list_images(source_train)
    data = os.path.join(args.out, 'data')
    os.makedirs(data, exist_ok=True)
    eval_dir = os.path.join(data, EVAL)
    if args.holdout_per_class is not None:
        pool, held_out = split_holdout(pool, args.holdout_per_class)
        write_links(eval_dir, source_train, held_out)
    else:
        source_eval = os.path.join(args.data, args.eval_split)
        missing = sorted(set(pool) - set(list_images(source_eval)))
        if missing:
            raise ConfigError(f"'{source_eval}' has no folder for class(es) {', '.join(missing)} of the train split: "
                             f'both splits need the same class folders')
        link_or_replace(source_eval, eval_dir)
    roots = {}
    for size in args.sizes:
        for seed in args.seeds:
            root = os.path.join(data, f'n{size}-seed{seed}')
            write_links(os.path.join(root, 'train'), source_train, draw_subset(pool, size, seed))
            link_or_replace(eval_dir, os.path.join(root, EVAL))
            roots[(size, seed)] = root
    return roots, len(pool), {cls: len(names) for cls, names in pool.items()}


def epochs_by_size(args: argparse.Namespace) -> Dict[int, int]:
    return dict(zip(args.sizes, args.epochs * len(args.sizes) if len(args.epochs) == 1 else args.epochs))


def plan_runs(args: argparse.Namespace, flags: Sequence[str], roots: Dict[Tuple[int, int], str],
              num_classes: int, device: str) -> List[Run]:
    """Both arms of every (seed, size), seed by seed (so the first seeds' pairs finish first), arms adjacent."""
    epochs = epochs_by_size(args)
    output = os.path.abspath(os.path.join(args.out, 'runs'))
    recipe = ['--train-split', 'train', '--val-split', EVAL, '--num-classes', str(num_classes), *flags]
    runs = []
    for seed in args.seeds:
        for size in args.sizes:
            runs += pair_runs(os.path.abspath(roots[(size, seed)]), output, f'n{size}-seed{seed}', size, seed,
                              epochs[size], args.drloc_lambda, recipe, device)
    return runs


def write_report(args: argparse.Namespace, argv: Sequence[str], flags: Sequence[str], results, device: str,
                 pool: Dict[str, int], seconds: float) -> str:
    """results.md, results.json and top1_by_size.png from finished runs; returns the Markdown."""
    import timm
    import torch
    pairs = pair_up(results)
    evaluated_on = (f'the last {args.holdout_per_class} images of each class of {args.train_split}/ (held out)'
                    if args.holdout_per_class is not None else f'{args.eval_split}/')
    meta = dict(
        data=os.path.abspath(args.data), train_split=args.train_split, evaluated_on=evaluated_on,
        pool_per_class=pool, sizes=args.sizes, epochs=args.epochs, seeds=args.seeds,
        drloc_lambda=args.drloc_lambda, train_flags=list(flags), device=device, jobs=args.jobs,
        threads=args.threads, command=' '.join(['python', 'benchmarks/small_data_study.py', *argv]), seconds_this_invocation=round(seconds, 1),
        host=dict(cpus=os.cpu_count(), platform=platform.platform(), python=platform.python_version(),
                  torch=torch.__version__, timm=timm.__version__,
                  gpu=torch.cuda.get_device_name() if device.startswith('cuda') else None),
    )
    title = (f'# Small-data study: DRLoc (lambda {args.drloc_lambda}) against plain timm\n\n'
             f'Data: `{args.data}`, subsets of {args.train_split}/, evaluated on {evaluated_on}. '
             f'Epochs per size: {epochs_by_size(args)}. '
             f'Device: {meta["host"]["gpu"] or device}.\n\ntrain_drloc.py recipe: `{" ".join(flags)}`')
    text = markdown_report(pairs, title)
    with open(os.path.join(args.out, 'results.md'), 'w') as f:
        f.write(text)
    with open(os.path.join(args.out, 'results.json'), 'w') as f:
        json.dump(json_report(pairs, meta), f, indent=1)
    points = [(p.size, p.seed, arm, getattr(p, arm).final) for p in pairs for arm in ARMS]
    plot_top1_by_size(points, os.path.join(args.out, 'top1_by_size.png'),
                      title=f'final top-1, plain timm vs DRLoc (lambda {args.drloc_lambda})')
    return text


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args, flags = parse_args(argv)
    device = args.device or default_device()
    started = time.time()
    try:
        roots, num_classes, pool = prepare_data(args)
        runs = plan_runs(args, flags, roots, num_classes, device)
        if args.report_only:
            results = [r for r in map(recorded_result, runs) if r is not None]
            finished = {(r.run.size, r.run.seed) for r in results if r.run.arm == 'drloc'} & {
                (r.run.size, r.run.seed) for r in results if r.run.arm == 'baseline'}
            results = [r for r in results if (r.run.size, r.run.seed) in finished]
            if not results:
                print('small_data_study: no pair has finished yet; nothing to report', file=sys.stderr)
                return ExitCode.BAD_INPUT
        else:
            print(f'{len(runs)} runs ({len(args.sizes)} sizes x {len(args.seeds)} seeds x 2 arms) on {device}, '
                  f'{args.jobs} at a time; output in {os.path.abspath(args.out)}', flush=True)
            results = run_all(runs, jobs=args.jobs, threads=args.threads,
                              say=lambda line: print(line, flush=True), report_every=args.progress_every)
    except (ConfigError, SummaryError) as e:
        print(f'small_data_study: {e}', file=sys.stderr)
        return ExitCode.BAD_INPUT
    except RunFailedError as e:
        print(f'small_data_study: {e}', file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print('small_data_study: interrupted; run the same command again to continue', file=sys.stderr)
        return ExitCode.INTERRUPTED
    print('\n' + write_report(args, argv, flags, results, device, pool, time.time() - started))
    print(f'wrote {os.path.join(args.out, "results.md")}, results.json, top1_by_size.png')
    return ExitCode.OK


if __name__ == '__main__':
    raise SystemExit(main())
