"""Training curves of timm experiment folders: `timm-drloc plot EXPERIMENT_DIR [...] -o curves.png`.

Reads each folder's `summary.csv` (written by timm's train.py and by train_drloc.py) and draws four
panels against epoch, one line per experiment (solid with DRLoc, dashed without): train loss, DRLoc
loss, eval top-1 and the DRLoc lambda. A plain timm run has no DRLoc columns; its DRLoc panels say
so instead of drawing nothing.
"""
import argparse
import math
import os
import sys
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

from .errors import ExitCode, SummaryError
from .summary import SUMMARY_FILE, read_summary

# (column, panel title); the DRLoc columns are the ones train_drloc.py adds to timm's
PANELS = (
    ('train_loss', 'train loss (total)'),
    ('train_drloc_loss', 'DRLoc loss (train)'),
    ('eval_top1', 'eval top-1 (%)'),
    ('drloc_lambda', 'DRLoc lambda'),
)


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


def plot_experiments(experiments: Sequence[Experiment], out_path: str, title: Optional[str] = None) -> str:
    """Draw the four panels for `experiments` into the PNG `out_path` (see output_path); returns the file written."""
    out_path = output_path(out_path)
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    for ax, (column, panel_title) in zip(axes.flat, PANELS):
        drawn = 0
        for index, exp in enumerate(experiments):
            values = exp.columns.get(column)
            if values is None or all(math.isnan(v) for v in values):
                continue
            ax.plot(exp.epochs, values, marker='.' if len(values) < 30 else None, label=exp.name,
                    color=f'C{index % 10}', linestyle='-' if exp.uses_drloc else '--')
            drawn += 1
        ax.set_title(panel_title)
        ax.set_xlabel('epoch')
        ax.grid(alpha=0.3)
        if drawn:
            ax.legend(fontsize=8)
        else:
            missing = ', '.join(exp.name for exp in experiments)
            ax.text(0.5, 0.5, f"no '{column}' column in\n{missing}\n(plain timm run: no DRLoc)",
                    ha='center', va='center', transform=ax.transAxes, fontsize=9, color='0.4')
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return out_path


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
