"""DRLoc settings reach the head from every entry point: the command line, DRLocTask and wrap().

A head whose parameters are all zero predicts 0 for every pair (l1) or a uniform score over the offset
classes (ce), whatever its inner layout, so its loss on a k x k grid tells which settings it was built
with: l1 averages the targets themselves (|delta| in cells, divided by k with normalize, shifted by
k - 1 when signed), ce averages log(number of classes) per axis (k absolute, 2k - 1 signed).
"""
import math

import pytest
import timm
import torch

import timm_drloc.train as train
from timm_drloc import DRLocTask, wrap

K = 4  # tiny ViT at 32 px with 8 px patches: a 4 x 4 grid
VIT_KWARGS = dict(img_size=32, patch_size=8, depth=1, embed_dim=32, num_heads=2)
SAMPLES = 1024  # pairs per image: the l1 means below are within 1 % of their expectation


def zero_head_loss(mode: str, use_abs: bool, normalize: bool, k: int = K) -> float:
    """The loss of an all-zero head on a k x k grid, in expectation over uniformly drawn pairs.

    |i - p| of two uniform cells of an axis of k has mean (k^2 - 1) / (3k); i - p has mean 0, so the signed
    target i - p + k - 1 has mean k - 1.
    """
    if mode == 'ce':
        return 2 * math.log(k if use_abs else 2 * k - 1)
    mean_target = (k * k - 1) / (3 * k) if use_abs else k - 1
    return mean_target / k if normalize else mean_target


SETTINGS = {  # id: (mode, use_abs, normalize)
    'l1_abs': ('l1', True, False),
    'l1_abs_normalized': ('l1', True, True),
    'l1_signed': ('l1', False, False),
    'l1_signed_normalized': ('l1', False, True),
    'ce_abs': ('ce', True, False),
    'ce_signed': ('ce', False, False),
}


def cli_flags(mode: str, use_abs: bool, normalize: bool) -> list:
    return ['--drloc-mode', mode] + ([] if use_abs else ['--drloc-signed']) + (['--drloc-normalize'] if normalize else [])


class _TaskBuilt(Exception):
    """Raised from the first training forward of a command-line run, carrying the DRLocTask it ran."""


def task_from_command_line(monkeypatch, data, tmp_path, *flags) -> DRLocTask:
    """Run train_drloc's main() with `flags` up to its first training step and return the DRLocTask it built."""
    def first_forward(self, input, target):
        raise _TaskBuilt(self)
    monkeypatch.setattr(DRLocTask, 'forward', first_forward)
    kwargs = [f'{k}={v}' for k, v in VIT_KWARGS.items()]
    monkeypatch.setattr('sys.argv', [
        'train_drloc.py', '--data-dir', str(data), '--model', 'vit_tiny_patch16_224', '--model-kwargs', *kwargs,
        '--img-size', '32', '--num-classes', '3', '--device', 'cpu', '-j', '0', '-b', '8', '--epochs', '1',
        '--output', str(tmp_path), '--experiment', 'flags', '--drloc-lambda', '0.5', '--drloc-hidden-dim', '16',
        '--drloc-samples', str(SAMPLES), *flags])
    with pytest.raises(_TaskBuilt) as built:
        train.main()
    monkeypatch.undo()
    return built.value.args[0]


def drloc_model(entry: str, settings, request, monkeypatch, tmp_path):
    """The DRLocModel built with `settings` through `entry`: 'command_line', 'task' or 'wrap'."""
    mode, use_abs, normalize = settings
    if entry == 'command_line':
        data = request.getfixturevalue('image_folder')
        return task_from_command_line(monkeypatch, data, tmp_path, *cli_flags(*settings)).get_trainable_module()
    model = timm.create_model('vit_tiny_patch16_224', num_classes=3, **VIT_KWARGS)
    kwargs = dict(mode=mode, num_samples=SAMPLES, use_abs=use_abs, normalize=normalize, hidden_dim=16)
    if entry == 'task':
        return DRLocTask(model, drloc_lambda=0.5, verbose=False, **kwargs).get_trainable_module()
    return wrap(model, **kwargs)


@pytest.mark.parametrize('entry', [pytest.param('command_line', marks=pytest.mark.training_run), 'task', 'wrap'])
@pytest.mark.parametrize('setting', list(SETTINGS))
def test_mode_sign_and_normalization_reach_the_head(request, monkeypatch, tmp_path, entry, setting):
    drloc = drloc_model(entry, SETTINGS[setting], request, monkeypatch, tmp_path)
    with torch.no_grad():
        for p in drloc.heads.parameters():
            p.zero_()
    torch.manual_seed(0)
    drloc.train()
    _, loss = drloc(torch.randn(8, 3, 32, 32))

    assert loss.item() == pytest.approx(zero_head_loss(*SETTINGS[setting]), rel=0.03 if setting[:2] == 'l1' else 1e-6)


@pytest.mark.training_run
@pytest.mark.parametrize('signed', [False, True], ids=['absolute', 'signed'])
def test_command_line_offset_classes_in_task_state_are_k_absolute_and_2k_minus_1_signed(
        monkeypatch, tmp_path, image_folder, signed):
    flags = ['--drloc-mode', 'ce'] + (['--drloc-signed'] if signed else [])
    task = task_from_command_line(monkeypatch, image_folder, tmp_path, *flags)
    heads = task.get_task_state()['drloc_heads']
    classes = {v.shape[0] for k, v in heads.items() if k.endswith('weight')} - {16}  # minus the hidden width
    assert classes == {2 * K - 1 if signed else K}
