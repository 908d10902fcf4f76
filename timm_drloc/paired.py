"""Paired runs: one train_drloc.py recipe and seed trained without DRLoc (lambda 0) and with it.

`timm-drloc demo` and `benchmarks/small_data_study.py` are built on these pieces:

- `train_command`: the train_drloc.py command line of one run (`--resume auto` in its own experiment folder);
- `run_all`: runs them as subprocesses, a few at a time, printing progress. A run that finished records
  itself in its folder (`paired_run.json`), so running the same runs again skips it, and an unfinished
  one continues from its last checkpoint;
- `top1`: final and best eval top-1 of a run, from its `summary.csv`;
- `pair_up`, `paired_stats`, `markdown_report`, `json_report`: the paired differences (DRLoc minus
  baseline, per seed) and their mean, range and 95 % t-interval over seeds, for each data size.
"""
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from .errors import ConfigError, ExitCode, SummaryError
from .summary import SUMMARY_FILE, read_summary

ARMS = ('baseline', 'drloc')  # lambda 0 (plain timm training), then the DRLoc weight
RECORD = 'paired_run.json'  # written into a run's experiment folder when it has finished
LOG_TAIL_LINES = 25


@dataclass(frozen=True)
class Run:
    """One train_drloc.py run of a paired comparison.

    Args:
        name: experiment name (the folder's name), e.g. 'n100-seed0-drloc'.
        folder: the experiment folder train_drloc.py writes (`--output` / `--experiment`).
        command: the full command line.
        epochs: epochs of the schedule; the run is finished when summary.csv has the last one.
        size: images per class it trains on.
        seed: the training seed (and the subset's).
        arm: 'baseline' or 'drloc'.
    """
    name: str
    folder: str
    command: Tuple[str, ...]
    epochs: int
    size: int
    seed: int
    arm: str

    @property
    def log_path(self) -> str:
        """The run's console output, next to its folder (appended to when the run continues)."""
        return self.folder + '.log'


@dataclass(frozen=True)
class RunResult:
    """Eval top-1 (%) of a finished run: at the last epoch and the best epoch, and its wall time in seconds
    (of the invocation that finished it: a run that was stopped and continued took longer in all)."""
    run: Run
    final: float
    best: float
    seconds: float


class RunFailedError(RuntimeError):
    """A training subprocess exited with an error, or stopped before its last epoch."""

    def __init__(self, run: Run, returncode: int, reason: str):
        self.run, self.returncode = run, returncode
        super().__init__(f'{run.name}: {reason}; command:\n  {" ".join(run.command)}\n'
                         f'last lines of {run.log_path}:\n{_tail(run.log_path)}')

    @property
    def exit_code(self) -> int:
        """The training's own exit status; INTERRUPTED for one stopped by a signal or before its last epoch."""
        return self.returncode if self.returncode > 0 else ExitCode.INTERRUPTED


def default_device() -> str:
    import torch
    return 'cuda' if torch.cuda.is_available() else 'cpu'


def train_command(
        data_dir: str,
        output: str,
        experiment: str,
        seed: int,
        drloc_lambda: float,
        flags: Sequence[str],
        device: str,
) -> List[str]:
    """The train_drloc.py command of one run: the recipe `flags`, then what makes the run this run.

    `--resume auto` continues the experiment folder's last checkpoint when there is one (a fresh run
    otherwise). On the CPU timm's prefetcher (a CUDA stream) is off.
    """
    command = [
        sys.executable, '-m', 'timm_drloc.cli', 'train', data_dir, *flags,
        '--seed', str(seed), '--device', device, '--output', output, '--experiment', experiment,
        '--resume', 'auto', '--drloc-lambda', str(drloc_lambda),
    ]
    if device == 'cpu':
        command.append('--no-prefetcher')
    return command


def pair_runs(
        data_dir: str,
        output: str,
        prefix: str,
        size: int,
        seed: int,
        epochs: int,
        drloc_lambda: float,
        flags: Sequence[str],
        device: str,
) -> List[Run]:
    """The two runs of one (size, seed): `--drloc-lambda 0` and `--drloc-lambda drloc_lambda`, the same
    recipe (`flags`), data, epochs and seed; named `<prefix>-baseline` and `<prefix>-drloc` under `output`."""
    runs = []
    for arm, weight in zip(ARMS, (0.0, drloc_lambda)):
        name = f'{prefix}-{arm}'
        command = train_command(data_dir, output, name, seed, weight, ['--epochs', str(epochs), *flags], device)
        runs.append(Run(name, os.path.join(output, name), tuple(command), epochs, size, seed, arm))
    return runs


