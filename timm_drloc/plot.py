"""Plots of timm experiment folders: `timm-drloc plot EXPERIMENT_DIR [...] -o curves.png`.

`read_experiment` reads a folder's `summary.csv` (written by timm's train.py and by train_drloc.py);
`plot_experiments` draws four panels against epoch, one line per experiment (solid with DRLoc, dashed
without): train loss, DRLoc loss, eval top-1 and the DRLoc lambda. A plain timm run has no DRLoc
columns; its DRLoc panels say so instead of drawing nothing. `paired_gain` turns a baseline and a DRLoc run into one
curve of the top-1 gain per epoch, for a panel of its own (GAIN_PANEL).

`plot_top1_by_size` draws the final top-1 of paired runs against the training set size.
"""
import argparse
import math
import os
import sys
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from .errors import ExitCode, SummaryError
from .summary import SUMMARY_FILE, read_summary

# (column, panel title); the DRLoc columns are the ones train_drloc.py adds to timm's
PANELS = (
    ('train_loss', 'train loss (total)'),
    ('train_drloc_loss', 'DRLoc loss (train)'),
    ('eval_top1', 'eval top-1 (%)'),
    ('drloc_lambda', 'DRLoc lambda'),
)
EVAL_LOSS_PANEL = ('eval_loss', 'eval loss (cross-entropy)')
GAIN_COLUMN = 'eval_top1_gain'
GAIN_PANEL = (GAIN_COLUMN, 'DRLoc gain: eval top-1, DRLoc - baseline (points)')


@dataclass
class Experiment:
    """The columns of one summary.csv: name -> values, one per epoch row (NaN where empty)."""
    name: str
    path: str
    columns: Dict[str, List[float]] = field(default_factory=dict)

    @property
    def uses_drloc(self) -> bool:
        """True when some epoch trained with a DRLoc weight above 0 (drawn solid; plain runs dashed)."""
        return any(v > 0 for v in self.columns.get('drloc_lambda', []) if v == v)

    @property
    def epochs(self) -> List[float]:
        return self.columns.get('epoch') or list(range(len(next(iter(self.columns.values()), []))))


def read_experiment(folder: str, name: Optional[str] = None) -> Experiment:
    """The columns of `folder/summary.csv` as numbers, named `name` (default: the folder's name).

    Raises:
        SummaryError: the folder does not exist, has no summary.csv, or the file has no rows.
    """
    if not os.path.isdir(folder):
        raise SummaryError(f"'{folder}' is not a folder. Pass experiment folders (OUTPUT/EXPERIMENT) that hold a "
                           f"{SUMMARY_FILE}.")
    rows = read_summary(folder)
    if not rows:
        raise SummaryError(f"'{os.path.join(folder, SUMMARY_FILE)}' has a header but no epoch rows yet: wait for the "
                           f"first epoch to finish.")
    columns = {key: [_to_float(row.get(key)) for row in rows] for key in rows[0] if key}
    return Experiment(name or os.path.basename(os.path.normpath(folder)), folder, columns)


def _to_float(value: Optional[str]) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


DEFAULT_OUTPUT = 'drloc_curves.png'


def output_path(out_path: str) -> str:
    """The file a plot is written to: `out_path`, `out_path/drloc_curves.png` for a folder, `.png` added to a
    name without an extension (as matplotlib would add it)."""
    if os.path.isdir(out_path):
        return os.path.join(out_path, DEFAULT_OUTPUT)
    return out_path if os.path.splitext(out_path)[1] else out_path + '.png'


def paired_gain(baseline: Experiment, drloc: Experiment, name: str) -> Experiment:
    """An experiment with one column, GAIN_COLUMN: DRLoc's eval top-1 minus the baseline's, at each epoch
    both evaluated."""
    def by_epoch(exp: Experiment) -> Dict[float, float]:
        return {e: v for e, v in zip(exp.epochs, exp.columns.get('eval_top1', [])) if v == v}

    base, with_drloc = by_epoch(baseline), by_epoch(drloc)
    epochs = sorted(set(base) & set(with_drloc))
    return Experiment(name, drloc.path, {'epoch': epochs, GAIN_COLUMN: [with_drloc[e] - base[e] for e in epochs]})


def _new_figure(rows: int, cols: int, size: Sequence[float]):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    return plt, *plt.subplots(rows, cols, figsize=size)


def _save(plt, fig, out_path: str, title: Optional[str]) -> str:
    """Write the figure to output_path(out_path); returns the file written."""
    out_path = output_path(out_path)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return out_path


