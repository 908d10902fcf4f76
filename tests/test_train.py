"""End-to-end train_drloc runs on generated ImageFolder data with tiny timm models on CPU."""
import copy
import io
import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from timm.utils import load_checkpoint_metadata

import timm_drloc.train as train

pytestmark = pytest.mark.training_run  # trains: left out of the core modules' mutation run

VIT_KWARGS = ['img_size=32', 'patch_size=8', 'depth=2', 'embed_dim=32', 'num_heads=2']  # 4x4 token grid


def _argv(data, out, experiment, *extra, model='vit_tiny_patch16_224', model_kwargs=VIT_KWARGS, img_size=32):
    return ['train_drloc.py', '--data-dir', str(data), '--model', model, '--model-kwargs', *model_kwargs,
            '--img-size', str(img_size), '--num-classes', '3', '--device', 'cpu', '-j', '0', '-b', '8',
            '--opt', 'adamw', '--lr', '3e-3', '--warmup-epochs', '0', '--no-aug', '--log-interval', '1',
            '--output', str(out), '--experiment', experiment, *extra]


def _run(monkeypatch, argv):
    monkeypatch.setattr('sys.argv', argv)
    train.main()


def _summary(exp_dir: Path):
    with (exp_dir / 'summary.csv').open() as f:
        return list(csv.DictReader(f))


EVAL_IN_PLAIN_TIMM = r'''
import json, sys
import timm, torch
from timm.data import create_dataset, create_loader, resolve_data_config
name, checkpoint, data, kwargs = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
model = timm.create_model(name, num_classes=3, checkpoint_path=checkpoint, **kwargs).eval()
config = resolve_data_config({'img_size': kwargs.get('img_size', 32)}, model=model)
loader = create_loader(create_dataset('', root=data, split='validation'), input_size=config['input_size'],
                       batch_size=8, mean=config['mean'], std=config['std'], crop_pct=config['crop_pct'],
                       interpolation=config['interpolation'], num_workers=0, device=torch.device('cpu'))
correct = total = 0
with torch.no_grad():
    for images, labels in loader:
        correct += (model(images).argmax(-1) == labels).sum().item()
        total += labels.numel()
print(json.dumps({'top1': 100.0 * correct / total, 'drloc_imported': 'timm_drloc' in sys.modules}))
'''