def _column(folder: str, key: str) -> List[float]:
    """The numbers in column `key` of the folder's summary.csv, in epoch order (empty cells left out)."""
    values = []
    for row in read_summary(folder):
        try:
            values.append(float(row.get(key)))
        except (TypeError, ValueError):
            continue
    return [v for v in values if v == v]  # drop NaN


def top1(folder: str) -> Tuple[float, float]:
    """(final, best) eval top-1 of an experiment folder's summary.csv.

    Raises:
        SummaryError: no summary.csv, or no eval_top1 values in it.
    """
    values = _column(folder, 'eval_top1')
    if not values:
        raise SummaryError(f"'{os.path.join(folder, SUMMARY_FILE)}' has no eval_top1 values: did the run evaluate "
                           f"(--val-split)?")
    return values[-1], max(values)


def epochs_done(folder: str) -> int:
    """Epochs recorded in the folder's summary.csv (its last epoch + 1), 0 when there is none yet."""
    try:
        epochs = _column(folder, 'epoch')
    except SummaryError:
        return 0
    return int(max(epochs)) + 1 if epochs else 0


def epoch_in_progress(run: Run) -> Optional[int]:
    """The epoch (counted from 0) the run's log last reported training (timm's `Train: N [...]` lines), for
    progress only; None before the first."""
    try:
        with open(run.log_path, 'rb') as f:
            f.seek(max(0, os.path.getsize(run.log_path) - 20000))
            text = f.read().decode(errors='replace')
    except OSError:
        return None
    found = re.findall(r'Train: (\d+) \[', text)
    return int(found[-1]) if found else None


def _progress(run: Run) -> str:
    epoch = epoch_in_progress(run)
    return 'starting' if epoch is None else f'in epoch {epoch + 1}/{run.epochs}'


def recorded_result(run: Run) -> Optional[RunResult]:
    """The result `run` recorded in its folder when it finished, or None when it has not finished.

    Raises:
        ConfigError: the folder holds a finished run of another command (another recipe or data).
    """
    path = os.path.join(run.folder, RECORD)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        record = json.load(f)
    if record.get('command') != list(run.command[1:]):
        raise ConfigError(
            f"'{run.folder}' holds a finished run of another command (recorded in {RECORD}): "
            f"{' '.join(record.get('command', []))}\nUse another output folder for this recipe, or delete that run.")
    return RunResult(run, record['final'], record['best'], record['seconds'])


def _record(run: Run, seconds: float) -> RunResult:
    final, best = top1(run.folder)
    with open(os.path.join(run.folder, RECORD), 'w') as f:  # the interpreter is left out: it may change
        json.dump(dict(command=list(run.command[1:]), final=final, best=best, seconds=round(seconds, 1)), f,
                  indent=1)
    return RunResult(run, final, best, seconds)


def _tail(path: str, lines: int = LOG_TAIL_LINES) -> str:
    try:
        with open(path) as f:
            return ''.join(f.readlines()[-lines:])
    except OSError:
        return '(no log)\n'


@dataclass
class _Active:
    run: Run
    process: subprocess.Popen
    started: float
    log: object


