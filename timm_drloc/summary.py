"""summary.csv: the per-epoch table a timm run writes in its experiment folder; written and read here.

timm's train.py appends each epoch with `timm.utils.update_summary` (epoch, train_*, eval_*, lr). A DRLoc run
adds one column after lr, `drloc_lambda`, the weight that epoch trained with: update_summary cannot write it
(every metric it is given gets a train_ or eval_ prefix, and it has no other columns), so `append_summary`
writes the row, in update_summary's layout and with its wandb logging. A resumed run's later rows are dropped
with timm's own `timm.utils.trim_summary`. Plots, the model card and the demo read the rows with
`read_summary`.
"""
import csv
import os
from collections import OrderedDict
from typing import Dict, List, Mapping, Optional

from .errors import SummaryError

SUMMARY_FILE = 'summary.csv'


def append_summary(
        path: str,
        epoch: int,
        train_metrics: Mapping[str, float],
        eval_metrics: Optional[Mapping[str, float]],
        lr: float,
        drloc_lambda: Optional[float] = None,
        log_wandb: bool = False,
) -> None:
    """Append one epoch to summary.csv at `path`: epoch, train_*, eval_*, lr, then drloc_lambda when given (a
    header first in a new or empty file), and log the same row to wandb with `log_wandb`."""
    row = OrderedDict(epoch=epoch)
    row.update(('train_' + k, v) for k, v in train_metrics.items())
    row.update(('eval_' + k, v) for k, v in (eval_metrics or {}).items())
    row['lr'] = lr
    if drloc_lambda is not None:
        row['drloc_lambda'] = drloc_lambda
    if log_wandb:
        import wandb
        wandb.log(row)
    new_file = not os.path.exists(path) or os.path.getsize(path) == 0
    with open(path, 'a', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=list(row))
        if new_file:
            writer.writeheader()
        writer.writerow(row)


def read_summary(folder: str) -> List[Dict[str, str]]:
    """The rows of `folder/summary.csv`, one dict per epoch (column -> text as written; [] with a header only).

    Raises:
        SummaryError: the folder has no summary.csv, or the file is binary or damaged.
    """
    path = os.path.join(folder, SUMMARY_FILE)
    if not os.path.isfile(path):
        raise SummaryError(f"'{folder}' has no {SUMMARY_FILE}. Pass the experiment folder that train_drloc.py / "
                           f"timm's train.py wrote (it holds {SUMMARY_FILE} after the first epoch).")
    try:
        with open(path, newline='') as f:
            return list(csv.DictReader(f))
    except (UnicodeDecodeError, csv.Error) as e:
        raise SummaryError(f"'{path}' is not a readable summary.csv ({type(e).__name__}: it holds binary or damaged "
                           f"data). Pass an experiment folder written by train_drloc.py / timm's train.py.") from None