@pytest.mark.slow
def test_drloc_run_writes_timm_outputs_and_a_plain_timm_checkpoint(monkeypatch, tmp_path, image_folder):
    _run(monkeypatch, _argv(image_folder, tmp_path, 'run', '--epochs', '2', '--drloc-lambda', '0.5'))
    exp = tmp_path / 'run'
    rows = _summary(exp)
    assert list(rows[0]) == ['epoch', 'train_loss', 'train_drloc_loss', 'eval_loss', 'eval_top1', 'eval_top5', 'lr',
                             'drloc_lambda']
    assert [int(r['epoch']) for r in rows] == [0, 1]
    assert all(float(r['drloc_lambda']) == 0.5 for r in rows)
    assert all(0 < float(r['train_drloc_loss']) < 10 for r in rows)  # L1 on offsets of a 4x4 grid
    for name in ('last', 'model_best', 'checkpoint-0', 'checkpoint-1'):
        assert (exp / f'{name}.pth.tar').exists(), name
    assert yaml.safe_load((exp / 'args.yaml').read_text())['drloc_lambda'] == 0.5

    checkpoint = torch.load(exp / 'last.pth.tar', map_location='cpu', weights_only=False)
    assert not any(k.startswith(('heads.', 'model.')) for k in checkpoint['state_dict'])
    assert 'drloc_heads' in checkpoint['task_state']

    kwargs = {k: int(v) for k, v in (kv.split('=') for kv in VIT_KWARGS)}
    proc = subprocess.run(
        [sys.executable, '-c', EVAL_IN_PLAIN_TIMM, 'vit_tiny_patch16_224', str(exp / 'last.pth.tar'),
         str(image_folder), json.dumps(kwargs)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not result['drloc_imported']
    assert result['top1'] == pytest.approx(float(rows[-1]['eval_top1']))


def test_plain_run_without_drloc_has_timm_columns_and_no_task_state(monkeypatch, tmp_path, image_folder):
    pushed = {}
    monkeypatch.setattr(train, 'push_after_training', lambda args, output_dir, **kw: pushed.update(
        output_dir=output_dir, **kw) or 0)
    _run(monkeypatch, _argv(image_folder, tmp_path, 'plain', '--epochs', '1'))
    rows = _summary(tmp_path / 'plain')
    assert list(rows[0]) == ['epoch', 'train_loss', 'eval_loss', 'eval_top1', 'eval_top5', 'lr']
    checkpoint = load_checkpoint_metadata(tmp_path / 'plain' / 'last.pth.tar')
    assert 'task_state' not in checkpoint
    # the Hub push step gets the experiment folder, the class names and the training preprocessing
    assert Path(pushed['output_dir']) == tmp_path / 'plain'
    assert pushed['class_names'] == ['class_0', 'class_1', 'class_2']
    assert tuple(pushed['data_config']['input_size']) == (3, 32, 32)


def _capture_resume(monkeypatch, captured):
    original = train.resume_task_checkpoint

    def resume(task, path, **kwargs):
        epoch = original(task, path, **kwargs)
        captured['heads'] = {k: v.clone() for k, v in task.get_task_state()['drloc_heads'].items()}
        captured['optimizer'] = copy.deepcopy(kwargs['optimizer'].state_dict())  # training goes on in place
        captured['path'] = path
        return epoch
    monkeypatch.setattr(train, 'resume_task_checkpoint', resume)


@pytest.mark.slow
def test_resume_restores_heads_optimizer_and_lambda_schedule(monkeypatch, tmp_path, image_folder):
    # reference schedule: lambda ramps 0 -> 0.5 over 2 epochs, then decays to 0 at the end of epoch 4
    common = ('--epochs', '4', '--drloc-lambda', '0.5', '--drloc-warmup-epochs', '2', '--drloc-decay',
              '--resume', 'auto')
    _run(monkeypatch, _argv(image_folder, tmp_path, 'resume', *common, '--stop-epoch', '2'))
    exp = tmp_path / 'resume'
    saved = torch.load(exp / 'last.pth.tar', map_location='cpu', weights_only=False)
    assert saved['epoch'] == 1

    captured = {}
    _capture_resume(monkeypatch, captured)
    _run(monkeypatch, _argv(image_folder, tmp_path, 'resume', *common))
    assert captured['path'] == str(exp / 'last.pth.tar')
    for key, value in saved['task_state']['drloc_heads'].items():
        assert torch.equal(captured['heads'][key], value), key
    state_saved = saved['optimizer']['state']
    state_loaded = captured['optimizer']['state']
    assert state_saved.keys() == state_loaded.keys()
    assert all(torch.equal(state_loaded[i]['exp_avg'], state_saved[i]['exp_avg']) for i in state_saved)

    rows = _summary(exp)
    assert [int(r['epoch']) for r in rows] == [0, 1, 2, 3]
    assert [float(r['drloc_lambda']) for r in rows] == pytest.approx([0.0, 0.25, 0.5, 0.25])
    assert load_checkpoint_metadata(exp / 'last.pth.tar')['epoch'] == 3


def _one_epoch(monkeypatch, tmp_path, data, name, *extra, **kw):
    _run(monkeypatch, _argv(data, tmp_path, name, '--epochs', '1', '--drloc-lambda', '0.5', *extra, **kw))
    rows = _summary(tmp_path / name)
    assert len(rows) == 1
    assert float(rows[0]['train_drloc_loss']) > 0 and float(rows[0]['train_loss']) == float(rows[0]['train_loss'])
    return rows[0], load_checkpoint_metadata(tmp_path / name / 'last.pth.tar')


def test_model_ema_run_checkpoints_ema_weights_and_heads(monkeypatch, tmp_path, image_folder):
    _, checkpoint = _one_epoch(monkeypatch, tmp_path, image_folder, 'ema', '--model-ema', '--model-ema-decay', '0.5')
    assert checkpoint['state_dict_ema'].keys() == checkpoint['state_dict'].keys()
    assert 'drloc_heads' in checkpoint['task_state_ema']


@pytest.mark.slow
def test_torchcompile_run_checkpoints_plain_keys(monkeypatch, tmp_path, image_folder):
    _, checkpoint = _one_epoch(monkeypatch, tmp_path, image_folder, 'compiled', '--torchcompile', 'eager')
    assert not any('_orig_mod' in k or k.startswith('model.') for k in checkpoint['state_dict'])
    assert 'drloc_heads' in checkpoint['task_state']


@pytest.mark.slow
def test_amp_bfloat16_run(monkeypatch, tmp_path, image_folder):
    row, _ = _one_epoch(monkeypatch, tmp_path, image_folder, 'amp', '--amp', '--amp-dtype', 'bfloat16')
    assert 0 <= float(row['eval_top1']) <= 100


@pytest.mark.parametrize('mix', [['--mixup', '0.8', '--cutmix', '1.0'], ['--mixup', '0.8', '--no-prefetcher']],
                         ids=['mixup-cutmix-prefetcher', 'mixup-host'])
def test_mixup_cutmix_run(monkeypatch, tmp_path, image_folder, mix):
    row, _ = _one_epoch(monkeypatch, tmp_path, image_folder, 'mix', *mix)
    assert float(row['train_loss']) > 0


@pytest.mark.usefixtures('restore_parser_defaults')
def test_config_file_run(monkeypatch, tmp_path, image_folder):
    config = tmp_path / 'drloc.yaml'
    config.write_text('drloc_lambda: 0.25\ndrloc_mode: ce\ndrloc_samples: 16\nlr: 1e-3\nepochs: 1\n')
    _run(monkeypatch, _argv(image_folder, tmp_path, 'cfg', '-c', str(config)))
    rows = _summary(tmp_path / 'cfg')
    assert [float(r['drloc_lambda']) for r in rows] == [0.25]
    args = yaml.safe_load((tmp_path / 'cfg' / 'args.yaml').read_text())
    assert args['drloc_mode'] == 'ce' and args['drloc_samples'] == 16
    assert args['lr'] == 3e-3  # the command line wins over the config file


@pytest.mark.slow
def test_swin_multiscale_run_has_a_head_per_stage(monkeypatch, tmp_path, image_folder):
    swin = ['img_size=32', 'window_size=2', 'embed_dim=16', 'depths=(1,1,1)', 'num_heads=(1,2,4)']
    _, checkpoint = _one_epoch(monkeypatch, tmp_path, image_folder, 'swin', '--drloc-multiscale',
                               model='swin_tiny_patch4_window7_224', model_kwargs=swin)
    heads = {k.split('.')[0] for k in checkpoint['task_state']['drloc_heads']}
    assert len(heads) == 3, sorted(checkpoint['task_state']['drloc_heads'])


@pytest.mark.slow
def test_resnet_run_with_signed_cbr_targets(monkeypatch, tmp_path, image_folder_factory):
    data = image_folder_factory(size=64)  # resnet10t: 2x2 final grid at 64x64
    row, _ = _one_epoch(monkeypatch, tmp_path, data, 'resnet', '--drloc-mode', 'cbr', '--drloc-signed',
                        model='resnet10t', model_kwargs=[], img_size=64)
    assert float(row['drloc_lambda']) == 0.5


# ---- reliability: non-finite losses, killed runs, corrupt checkpoints -----------------------------------

def _nan_drloc_at_call(monkeypatch, bad_call: int):
    """Make the DRLoc loss NaN on the `bad_call`-th training forward (1-based)."""
    build_task = train._build_task
    calls = {'n': 0}

    def build(*args, **kwargs):
        task = build_task(*args, **kwargs)
        forward = task.forward

        def poisoned(input, target):
            result = forward(input, target)
            calls['n'] += 1
            if calls['n'] == bad_call:
                result['drloc_loss'] = result['drloc_loss'] * float('nan')
                result['loss'] = result['task_loss'] + task.drloc_lambda * result['drloc_loss']
            return result
        task.forward = poisoned
        return task
    monkeypatch.setattr(train, '_build_task', build)


def test_nan_drloc_loss_stops_with_step_and_term_and_keeps_last_checkpoint(monkeypatch, tmp_path, image_folder,
                                                                          caplog):
    _nan_drloc_at_call(monkeypatch, bad_call=5)  # 3 batches per epoch: epoch 1, step 1
    monkeypatch.setattr('sys.argv', _argv(image_folder, tmp_path, 'nan', '--epochs', '2', '--drloc-lambda', '0.5'))
    with pytest.raises(SystemExit) as exc:
        train.run()
    assert exc.value.code == 3
    assert 'non-finite drloc_loss at epoch 1, step 1' in caplog.text
    exp = tmp_path / 'nan'
    assert [int(r['epoch']) for r in _summary(exp)] == [0]
    assert load_checkpoint_metadata(exp / 'last.pth.tar')['epoch'] == 0
    assert (exp / 'last.pth.tar').read_bytes() == (exp / 'checkpoint-0.pth.tar').read_bytes()


@pytest.mark.slow
def test_killed_mid_epoch_then_resume_auto_finishes_each_epoch_once(monkeypatch, tmp_path, image_folder_factory):
    data = image_folder_factory(images_per_class=16)  # 48 images, batch 4: 12 steps per epoch
    argv = _argv(data, tmp_path, 'killed', '--epochs', '3', '--drloc-lambda', '0.5', '--resume', 'auto', '-b', '4')
    proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve().parents[1] / 'train_drloc.py'), *argv[1:]],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stderr:
            if 'Train: 1 [   3/12' in line:
                proc.kill()  # SIGKILL, mid-way through epoch 1
                break
    finally:
        proc.kill()
        proc.wait(timeout=60)
    exp = tmp_path / 'killed'
    saved = torch.load(exp / 'last.pth.tar', map_location='cpu', weights_only=False)
    assert saved['epoch'] == 0, 'the kill did not land in epoch 1'
    assert [int(r['epoch']) for r in _summary(exp)] == [0]

    captured = {}
    _capture_resume(monkeypatch, captured)
    _run(monkeypatch, argv)
    for key, value in saved['task_state']['drloc_heads'].items():
        assert torch.equal(captured['heads'][key], value), key
    assert all(torch.equal(captured['optimizer']['state'][i]['exp_avg'], s['exp_avg'])
               for i, s in saved['optimizer']['state'].items())
    assert [int(r['epoch']) for r in _summary(exp)] == [0, 1, 2]
    assert not list(exp.glob('*.tmp')) and not (exp / 'tmp.pth.tar').exists()


