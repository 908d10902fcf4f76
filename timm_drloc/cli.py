"""The `timm-drloc` command: `train`, `demo`, `plot` and `export` subcommands.

Each subcommand lives in the module named after it and is imported only when used.
"""
import importlib
import sys
from typing import List, Optional

from .errors import ExitCode

# subcommand -> (module, function taking argv, one-line help)
COMMANDS = {
    'train': ('timm_drloc.train', 'run', "train a timm model with DRLoc (train_drloc.py's flags)"),
    'demo': ('timm_drloc.demo', 'main', 'digits demo: the same ViT trained with and without DRLoc'),
    'plot': ('timm_drloc.plot', 'main', "plot summary.csv curves of experiment folders to a PNG"),
    'export': ('timm_drloc.hub', 'export_main', "export a checkpoint to a folder in timm's Hub format"),
}


def usage() -> str:
    lines = ['usage: timm-drloc COMMAND [ARGS...]', '', 'commands:']
    lines += [f'  {name:<8} {help_}' for name, (_, _, help_) in COMMANDS.items()]
    lines += ['', 'Run `timm-drloc COMMAND --help` for the arguments of one command.']
    return '\n'.join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ('-h', '--help'):
        print(usage())
        return ExitCode.OK if argv else ExitCode.BAD_INPUT
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"timm-drloc: unknown command '{name}'.\n\n{usage()}", file=sys.stderr)
        return ExitCode.BAD_INPUT
    module_name, func_name, _ = COMMANDS[name]
    func = getattr(importlib.import_module(module_name), func_name)
    result = func(rest, prog=f'timm-drloc {name}') if name == 'train' else func(rest)  # the others name themselves
    return int(result or ExitCode.OK)


if __name__ == '__main__':
    sys.exit(main())
