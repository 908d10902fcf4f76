"""Mutation score per module from a `mutmut run` (the `mutants/` folder it leaves), and the surviving mutants.

    python benchmarks/mutation_score.py [--equivalent benchmarks/mutation_equivalent.txt] [--survivors]
    python benchmarks/mutation_score.py --sample 240 [--seed 0] [--match GLOB ...]   # names for `mutmut run`

Score = killed / (killed + survived + no tests): a mutant no test reaches is a change nothing would notice.
Killed includes timeouts. Survivors listed as equivalent in the `--equivalent` file (one mutant name per
line, then '  # why') are counted apart and left out of the score; mutants not run ('not checked') too.
See README "Development" for the commands that produce `mutants/`.
"""
import argparse
import fnmatch
import json
import random
from collections import Counter
from pathlib import Path
from typing import Dict, Iterator, Optional, Set, Tuple

ROOT = Path(__file__).resolve().parents[1]

# mutmut 3's exit codes of a mutant's test run (mutmut/stats.py)
STATUS = {1: 'killed', 3: 'killed', 0: 'survived', 5: 'no tests', 33: 'no tests', 34: 'skipped', None: 'not checked',
          36: 'timeout', 24: 'timeout', -24: 'timeout', 152: 'timeout', 255: 'timeout', -11: 'segfault', -9: 'segfault'}


def mutant_results(mutants_dir: Path) -> Iterator[Tuple[str, str, str]]:
    """(module file, mutant name, status) for every mutant mutmut generated."""
    for meta in sorted(mutants_dir.rglob('*.py.meta')):
        module = str(meta.relative_to(mutants_dir))[:-len('.meta')]
        for name, code in json.loads(meta.read_text())['exit_code_by_key'].items():
            yield module, name, STATUS.get(code, 'suspicious')


def read_equivalent(path: Optional[Path]) -> Dict[str, str]:
    """Mutant name -> why it is equivalent, from lines 'NAME  # reason'."""
    if path is None or not path.is_file():
        return {}
    found = {}
    for line in path.read_text().splitlines():
        name, _, why = line.partition('#')
        if name.strip():
            found[name.strip()] = why.strip()
    return found


def summarize(mutants_dir: Path, equivalent: Dict[str, str],
              only: Optional[Set[str]] = None) -> Tuple[Dict[str, Counter], Set[str]]:
    counts: Dict[str, Counter] = {}
    survivors = set()
    for module, name, status in mutant_results(mutants_dir):
        if only is not None and name not in only:
            continue
        if status == 'survived' and name in equivalent:
            status = 'equivalent'
        elif status == 'timeout':
            status = 'killed'
        elif status in ('survived', 'no tests'):
            survivors.add(name)
        counts.setdefault(module, Counter())[status] += 1
    return counts, survivors


# the library core (benchmarks/mutation.sh core); the other mutated files hold the run-critical training and Hub code
CORE = tuple(f'timm_drloc/{name}.py' for name in ('losses', 'head', 'grids', 'model', 'task', 'settings', 'trainable'))


def sample(mutants_dir: Path, size: int, seed: int, patterns=()) -> list:
    """A seeded random sample of the mutants matching `patterns` (default: those of the core modules), each
    module in proportion to its mutant count."""
    by_module: Dict[str, list] = {}
    for module, name, _ in mutant_results(mutants_dir):
        if any(fnmatch.fnmatch(name, p) for p in patterns) if patterns else module in CORE:
            by_module.setdefault(module, []).append(name)
    total = sum(len(names) for names in by_module.values())
    rng = random.Random(seed)
    return [name for module, names in sorted(by_module.items())
            for name in rng.sample(sorted(names), min(len(names), round(size * len(names) / total)))]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--mutants', type=Path, default=ROOT / 'mutants', help='the folder mutmut run leaves')
    parser.add_argument('--equivalent', type=Path, default=ROOT / 'benchmarks' / 'mutation_equivalent.txt')
    parser.add_argument('--survivors', action='store_true',
                        help="list the surviving, non-equivalent mutants and those no test reaches")
    parser.add_argument('--sample', type=int, default=0,
                        help='print a seeded random sample of this many core-module mutant names and stop')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--match', nargs='*', default=(), help='sample among the mutant names matching these globs')
    parser.add_argument('--names', type=Path, default=None,
                        help='score only the mutants named in this file (one a line), e.g. a sample')
    args = parser.parse_args(argv)
    if args.sample:
        print('\n'.join(sample(args.mutants, args.sample, args.seed, args.match)))
        return
    only = set(args.names.read_text().split()) if args.names else None
    counts, survivors = summarize(args.mutants, read_equivalent(args.equivalent), only)
    columns = ('killed', 'survived', 'equivalent', 'no tests', 'not checked')
    print(f"{'module':<32}" + ''.join(f'{c:>12}' for c in columns) + f"{'score':>8}")
    for module, c in sorted(counts.items()):
        scored = c['killed'] + c['survived'] + c['no tests']
        score = f'{100 * c["killed"] / scored:.1f}%' if scored else '-'
        print(f'{module:<32}' + ''.join(f'{c[k]:>12}' for k in columns) + f'{score:>8}')
    if args.survivors:
        print('\nsurvived:')
        for name in sorted(survivors):
            print(f'  {name}')


if __name__ == '__main__':
    main()