@pytest.mark.slow
def test_resume_auto_skips_a_corrupt_last_checkpoint(monkeypatch, tmp_path, image_folder, caplog):
    common = ('--epochs', '3', '--drloc-lambda', '0.5', '--resume', 'auto')
    _run(monkeypatch, _argv(image_folder, tmp_path, 'corrupt', *common, '--stop-epoch', '2'))
    exp = tmp_path / 'corrupt'
    last = exp / 'last.pth.tar'
    good = last.read_bytes()
    last.unlink()  # a new, truncated file: checkpoint-1 (a link to the old one) stays good
    last.write_bytes(good[:len(good) // 2])

    captured = {}
    _capture_resume(monkeypatch, captured)
    _run(monkeypatch, _argv(image_folder, tmp_path, 'corrupt', *common))
    assert f'{last} is unreadable' in caplog.text
    assert captured['path'] == str(exp / 'checkpoint-1.pth.tar')
    assert [int(r['epoch']) for r in _summary(exp)] == [0, 1, 2]
    assert load_checkpoint_metadata(last)['epoch'] == 2


class _Terminal(io.StringIO):
    def isatty(self):
        return True


@pytest.mark.skipif(not train.has_tqdm, reason='tqdm not installed')
def test_progress_is_a_bar_on_a_terminal(monkeypatch, caplog):
    terminal = _Terminal()
    monkeypatch.setattr(sys, 'stderr', terminal)
    progress = train.EpochProgress(epoch=4, total=2, log_interval=1, enabled=True)
    for step in range(2):
        progress.update(step, step == 1, {'loss': 2.5, 'lr': 0.001, 'img_s': 80.0, 'drloc': 1.25}, lambda: 'log line')
    progress.close()
    shown = terminal.getvalue()
    assert 'Train 4' in shown and '2/2' in shown and 'drloc=1.25' in shown and 'loss=2.5' in shown
    assert 'log line' not in caplog.text


def test_progress_is_log_lines_without_a_terminal(monkeypatch, caplog):
    monkeypatch.setattr(sys, 'stderr', io.StringIO())
    caplog.set_level('INFO')
    progress = train.EpochProgress(epoch=0, total=3, log_interval=2, enabled=True)
    for step in range(3):
        progress.update(step, step == 2, {'loss': 1.0}, lambda step=step: f'line {step}')
    progress.close()
    assert [r.getMessage() for r in caplog.records] == ['line 0', 'line 2']


def _two_labels_per_image(monkeypatch):
    """Turn the ImageFolder class index i into the label set {i, i+1 mod 3} before the multi-label encoding."""
    real_create_dataset = train.create_dataset

    def create_dataset(*args, target_transform=None, **kwargs):
        dataset = real_create_dataset(*args, **kwargs)
        dataset.target_transform = lambda index: target_transform([index, (index + 1) % 3])
        return dataset
    monkeypatch.setattr(train, 'create_dataset', create_dataset)


@pytest.mark.parametrize('drloc', [False, True], ids=['plain', 'drloc'])
def test_multilabel_run_reports_map_and_f1_instead_of_top1(monkeypatch, tmp_path, image_folder, drloc):
    _two_labels_per_image(monkeypatch)
    extra = ['--drloc-lambda', '0.5'] if drloc else []
    _run(monkeypatch, _argv(image_folder, tmp_path, 'ml', '--task', 'multilabel', '--epochs', '1', *extra))
    row = _summary(tmp_path / 'ml')[0]
    for name in ('map', 'micro_f1', 'macro_f1', 'sample_f1'):
        assert 0.0 <= float(row[f'eval_{name}']) <= 100.0
    assert 'eval_top1' not in row
    assert ('train_drloc_loss' in row) == drloc
    assert (tmp_path / 'ml' / 'model_best.pth.tar').is_file()