def run_all(
        runs: Sequence[Run],
        jobs: int = 1,
        threads: Optional[int] = None,
        fresh: bool = False,
        say: Callable[[str], None] = print,
        report_every: float = 60.0,
) -> List[RunResult]:
    """Run `runs` (train_drloc.py subprocesses), `jobs` at a time; their results in the order of `runs`.

    A run that recorded itself as finished is skipped (its recorded result is used); `fresh=True` deletes
    run folders first instead. `threads` sets OMP_NUM_THREADS / MKL_NUM_THREADS for each training process.
    Progress goes to `say`: a line when a run starts or ends, and every `report_every` seconds the
    epoch each running run is at. On Ctrl-C or SIGTERM the runs in progress are stopped (they continue from
    their last checkpoint next time) and KeyboardInterrupt is raised.

    Raises:
        RunFailedError: a run failed; the runs in progress were stopped.
        ConfigError: a run folder holds a finished run of another command.
        SummaryError: a finished run has no eval top-1 in its summary.csv.
    """
    import shutil
    if jobs < 1:
        raise ValueError(f'jobs={jobs}: run at least 1 training at a time.')
    env = dict(os.environ)
    if threads is not None:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    results: Dict[Run, RunResult] = {}
    pending = []
    for run in runs:
        if fresh:
            shutil.rmtree(run.folder, ignore_errors=True)
            if os.path.exists(run.log_path):
                os.remove(run.log_path)
        done = recorded_result(run)
        if done is None:
            pending.append(run)
        else:
            results[run] = done
            say(f'{run.name}: finished before (final top-1 {done.final:.2f}, best {done.best:.2f}), skipped')
    start, last_report, active = time.time(), time.time(), []
    total, number = len(pending), 0

    def clock() -> str:
        return time.strftime('%H:%M:%S') + f' +{time.time() - start:5.0f}s'

    previous_term = _stop_on_sigterm()
    try:
        while pending or active:
            while pending and len(active) < jobs:
                run = pending.pop(0)
                number += 1
                os.makedirs(os.path.dirname(run.folder) or '.', exist_ok=True)
                log = open(run.log_path, 'a')
                done_before = epochs_done(run.folder)
                say(f'[{clock()}] {number}/{total} start {run.name} ({run.epochs} epochs'
                    f'{f", continuing after epoch {done_before}" if done_before else ""}), log {run.log_path}')
                process = subprocess.Popen(run.command, stdout=log, stderr=subprocess.STDOUT, env=env)
                active.append(_Active(run, process, time.time(), log))
            time.sleep(0.5)
            for item in [a for a in active if a.process.poll() is not None]:
                active.remove(item)
                item.log.close()
                results[item.run] = _finish(item, say, clock)
            if active and time.time() - last_report >= report_every:
                last_report = time.time()
                say(f'[{clock()}] running: ' + ', '.join(f'{a.run.name} {_progress(a.run)}' for a in active))
    except BaseException:
        for item in active:
            item.process.terminate()
        for item in active:
            item.process.wait()
            item.log.close()
        if active:
            say(f'[{clock()}] stopped {", ".join(a.run.name for a in active)}; run again to continue them')
        raise
    finally:
        if previous_term is not None:
            signal.signal(signal.SIGTERM, previous_term)
    return [results[run] for run in runs]


