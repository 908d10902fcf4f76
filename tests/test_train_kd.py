"""train_drloc with --kd-model-name and --drloc-lambda: DRLoc added to timm's distillation tasks, with a teacher
trained by train_drloc itself and exported with `timm-drloc export` (read back through timm's local-dir: source)."""
import math
from pathlib import Path

import pytest
import timm
import torch
from timm.utils import load_checkpoint_metadata

from conftest import write_image_folder
from test_train import _run, _summary
from timm_drloc.cli import main as cli_main
from timm_drloc.errors import ConfigError, ExitCode

pytestmark = pytest.mark.training_run  # trains: left out of the core modules' mutation run

# the student: a distilled DeiT (class + distillation tokens) with a 4x4 token grid
STUDENT = ['--model', 'deit_tiny_distilled_patch16_224', '--model-kwargs', 'img_size=32', 'patch_size=8', 'depth=1',
           'embed_dim=32', 'num_heads=2']
# the teacher: a ViT twice as wide, so that feature distillation needs its projection
TEACHER = ['--model', 'vit_tiny_patch16_224', '--model-kwargs', 'img_size=32', 'patch_size=8', 'depth=1',
           'embed_dim=64', 'num_heads=2']


def _argv(data: Path, out: Path, experiment: str, *extra: str):
    return ['train_drloc.py', '--data-dir', str(data), '--img-size', '32', '--num-classes', '3', '--device', 'cpu',
            '-j', '0', '-b', '8', '--opt', 'adamw', '--lr', '3e-3', '--warmup-epochs', '0', '--no-aug',
            '--log-interval', '1', '--seed', '3', '--output', str(out), '--experiment', experiment, *extra]


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
    """The data and a teacher trained without DRLoc and exported to timm's Hub format."""
    root = tmp_path_factory.mktemp('kd')
    data = write_image_folder(root / 'data')
    with pytest.MonkeyPatch.context() as monkeypatch:
        _run(monkeypatch, _argv(data, root, 'teacher', *TEACHER, '--epochs', '1', '--drloc-lambda', '0'))
    exported = root / 'teacher_export'
    assert cli_main(['export', str(root / 'teacher' / 'last.pth.tar'), str(exported)]) == ExitCode.OK
    return data, f'local-dir:{exported}'


def _kd(kind: str, teacher: str):
    return ['--kd-model-name', teacher, '--kd-distill-type', kind, '--drloc-lambda', '0.5']


def _weights(path: Path):
    saved = torch.load(path, map_location='cpu', weights_only=False)
    return saved['state_dict'], saved['task_state']


@pytest.mark.parametrize('kind', ['logit', 'feature', 'token'])
def test_distillation_plus_drloc_trains_logs_and_resumes_bit_for_bit(monkeypatch, tmp_path, setup, kind):
    data, teacher = setup
    straight = _argv(data, tmp_path, 'straight', *STUDENT, *_kd(kind, teacher), '--epochs', '2')
    _run(monkeypatch, straight)
    halves = _argv(data, tmp_path, 'halves', *STUDENT, *_kd(kind, teacher), '--epochs', '2', '--resume', 'auto')
    _run(monkeypatch, halves + ['--stop-epoch', '1'])
    _run(monkeypatch, halves)

    rows = _summary(tmp_path / 'straight')
    assert [int(r['epoch']) for r in rows] == [0, 1]
    assert all(float(r['drloc_lambda']) == 0.5 for r in rows)
    assert all(float(r['train_drloc_loss']) > 0 and math.isfinite(float(r['train_loss'])) for r in rows)
    assert _summary(tmp_path / 'halves') == rows  # every logged number, to the last digit

    state, task_state = _weights(tmp_path / 'straight' / 'last.pth.tar')
    resumed_state, resumed_task_state = _weights(tmp_path / 'halves' / 'last.pth.tar')
    assert 'drloc_heads' in task_state
    if kind == 'feature':
        assert 'projection' in task_state  # the base task's own state sits beside the heads
    for saved, resumed in ((state, resumed_state), *((task_state[k], resumed_task_state[k]) for k in task_state)):
        assert saved.keys() == resumed.keys()
        for key, value in saved.items():
            assert torch.equal(value, resumed[key]), key

    # the checkpoint is the plain student: timm loads it with no plugin
    student = timm.create_model('deit_tiny_distilled_patch16_224', img_size=32, patch_size=8, depth=1, embed_dim=32,
                                num_heads=2, num_classes=3, checkpoint_path=str(tmp_path / 'straight' / 'last.pth.tar'))
    for key, value in student.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_without_drloc_the_distillation_run_is_timms_own(monkeypatch, tmp_path, setup):
    data, teacher = setup
    _run(monkeypatch, _argv(data, tmp_path, 'kd', *STUDENT, '--kd-model-name', teacher, '--kd-distill-type', 'logit',
                            '--epochs', '1'))
    rows = _summary(tmp_path / 'kd')
    assert 'train_drloc_loss' not in rows[0] and 'drloc_lambda' not in rows[0]
    assert 'drloc_heads' not in load_checkpoint_metadata(tmp_path / 'kd' / 'last.pth.tar').get('task_state', {})


@pytest.mark.parametrize('extra,names', [
    (['--kd-distill-type', 'token', '--model', 'vit_tiny_patch16_224'], ['--kd-distill-type token', 'vit_tiny']),
    (['--kd-distill-type', 'logit', '--drloc-multiscale'], ['--drloc-multiscale']),
], ids=['token-without-distillation-token', 'multiscale-on-a-vit'])
def test_combinations_that_cannot_work_are_refused_before_training(monkeypatch, tmp_path, setup, extra, names):
    data, teacher = setup
    argv = _argv(data, tmp_path, 'refused', *STUDENT, '--kd-model-name', teacher, '--drloc-lambda', '0.5',
                 '--epochs', '1', *extra)
    with pytest.raises(ConfigError) as error:
        _run(monkeypatch, argv)
    assert all(name in str(error.value) for name in names), str(error.value)
    assert not (tmp_path / 'refused' / 'last.pth.tar').exists()