def plot_experiments(
        experiments: Sequence[Experiment],
        out_path: str,
        title: Optional[str] = None,
        panels: Sequence[Tuple[str, str]] = PANELS,
        colors: Optional[Sequence[str]] = None,
) -> str:
    """Draw four `panels` ((column, title) each) for `experiments` into the PNG `out_path` (see output_path);
    returns the file written.

    Each panel draws the experiments that have its column; the gain panel (GAIN_PANEL) also a zero line.
    `colors`: one matplotlib color per experiment (default: one color each).
    """
    plt, fig, axes = _new_figure(2, 2, (11, 7.5))
    for ax, (column, panel_title) in zip(axes.flat, panels):
        drawn = 0
        for index, exp in enumerate(experiments):
            values = exp.columns.get(column)
            if values is None or all(math.isnan(v) for v in values):
                continue
            ax.plot(exp.epochs, values, marker='.' if len(values) < 30 else None, label=exp.name,
                    color=colors[index] if colors else f'C{index % 10}', linestyle='-' if exp.uses_drloc or column == GAIN_COLUMN else '--')
            drawn += 1
        if column == GAIN_COLUMN:
            ax.axhline(0.0, color='0.3', linewidth=0.8)
        ax.set_title(panel_title)
        ax.set_xlabel('epoch')
        ax.grid(alpha=0.3)
        if drawn:
            ax.legend(fontsize=8)
        else:
            missing = ', '.join(exp.name for exp in experiments)
            ax.text(0.5, 0.5, f"no '{column}' column in\n{missing}\n(plain timm run: no DRLoc)",
                    ha='center', va='center', transform=ax.transAxes, fontsize=9, color='0.4')
    return _save(plt, fig, out_path, title)


def plot_top1_by_size(
        points: Sequence[Tuple[int, int, str, float]],
        out_path: str,
        title: Optional[str] = None,
        size_label: str = 'training images per class',
) -> str:
    """Final top-1 against training set size for each arm: every (size, seed) as a point, the mean over
    seeds as a line. `points`: (size, seed, arm, top1) with arm 'baseline' or 'drloc'. Returns the file written
    (see output_path)."""
    plt, fig, ax = _new_figure(1, 1, (6.5, 4.5))
    styles = {'baseline': ('plain timm (lambda 0)', 'C0', 'o', '--'), 'drloc': ('with DRLoc', 'C3', 's', '-')}
    sizes = sorted({p[0] for p in points})
    for arm, (label, color, marker, line) in styles.items():
        mine = [p for p in points if p[2] == arm]
        if not mine:
            continue
        offset = 1.02 if arm == 'drloc' else 0.98  # side by side, so equal values stay visible
        ax.scatter([p[0] * offset for p in mine], [p[3] for p in mine], color=color, marker=marker, alpha=0.6,
                   s=22, label=f'{label}, each seed')
        means = [sum(p[3] for p in mine if p[0] == s) / max(1, sum(p[0] == s for p in mine)) for s in sizes]
        ax.plot(sizes, means, color=color, linestyle=line, label=f'{label}, mean')
    ax.set_xscale('log')
    ax.set_xticks(sizes)
    ax.set_xticklabels([str(s) for s in sizes])
    ax.minorticks_off()
    ax.set_xlabel(size_label)
    ax.set_ylabel('final eval top-1 (%)')
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(plt, fig, out_path, title)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog='timm-drloc plot', description='Plot the summary.csv curves of experiment folders into one PNG.')
    parser.add_argument('experiments', nargs='+', metavar='EXPERIMENT_DIR', help='folders holding a summary.csv')
    parser.add_argument('-o', '--output', default=DEFAULT_OUTPUT,
                        help=f'PNG to write, or a folder to write {DEFAULT_OUTPUT} in (default: {DEFAULT_OUTPUT})')
    parser.add_argument('--names', nargs='+', default=None, help='legend names, one per folder (default: folder names)')
    parser.add_argument('--title', default=None, help='figure title')
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if args.names is not None and len(args.names) != len(args.experiments):
        print(f"timm-drloc plot: {len(args.names)} --names for {len(args.experiments)} folders; give one name per folder.", file=sys.stderr)
        return ExitCode.BAD_INPUT
    names = args.names or [None] * len(args.experiments)
    try:
        experiments = [read_experiment(folder, name) for folder, name in zip(args.experiments, names)]
    except SummaryError as e:
        print(f'timm-drloc plot: {e}', file=sys.stderr)
        return ExitCode.BAD_INPUT
    print(f'wrote {plot_experiments(experiments, args.output, args.title)}')
    return ExitCode.OK


if __name__ == '__main__':
    raise SystemExit(main())