def _stop_on_sigterm():
    """Make SIGTERM (`kill`, `timeout`) raise KeyboardInterrupt like Ctrl-C, so that run_all stops its
    trainings before it exits; returns the previous handler (None where signals cannot be set: a thread)."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt(f'signal {signum}')
    try:
        return signal.signal(signal.SIGTERM, interrupt)
    except ValueError:  # not the main thread
        return None


def _finish(item: _Active, say: Callable[[str], None], clock: Callable[[], str]) -> RunResult:
    run, code = item.run, item.process.returncode
    if code != 0:
        raise RunFailedError(run, code, f'exit status {code}')
    done = epochs_done(run.folder)
    if done < run.epochs:  # an interrupted run can exit 0
        raise RunFailedError(run, code, f'stopped after {done} of {run.epochs} epochs')
    result = _record(run, time.time() - item.started)
    say(f'[{clock()}] done {run.name}: final top-1 {result.final:.2f}, best {result.best:.2f} '
        f'({result.seconds:.0f} s)')
    return result


# ---------------------------------------------------------------------------------------------------------
# Paired statistics and reports
# ---------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Pair:
    """The two runs of one (size, seed): same data, recipe and seed, lambda 0 and lambda > 0."""
    size: int
    seed: int
    baseline: RunResult
    drloc: RunResult

    @property
    def delta_final(self) -> float:
        return self.drloc.final - self.baseline.final

    @property
    def delta_best(self) -> float:
        return self.drloc.best - self.baseline.best


@dataclass(frozen=True)
class PairedStats:
    """Mean, sample standard deviation, range and two-sided t-interval of values over seeds.

    ci_low / ci_high are None with fewer than 2 values (no spread to estimate).
    """
    n: int
    mean: float
    std: float
    min: float
    max: float
    ci_low: Optional[float]
    ci_high: Optional[float]


def paired_stats(values: Sequence[float], confidence: float = 0.95) -> PairedStats:
    """Statistics of per-seed values (paired deltas, or one arm's top-1).

    mean = sum(x) / n;  std = sqrt(sum((x - mean)^2) / (n - 1));
    interval = mean -+ t(1 - (1 - confidence) / 2, n - 1) * std / sqrt(n)  (Student's t, n >= 2).
    """
    n = len(values)
    if n == 0:
        raise ValueError('no values: a paired statistic needs at least one seed.')
    mean = sum(values) / n
    if n < 2:
        return PairedStats(n, mean, math.nan, min(values), max(values), None, None)
    from scipy.stats import t
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = t.ppf(1 - (1 - confidence) / 2, n - 1) * std / math.sqrt(n)
    return PairedStats(n, mean, std, min(values), max(values), mean - half, mean + half)


def pair_up(results: Sequence[RunResult]) -> List[Pair]:
    """Pairs of (size, seed), sorted; every (size, seed) must have both arms."""
    arms: Dict[Tuple[int, int], Dict[str, RunResult]] = defaultdict(dict)
    for result in results:
        arms[(result.run.size, result.run.seed)][result.run.arm] = result
    pairs = []
    for (size, seed), found in sorted(arms.items()):
        missing = [arm for arm in ARMS if arm not in found]
        if missing:
            raise ValueError(f'size {size}, seed {seed} has no {" / ".join(missing)} run to pair with.')
        pairs.append(Pair(size, seed, found['baseline'], found['drloc']))
    return pairs


def stats_by_size(pairs: Sequence[Pair]) -> Dict[int, Dict[str, PairedStats]]:
    """For each size: statistics over seeds of both arms' final top-1 and of the final and best deltas."""
    by_size: Dict[int, List[Pair]] = defaultdict(list)
    for pair in pairs:
        by_size[pair.size].append(pair)
    return {size: dict(
        baseline_final=paired_stats([p.baseline.final for p in group]),
        drloc_final=paired_stats([p.drloc.final for p in group]),
        delta_final=paired_stats([p.delta_final for p in group]),
        delta_best=paired_stats([p.delta_best for p in group]),
    ) for size, group in sorted(by_size.items())}


def _interval(stats: PairedStats) -> str:
    return 'n/a (1 seed)' if stats.ci_low is None else f'{stats.ci_low:+.2f} .. {stats.ci_high:+.2f}'


def markdown_report(pairs: Sequence[Pair], title: str, size_label: str = 'N / class') -> str:
    """A Markdown report: one row per pair (both arms' final and best top-1, the deltas, the minutes each
    run took), then one row per size: mean top-1 of each arm, and the mean, range and 95 % t-interval of
    the paired deltas over seeds."""
    lines = [title, '',
             f'| {size_label} | seed | baseline final | DRLoc final | delta final | baseline best | DRLoc best '
             f'| delta best | minutes (baseline / DRLoc) |',
             '|---:|---:|---:|---:|---:|---:|---:|---:|---:|']
    for p in pairs:
        lines.append(
            f'| {p.size} | {p.seed} | {p.baseline.final:.2f} | {p.drloc.final:.2f} | {p.delta_final:+.2f} | '
            f'{p.baseline.best:.2f} | {p.drloc.best:.2f} | {p.delta_best:+.2f} | '
            f'{p.baseline.seconds / 60:.1f} / {p.drloc.seconds / 60:.1f} |')
    lines += ['', f'Paired delta = DRLoc - baseline, eval top-1 points; over seeds: mean, range and the 95 % '
                  f't-interval of the mean.', '',
              f'| {size_label} | seeds | baseline final (mean) | DRLoc final (mean) | delta final: mean | range '
              f'| 95 % interval | delta best: mean | range | 95 % interval |',
              '|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|']
    for size, s in stats_by_size(pairs).items():
        df, db = s['delta_final'], s['delta_best']
        lines.append(
            f"| {size} | {df.n} | {s['baseline_final'].mean:.2f} | {s['drloc_final'].mean:.2f} | "
            f'**{df.mean:+.2f}** | {df.min:+.2f} .. {df.max:+.2f} | {_interval(df)} | '
            f'{db.mean:+.2f} | {db.min:+.2f} .. {db.max:+.2f} | {_interval(db)} |')
    return '\n'.join(lines) + '\n'


def json_report(pairs: Sequence[Pair], meta: Dict) -> Dict:
    """The report's content as JSON-ready data: `meta` (what was run), the pairs and the per-size statistics."""
    def run(result: RunResult) -> Dict:
        return dict(name=result.run.name, final=result.final, best=result.best, seconds=round(result.seconds, 1))

    def clean(stats: PairedStats) -> Dict:
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in asdict(stats).items()}

    return dict(
        meta=meta,
        pairs=[dict(size=p.size, seed=p.seed, baseline=run(p.baseline), drloc=run(p.drloc),
                    delta_final=p.delta_final, delta_best=p.delta_best) for p in pairs],
        sizes={str(size): {k: clean(v) for k, v in s.items()} for size, s in stats_by_size(pairs).items()},
    )
