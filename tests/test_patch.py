"""patches/timm-train-drloc.patch: a git-apply-able diff that adds DRLoc to an upstream timm train.py.

The checks against a real upstream train.py need one on disk: set TIMM_TRAIN_PY to the train.py of a
huggingface/pytorch-image-models checkout (the commit named in the patch header) to run them.
"""
import argparse
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Dict, List

import pytest

PATCHES = Path(__file__).resolve().parent.parent / 'patches'
PATCH = PATCHES / 'timm-train-drloc.patch'
CHECK_SH = PATCHES / 'check.sh'
UPSTREAM = os.environ.get('TIMM_TRAIN_PY')

needs_git = pytest.mark.skipif(shutil.which('git') is None, reason='git is not installed (git apply reads the patch)')
needs_upstream = pytest.mark.skipif(
    not UPSTREAM,
    reason='TIMM_TRAIN_PY is not set: point it to the train.py of a huggingface/pytorch-image-models checkout '
           '(the commit named in patches/timm-train-drloc.patch) to check the patch against it')


def patch_header() -> str:
    """The free text before the first `diff --git` (git apply ignores it)."""
    return PATCH.read_text().split('diff --git', 1)[0]


def diff_lines() -> List[str]:
    """The lines of the diff itself, from the first `diff --git` on."""
    text = PATCH.read_text()
    return text[text.index('diff --git'):].splitlines()


def added_lines() -> List[str]:
    """Lines the patch adds to train.py, without the leading '+'."""
    return [l[1:] for l in diff_lines() if l.startswith('+') and not l.startswith('+++')]


def removed_lines() -> List[str]:
    """Lines the patch removes from train.py, without the leading '-'."""
    return [l[1:] for l in diff_lines() if l.startswith('-') and not l.startswith('---')]


def drloc_options(parser: argparse.ArgumentParser) -> Dict[str, tuple]:
    """--drloc-* flag -> (dest, default, type, choices, nargs, const) of an argparse parser."""
    return {
        a.option_strings[0]: (a.dest, a.default, a.type, tuple(a.choices or ()), a.nargs, a.const)
        for a in parser._actions if a.option_strings and a.option_strings[0].startswith('--drloc-')}


def test_patch_header_names_the_upstream_commit_also_named_in_the_readme():
    commits = re.findall(r'\b[0-9a-f]{40}\b', patch_header())
    assert commits, 'the patch header names no 40-hex upstream commit'
    assert commits[0] in (PATCHES / 'README.md').read_text(), 'patches/README.md names another commit'


@needs_git
def test_git_apply_parses_the_patch_and_it_touches_only_train_py(tmp_path):
    result = subprocess.run(['git', 'apply', '--numstat', str(PATCH)], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    files = [line.split('\t')[2] for line in result.stdout.splitlines()]
    assert files == ['train.py']


def test_patch_imports_only_timm_drloc_and_replaces_one_line():
    imports = [l.strip() for l in added_lines() if re.match(r'\s*(import|from)\s', l)]
    assert imports == ['import timm_drloc']
    assert [l.strip() for l in removed_lines()] == ["return OrderedDict([('loss', loss_avg)])"]


def test_patch_builds_drloc_task_and_sets_lambda_each_epoch():
    text = '\n'.join(added_lines())
    assert 'timm_drloc.DRLocTask(' in text
    assert 'task.set_drloc_lambda(timm_drloc.drloc_lambda_for_epoch(args, epoch, num_epochs))' in text


def test_patch_adds_the_flags_and_maps_them_with_the_functions_train_drloc_uses():
    text = '\n'.join(added_lines())
    assert 'timm_drloc.add_drloc_args(parser)' in text and '**drloc_kwargs)' in text
    assert 'add_argument(' not in text  # no flag of its own: the one definition is timm_drloc's
    from timm_drloc.train import parser as ours
    patched = argparse.ArgumentParser()
    exec('import timm_drloc\n' + next(l for l in added_lines() if 'add_drloc_args' in l), {'parser': patched})
    assert drloc_options(patched) == drloc_options(ours)


@needs_git
@needs_upstream
def test_git_apply_accepts_the_patch_on_upstream_train_py(tmp_path):
    shutil.copy(UPSTREAM, tmp_path / 'train.py')
    result = subprocess.run(['git', 'apply', '--check', str(PATCH)], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, f'git apply --check failed on {UPSTREAM}:\n{result.stderr}'


@needs_git
@needs_upstream
def test_check_sh_trains_one_epoch_with_drloc_on_patched_upstream_train_py():
    env = dict(os.environ, CHECK_MODELS=os.environ.get('CHECK_MODELS', 'resnet18'))
    result = subprocess.run(['bash', str(CHECK_SH), UPSTREAM], capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, f'check.sh failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}'
    assert '== OK:' in result.stdout
    assert 'task_state[\'drloc_heads\']' in result.stdout
