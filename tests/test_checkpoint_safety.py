"""Checkpoints stay usable: DRLoc head state loads only when its keys match, a crash in the middle of a
checkpoint write leaves the previous file whole, and resuming after it keeps each epoch once in summary.csv."""
import csv
import os
import shutil
from collections import OrderedDict
from pathlib import Path

import pytest
import timm
import torch
from timm.utils import load_checkpoint_metadata

import timm_drloc.train as train
from timm_drloc import DRLocTask


def make_task() -> DRLocTask:
    model = timm.create_model('vit_tiny_patch16_224', num_classes=3, img_size=32, patch_size=8, depth=1,
                              embed_dim=32, num_heads=2)
    return DRLocTask(model, hidden_dim=16, verbose=False)


@pytest.mark.parametrize('change', ['missing', 'unexpected'])
def test_head_state_whose_keys_do_not_match_is_refused(change):
    heads = dict(make_task().get_task_state()['drloc_heads'])
    if change == 'missing':
        heads.pop(sorted(heads)[-1])
    else:
        heads['1.mlp.0.weight'] = torch.zeros(16, 64)  # a second head the task does not have
    task = make_task()
    with pytest.raises(RuntimeError, match='Missing key' if change == 'missing' else 'Unexpected key'):
        task.load_task_state({'drloc_heads': heads})


def argv(data: Path, out: Path, *extra: str) -> list:
    return ['train_drloc.py', '--data-dir', str(data), '--model', 'vit_tiny_patch16_224', '--model-kwargs',
            'img_size=32', 'patch_size=8', 'depth=1', 'embed_dim=32', 'num_heads=2', '--img-size', '32',
            '--num-classes', '3', '--device', 'cpu', '-j', '0', '-b', '8', '--opt', 'adamw', '--lr', '3e-3',
            '--warmup-epochs', '0', '--no-aug', '--epochs', '2', '--drloc-lambda', '0.5', '--drloc-hidden-dim', '16',
            '--output', str(out), '--experiment', 'run', *extra]


def summary(exp: Path) -> list:
    with (exp / 'summary.csv').open() as f:
        return list(csv.DictReader(f))


class _Crash(Exception):
    """Stands for the process dying at this point."""


@pytest.mark.training_run
def test_crash_while_writing_a_checkpoint_keeps_last_whole_and_resume_writes_each_epoch_once(
        monkeypatch, tmp_path, image_folder):
    real_save = torch.save
    saves = []

    def save_then_die_in_the_second_write(obj, f, *args, **kwargs):
        saves.append(f)
        if len(saves) < 2:
            return real_save(obj, f, *args, **kwargs)
        half = b'PK\x03\x04' + b'\0' * 64  # half a file written, then the process is gone
        if hasattr(f, 'write'):  # a saver that opens the file itself
            f.write(half)
            f.flush()
        else:
            with open(f, 'wb') as out:
                out.write(half)
        raise _Crash(f)
    monkeypatch.setattr(torch, 'save', save_then_die_in_the_second_write)
    monkeypatch.setattr('sys.argv', argv(image_folder, tmp_path, '--resume', 'auto'))
    with pytest.raises(_Crash):
        train.main()  # epoch 1's summary row is written, its checkpoint is not
    monkeypatch.undo()
    exp = tmp_path / 'run'
    assert load_checkpoint_metadata(exp / 'last.pth.tar')['epoch'] == 0
    assert (exp / 'last.pth.tar').read_bytes() == (exp / 'checkpoint-0.pth.tar').read_bytes()
    rows_before = summary(exp)
    assert [r['epoch'] for r in rows_before] == ['0', '1']

    monkeypatch.setattr('sys.argv', argv(image_folder, tmp_path, '--resume', 'auto'))
    train.main()  # resumes at epoch 1: the row of the epoch it runs again is replaced, not repeated
    rows = summary(exp)
    assert [r['epoch'] for r in rows] == ['0', '1']
    assert rows[0] == rows_before[0]
    assert load_checkpoint_metadata(exp / 'last.pth.tar')['epoch'] == 1


@pytest.mark.training_run
def test_crash_while_copying_a_new_model_best_keeps_the_previous_one_whole(monkeypatch, tmp_path, image_folder):
    def no_hard_links(src, dst, *args, **kwargs):
        raise OSError('hard links not supported here')

    real_copy = shutil.copy2
    best_copies = []

    def copy_then_die_in_the_second_model_best(src, dst, *args, **kwargs):
        if not os.path.basename(dst).startswith('model_best'):
            return real_copy(src, dst, *args, **kwargs)
        best_copies.append(dst)
        if len(best_copies) < 2:
            return real_copy(src, dst, *args, **kwargs)
        with open(src, 'rb') as source, open(dst, 'wb') as out:
            out.write(source.read(1024))
        raise _Crash(dst)

    top1 = iter([40.0, 60.0])  # epoch 1 is better: model_best is replaced

    def validate(*args, **kwargs):
        return OrderedDict(loss=1.0, top1=next(top1), top5=100.0)
    monkeypatch.setattr(os, 'link', no_hard_links)
    monkeypatch.setattr(shutil, 'copy2', copy_then_die_in_the_second_model_best)
    monkeypatch.setattr(train, 'validate', validate)
    monkeypatch.setattr('sys.argv', argv(image_folder, tmp_path))
    with pytest.raises(_Crash):
        train.main()
    monkeypatch.undo()
    exp = tmp_path / 'run'
    assert len(best_copies) == 2
    assert load_checkpoint_metadata(exp / 'model_best.pth.tar')['epoch'] == 0
    assert (exp / 'model_best.pth.tar').read_bytes() == (exp / 'checkpoint-0.pth.tar').read_bytes()


def test_state_without_heads_is_refused_with_the_way_out_or_skipped_when_not_strict():
    task = make_task()
    before = {k: v.clone() for k, v in task.get_task_state()['drloc_heads'].items()}
    for state in (None, {}, {'other_task': {}}):
        with pytest.raises(RuntimeError) as error:
            task.load_task_state(state)
        assert str(error.value) == (
            "The checkpoint has no DRLoc head state ('drloc_heads' in task_state): it was not saved by a DRLoc run. "
            "Resume it with --drloc-lambda 0, or start the heads fresh by loading it as --initial-checkpoint.")
        task.load_task_state(state, strict=False)  # nothing to load, nothing changed
    assert all(torch.equal(v, before[k]) for k, v in task.get_task_state()['drloc_heads'].items())


def test_ema_head_state_loads_into_the_ema_heads_once_ema_exists():
    task = make_task()
    heads = {k: torch.full_like(v, 0.5) for k, v in task.get_task_state()['drloc_heads'].items()}
    with pytest.raises(RuntimeError) as error:
        task.load_task_state({'drloc_heads': heads}, ema=True)
    assert str(error.value) == 'Cannot load EMA task state before setup_ema().'
    task.setup_ema(decay=0.5)
    task.load_task_state({'drloc_heads': heads}, ema=True)
    assert all(torch.equal(v, heads[k]) for k, v in task.get_task_state(ema=True)['drloc_heads'].items())
    assert not any(torch.equal(v, heads[k]) for k, v in task.get_task_state()['drloc_heads'].items())
