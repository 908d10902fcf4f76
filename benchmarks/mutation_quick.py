"""Run mutmut's mutants without its stats and clean-test passes, for a sample on a busy machine.

`mutmut run` first runs the whole selected suite twice (once tracing which tests reach which function, once
clean) before the first mutant: on two shared cores that alone took longer than a session. Here each mutant
runs in a forked child of one warm process (torch, timm and pytest imported once) with MUTANT_UNDER_TEST set,
`pytest -x` over the test files of its module (TESTS below; neither slow nor training_run) and a CPU-time
limit; the exit code goes into mutants/<module>.py.meta as mutmut records it (0 survived, 1 killed, 24 timeout),
so benchmarks/mutation_score.py scores it. A survivor here may still be killed by a test file outside its
module's list: check survivors before writing tests for them.

    bash benchmarks/mutation.sh generate                                  # mutants/ (no test run)
    python benchmarks/mutation_score.py --sample 200 --seed 0 > sample.txt
    nice -n 19 python benchmarks/mutation_quick.py sample.txt [--deadline HH:MM]
    python benchmarks/mutation_score.py --names sample.txt --survivors
"""
import argparse
import json
import os
import random
import resource
import signal
import sys
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# the test files that exercise each core module (by what they test, not by tracing)
TESTS = {
    'losses': ['test_loss_values.py', 'test_head_values.py', 'test_head.py'],
    'head': ['test_head.py', 'test_head_values.py', 'test_loss_values.py', 'test_head_memory.py',
             'test_model_device.py', 'test_compile_head.py', 'test_wrap.py'],
    'grids': ['test_grid_rules.py', 'test_grid_detection.py', 'test_grid_contents.py', 'test_defaults.py', 'test_model_device.py',
              'test_wrap.py', 'test_model_passthrough.py'],
    'model': ['test_wrap.py', 'test_defaults.py', 'test_model_device.py', 'test_model_passthrough.py',
              'test_grid_contents.py', 'test_task_wrappers.py', 'test_grid_detection.py'],
    'task': ['test_task.py', 'test_base_task.py', 'test_task_wrappers.py', 'test_flag_plumbing.py',
             'test_checkpoint_safety.py'],
    'settings': ['test_settings_messages.py', 'test_settings.py', 'test_defaults.py', 'test_flag_plumbing.py', 'test_wrap.py',
                 'test_train_flags.py', 'test_task.py', 'test_task_wrappers.py'],
    'trainable': ['test_base_task.py', 'test_task.py'],
}
CPU_LIMIT_S = 240  # a mutant whose tests take longer (an endless loop, a compile) counts as a timeout: killed


def record(name: str, code: int) -> None:
    """Store a mutant's exit code in its module's .meta file, as mutmut does (run from mutants/)."""
    meta = Path(name.rsplit('.', 1)[0].replace('.', '/') + '.py.meta')
    data = json.loads(meta.read_text())
    data['exit_code_by_key'][name] = code
    meta.write_text(json.dumps(data, indent=4))


def run_mutant(name: str) -> int:
    """The exit code of the mutant's tests, run in a forked child."""
    files = ['tests/' + f for f in TESTS[name.split('.')[1]]]
    pid = os.fork()
    if pid == 0:
        os.environ['MUTANT_UNDER_TEST'] = name
        resource.setrlimit(resource.RLIMIT_CPU, (CPU_LIMIT_S, CPU_LIMIT_S + 10))
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        import pytest
        os._exit(int(pytest.main(['-x', '-q', '-p', 'no:cacheprovider', '-p', 'no:randomly', '--tb=no',
                                  '-m', 'not slow and not training_run'] + files)))
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    return 24 if code in (-signal.SIGXCPU, -signal.SIGKILL) else code


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('names', type=Path, help='mutant names, one a line (mutation_score.py --sample)')
    parser.add_argument('--order-seed', type=int, default=0, help='the names run in this seeded random order')
    parser.add_argument('--deadline', default=None, help='HH:MM today: start no mutant after it')
    args = parser.parse_args()
    names = args.names.read_text().split()
    random.Random(args.order_seed).shuffle(names)  # an interrupted run still covers every module
    deadline = (datetime.combine(datetime.now().date(), datetime.strptime(args.deadline, '%H:%M').time())
                .timestamp() if args.deadline else float('inf'))
    os.chdir(ROOT / 'mutants')
    sys.path[:] = [str(ROOT / 'mutants')] + [p for p in sys.path if Path(p or '.').resolve() != ROOT]
    os.environ['PYTHONPATH'] = str(ROOT / 'mutants')
    import pytest  # noqa: F401  the warm imports the children share
    import timm  # noqa: F401
    import timm_drloc
    assert Path(timm_drloc.__file__).is_relative_to(ROOT / 'mutants'), timm_drloc.__file__
    for i, name in enumerate(names):
        if time.time() > deadline:
            print(f'deadline: {i} of {len(names)} mutants run', flush=True)
            break
        start = time.time()
        code = run_mutant(name)
        record(name, code)
        print(f'{i + 1}/{len(names)} {name} exit={code} {time.time() - start:.0f}s', flush=True)


if __name__ == '__main__':
    main()
