"""End-to-end train_drloc runs on generated ImageFolder data with tiny timm models on CPU."""
import copy
import io
import csv
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.utils import load_checkpoint_metadata

import timm_drloc.train as train
from timm_drloc import unwrap
from timm_drloc.errors import ConfigError, ExitCode

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


def test_a_grayscale_run_exports_the_one_channel_normalization_it_trained_with(monkeypatch, tmp_path, image_folder):
    import timm
    from timm_drloc import hub
    _run(monkeypatch, _argv(image_folder, tmp_path, 'gray', '--epochs', '1', '--drloc-lambda', '0.5', '--in-chans', '1',
                            '--input-img-mode', 'L', model='resnet10t', model_kwargs=[], img_size=64))
    out = hub.export(tmp_path / 'gray' / 'last.pth.tar', tmp_path / 'export')
    model = timm.create_model(f'local-dir:{out}', pretrained=True)
    config = timm.data.resolve_data_config({}, model=model)
    assert config['input_size'] == (1, 64, 64)
    # timm's loader normalizes one channel with the average of the pretrained config's 3-value mean / std: so must
    # the export, where plain timm reads them
    assert config['mean'] == pytest.approx([sum(IMAGENET_DEFAULT_MEAN) / 3])
    assert config['std'] == pytest.approx([sum(IMAGENET_DEFAULT_STD) / 3])

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
    original = train.checkpoints.resume_task_checkpoint

    def resume(task, path, **kwargs):
        epoch = original(task, path, **kwargs)
        captured['heads'] = {k: v.clone() for k, v in task.get_task_state()['drloc_heads'].items()}
        captured['optimizer'] = copy.deepcopy(kwargs['optimizer'].state_dict())  # training goes on in place
        captured['path'] = path
        return epoch
    monkeypatch.setattr(train.checkpoints, 'resume_task_checkpoint', resume)


def test_resume_with_other_head_settings_names_the_flags_that_differ(monkeypatch, tmp_path, image_folder):
    _run(monkeypatch, _argv(image_folder, tmp_path, 'heads', '--epochs', '1', '--drloc-lambda', '0.5',
                            '--drloc-hidden-dim', '32'))
    last = tmp_path / 'heads' / 'last.pth.tar'
    with pytest.raises(ConfigError) as error:
        _run(monkeypatch, _argv(image_folder, tmp_path, 'heads2', '--epochs', '2', '--drloc-lambda', '0.5',
                                '--drloc-hidden-dim', '16', '--drloc-mode', 'ce', '--resume', str(last)))
    message = str(error.value)
    assert message.startswith(f'--resume {last} does not fit this run (Error(s) in loading state_dict for ModuleList: ')
    assert message.endswith('; it was trained with --drloc-mode l1 (this run: ce), --drloc-hidden-dim 32 (this run: '
                            '16); use it with the flags it was trained with (see args.yaml next to it)')

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


@pytest.mark.parametrize('extra', [['--model-dtype', 'bfloat16'],
                                   ['--model-dtype', 'bfloat16', '--no-prefetcher', '--model-ema',
                                    '--model-ema-decay', '0.5']], ids=['bf16', 'bf16-ema-host-loader'])
def test_bfloat16_model_trains_with_bfloat16_heads_and_evaluates_its_ema(monkeypatch, tmp_path, image_folder, extra,
                                                                         caplog):
    caplog.set_level('INFO')
    row, checkpoint = _one_epoch(monkeypatch, tmp_path, image_folder, 'bf16', *extra)
    assert 0 <= float(row['eval_top1']) <= 100
    assert {v.dtype for v in checkpoint['task_state']['drloc_heads'].values()} == {torch.bfloat16}
    if '--model-ema' in extra:
        assert {v.dtype for v in checkpoint['state_dict_ema'].values()} == {torch.bfloat16}
        assert 'Eval (EMA): loss' in caplog.text


@pytest.mark.parametrize('extra', [[], ['--jsd-loss']], ids=['ce', 'jsd'])
def test_aug_splits_without_the_prefetcher_trains_on_both_splits(monkeypatch, tmp_path, image_folder, extra):
    sizes = []

    def recording_task(*args, **kwargs):
        task = build_task(*args, **kwargs)
        forward = task.forward
        task.forward = lambda input, target: sizes.append((input.shape[0], target.shape[0])) or forward(input, target)
        return task
    build_task = train.build_task
    monkeypatch.setattr(train, 'build_task', recording_task)
    argv = _argv(image_folder, tmp_path, 'splits', '--epochs', '1', '--drloc-lambda', '0.5', '--aug-splits', '2',
                 '--no-prefetcher', *extra)
    argv.remove('--no-aug')  # splits are augmented copies
    _run(monkeypatch, argv)
    assert sizes[0] == (16, 16)  # batch 8: the clean and the augmented split joined, the labels repeated
    row, = _summary(tmp_path / 'splits')
    assert 0 < float(row['train_loss']) < 100 and 0 < float(row['train_drloc_loss']) < 10


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

def _poison_steps(monkeypatch, bad_calls, poison=None):
    """Apply `poison(result)` to the training forwards whose 1-based call number is in `bad_calls` (default: the
    DRLoc loss becomes NaN). Returns the list of the weights each call saw, one list of tensors per call."""
    build_task = train.build_task
    seen = []

    def nan_drloc(result, task):
        result['drloc_loss'] = result['drloc_loss'] * float('nan')
        result['loss'] = result['task_loss'] + task.drloc_lambda * result['drloc_loss']

    def build(*args, **kwargs):
        task = build_task(*args, **kwargs)
        forward = task.forward

        def poisoned(input, target):
            seen.append([p.detach().clone() for p in task.get_trainable_module().parameters()])
            result = forward(input, target)
            if len(seen) in bad_calls:
                (poison or nan_drloc)(result, task)
            return result
        task.forward = poisoned
        return task
    monkeypatch.setattr(train, 'build_task', build)
    return seen


@pytest.mark.parametrize('precision', [[], ['--amp', '--amp-dtype', 'bfloat16']], ids=['fp32', 'bf16-amp'])
def test_nan_drloc_loss_stops_with_step_and_term_and_keeps_last_checkpoint(monkeypatch, tmp_path, image_folder,
                                                                          caplog, precision):
    _poison_steps(monkeypatch, {5})  # 3 batches per epoch: epoch 1, step 1
    monkeypatch.setattr('sys.argv', _argv(image_folder, tmp_path, 'nan', '--epochs', '2', '--drloc-lambda', '0.5',
                                          *precision))
    with pytest.raises(SystemExit) as exc:
        train.run()
    assert exc.value.code == ExitCode.NON_FINITE_LOSS == 3  # no loss scaler: the first NaN stops the run
    assert 'non-finite drloc_loss at epoch 1, step 1' in caplog.text
    exp = tmp_path / 'nan'
    assert [int(r['epoch']) for r in _summary(exp)] == [0]
    assert load_checkpoint_metadata(exp / 'last.pth.tar')['epoch'] == 0
    assert (exp / 'last.pth.tar').read_bytes() == (exp / 'checkpoint-0.pth.tar').read_bytes()


FP16_AMP = ('--amp', '--amp-dtype', 'float16')


def test_fp16_amp_skips_a_single_inf_step_without_an_update_and_finishes(monkeypatch, tmp_path, image_folder, caplog):
    def inf_drloc(result, task):
        result['drloc_loss'] = result['drloc_loss'] * float('inf')
        result['loss'] = result['task_loss'] + task.drloc_lambda * result['drloc_loss']
    seen = _poison_steps(monkeypatch, {2}, inf_drloc)  # epoch 0, step 1
    _run(monkeypatch, _argv(image_folder, tmp_path, 'inf', '--epochs', '2', '--drloc-lambda', '0.5', *FP16_AMP))
    assert 'non-finite drloc_loss at epoch 0, step 1 (loss=inf): step skipped, no update' in caplog.text
    assert 'Epoch 0: 1 of 3 steps skipped for a non-finite loss' in caplog.text
    # the step after the skipped one sees the weights the skipped one saw: no update in between
    assert all(torch.equal(a, b) for a, b in zip(seen[1], seen[2]))
    assert not all(torch.equal(a, b) for a, b in zip(seen[2], seen[-1]))  # the steps after it update again
    rows = _summary(tmp_path / 'inf')
    assert [int(r['epoch']) for r in rows] == [0, 1]
    assert all(0 < float(r['train_loss']) < 100 and 0 < float(r['train_drloc_loss']) < 10 for r in rows)
    checkpoint = load_checkpoint_metadata(tmp_path / 'inf' / 'last.pth.tar')
    assert checkpoint['epoch'] == 1 and 'amp_scaler' in checkpoint  # float16 on the CPU runs with a loss scaler


def test_fp16_amp_nan_in_every_step_stops_after_max_nonfinite_steps_in_a_row(monkeypatch, tmp_path, image_folder,
                                                                           caplog):
    _poison_steps(monkeypatch, set(range(4, 100)))  # from epoch 1, step 0 on
    monkeypatch.setattr('sys.argv', _argv(image_folder, tmp_path, 'nan16', '--epochs', '3', '--drloc-lambda', '0.5',
                                          *FP16_AMP, '--max-nonfinite-steps', '3'))
    with pytest.raises(SystemExit) as exc:
        train.run()
    assert exc.value.code == ExitCode.NON_FINITE_LOSS
    assert 'epoch 1, step 0 (loss=nan): step skipped' in caplog.text
    assert 'epoch 1, step 1 (loss=nan): step skipped' in caplog.text
    assert ('non-finite drloc_loss at epoch 1, step 2 (loss=nan): 3 non-finite steps in a row '
            '(--max-nonfinite-steps 3); training stopped') in caplog.text
    exp = tmp_path / 'nan16'
    assert [int(r['epoch']) for r in _summary(exp)] == [0]
    assert load_checkpoint_metadata(exp / 'last.pth.tar')['epoch'] == 0


def test_weights_that_turn_nan_with_a_finite_loss_are_never_checkpointed(monkeypatch, tmp_path, image_folder,
                                                                         caplog):
    def nan_gradients(result, task):  # the loss stays finite, its gradient does not
        result['output'].register_hook(lambda grad: torch.full_like(grad, float('nan')))
    _poison_steps(monkeypatch, {6}, nan_gradients)  # the last step of epoch 1
    monkeypatch.setattr('sys.argv', _argv(image_folder, tmp_path, 'diverged', '--epochs', '3', '--drloc-lambda',
                                          '0.5'))
    with pytest.raises(SystemExit) as exc:
        train.run()
    assert exc.value.code == ExitCode.NON_FINITE_LOSS
    assert 'the model weights became NaN / Inf in epoch 1 (at the end of the epoch)' in caplog.text
    exp = tmp_path / 'diverged'
    assert [int(r['epoch']) for r in _summary(exp)] == [0]
    checkpoint = load_checkpoint_metadata(exp / 'last.pth.tar')
    assert checkpoint['epoch'] == 0
    assert all(torch.isfinite(v).all() for v in checkpoint['state_dict'].values())


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
def test_killed_in_epoch_0_resume_auto_continues_from_the_recovery_checkpoint(monkeypatch, tmp_path, caplog,
                                                                              image_folder_factory):
    data = image_folder_factory(images_per_class=16)  # 48 images, batch 4: 12 steps per epoch
    argv = _argv(data, tmp_path, 'recover', '--epochs', '1', '--drloc-lambda', '0.5', '--resume', 'auto', '-b', '4',
                 '--recovery-interval', '2')
    proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve().parents[1] / 'train_drloc.py'), *argv[1:]],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stderr:
            if 'Train: 0 [   7/12' in line:  # recovery-0-3 and recovery-0-5 are written by now
                proc.kill()  # SIGKILL, in the first epoch: no last.pth.tar yet
                break
    finally:
        proc.kill()
        proc.wait(timeout=60)
    exp = tmp_path / 'recover'
    assert not (exp / 'last.pth.tar').exists(), 'the kill did not land in epoch 0'
    recovery = max(exp.glob('recovery-*.pth.tar'), key=lambda p: p.stat().st_mtime)
    saved = torch.load(recovery, map_location='cpu', weights_only=False)

    caplog.set_level('INFO')
    captured = {}
    _capture_resume(monkeypatch, captured)
    _run(monkeypatch, argv)
    assert captured['path'] == str(recovery)
    for key, value in saved['task_state']['drloc_heads'].items():
        assert torch.equal(captured['heads'][key], value), key
    assert 'was written inside epoch 0: running epoch 0 again' in caplog.text
    assert [int(r['epoch']) for r in _summary(exp)] == [0]
    assert load_checkpoint_metadata(exp / 'last.pth.tar')['epoch'] == 0


@pytest.mark.parametrize('drloc', [True, False], ids=['drloc', 'plain'])
def test_resume_from_a_bare_state_dict_loads_its_weights_and_starts_at_epoch_0(monkeypatch, tmp_path, image_folder,
                                                                              caplog, drloc):
    import timm
    kwargs = {k: int(v) for k, v in (kv.split('=') for kv in VIT_KWARGS)}
    torch.manual_seed(1)
    weights = timm.create_model('vit_tiny_patch16_224', num_classes=3, **kwargs).state_dict()
    path = tmp_path / 'clean.pth'
    torch.save(weights, path)  # what timm's clean_checkpoint.py writes: the state dict alone, no epoch
    seen = {}
    train_one_epoch = train.loop.train_one_epoch

    def recording_epoch(run, epoch):
        model = run.task.get_trainable_module()
        seen.setdefault(epoch, {k: v.clone() for k, v in unwrap(model).state_dict().items()})
        return train_one_epoch(run, epoch)
    monkeypatch.setattr(train.loop, 'train_one_epoch', recording_epoch)
    caplog.set_level('INFO')
    _run(monkeypatch, _argv(image_folder, tmp_path, 'bare', '--epochs', '1', '--resume', str(path),
                            *(['--drloc-lambda', '0.5'] if drloc else [])))
    assert list(seen) == [0]
    assert all(torch.equal(seen[0][k], v) for k, v in weights.items())
    assert [int(r['epoch']) for r in _summary(tmp_path / 'bare')] == [0]
    fresh_heads = 'holds model weights only (no epoch, optimizer or DRLoc heads): loaded them; training starts ' \
                  'at epoch 0 with fresh DRLoc heads'
    assert (fresh_heads in caplog.text) == drloc


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


@pytest.mark.skipif(not train.loop.has_tqdm, reason='tqdm not installed')
def test_progress_is_a_bar_on_a_terminal(monkeypatch, caplog):
    terminal = _Terminal()
    monkeypatch.setattr(sys, 'stderr', terminal)
    progress = train.loop.EpochProgress(epoch=4, total=2, log_interval=1, enabled=True)
    for step in range(2):
        progress.update(step, step == 1, {'loss': 2.5, 'lr': 0.001, 'img_s': 80.0, 'drloc': 1.25}, lambda: 'log line')
    progress.close()
    shown = terminal.getvalue()
    assert 'Train 4' in shown and '2/2' in shown and 'drloc=1.25' in shown and 'loss=2.5' in shown
    assert 'log line' not in caplog.text


def test_progress_is_log_lines_without_a_terminal(monkeypatch, caplog):
    monkeypatch.setattr(sys, 'stderr', io.StringIO())
    caplog.set_level('INFO')
    progress = train.loop.EpochProgress(epoch=0, total=3, log_interval=2, enabled=True)
    for step in range(3):
        progress.update(step, step == 2, {'loss': 1.0}, lambda step=step: f'line {step}')
    progress.close()
    assert [r.getMessage() for r in caplog.records] == ['line 0', 'line 2']


def _two_labels_per_image(monkeypatch):
    """Turn the ImageFolder class index i into the label set {i, i+1 mod 3} before the multi-label encoding."""
    real_create_dataset = train.build.create_dataset

    def create_dataset(*args, target_transform=None, **kwargs):
        dataset = real_create_dataset(*args, **kwargs)
        dataset.target_transform = lambda index: target_transform([index, (index + 1) % 3])
        return dataset
    monkeypatch.setattr(train.build, 'create_dataset', create_dataset)


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


# ---- interruptions, a reused experiment folder, a full disk, damaged images --------------------------------

TRAIN_WITH_FAKE_HUB = r'''
import sys
from pathlib import Path
import huggingface_hub

calls = Path(sys.argv[1])  # the Hub is the one thing mocked, at its HfApi boundary: every call is recorded

def recorded(name, answer):
    def method(api, *args, **kwargs):
        with calls.open('a') as f:
            f.write(name + '\n')
        return answer
    return method

huggingface_hub.HfApi.whoami = recorded('whoami', {'name': 'someone'})
huggingface_hub.HfApi.create_repo = recorded('create_repo', huggingface_hub.RepoUrl('https://huggingface.co/someone/r'))
huggingface_hub.HfApi.upload_folder = recorded('upload_folder', None)
from timm_drloc import train
sys.argv = ['train_drloc.py', *sys.argv[2:]]
train.run()
'''


def test_ctrl_c_exits_130_in_one_line_with_checkpoints_intact_and_nothing_uploaded(tmp_path, image_folder_factory):
    data = image_folder_factory()  # 24 images, batch 2: 12 steps per epoch
    calls = tmp_path / 'hub_calls.txt'
    argv = _argv(data, tmp_path, 'ctrl-c', '--epochs', '3', '--drloc-lambda', '0.5', '-b', '2',
                 '--push-to-hub', 'someone/r')[1:]
    env = dict(os.environ, HF_TOKEN='hf_not_a_real_token')
    proc = subprocess.Popen([sys.executable, '-c', TRAIN_WITH_FAKE_HUB, str(calls), *argv], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = []
    try:
        for line in proc.stderr:
            lines.append(line)
            if 'Train: 1 [   1/12' in line:
                proc.send_signal(signal.SIGINT)  # what Ctrl-C sends
                break
        out, rest = proc.communicate(timeout=120)
    finally:
        proc.kill()
    err = ''.join(lines) + rest
    assert proc.returncode == ExitCode.INTERRUPTED == 130
    last_line = err.strip().splitlines()[-1]
    assert re.search(r'interrupted at epoch 1, step \d+; continue with the same command and --resume auto$', last_line)
    assert err.count('interrupted') == 1 and 'Traceback' not in err and 'Best metric' not in err
    assert '--result' not in out
    exp = tmp_path / 'ctrl-c'
    assert load_checkpoint_metadata(exp / 'last.pth.tar')['epoch'] == 0
    assert (exp / 'last.pth.tar').read_bytes() == (exp / 'checkpoint-0.pth.tar').read_bytes()
    assert [int(r['epoch']) for r in _summary(exp)] == [0]
    assert not list(exp.glob('*tmp*'))
    assert calls.read_text().split() == ['whoami']  # the token was checked; nothing exported or uploaded
    assert not (exp / 'hub_export').exists()


def test_second_fresh_run_moves_the_first_aside_whole(monkeypatch, tmp_path, image_folder, caplog):
    common = ('--drloc-lambda', '0.5', '--checkpoint-hist', '1')
    _run(monkeypatch, _argv(image_folder, tmp_path, 'exp', '--epochs', '2', *common))
    first = {p.name: p.read_bytes() for p in (tmp_path / 'exp').iterdir()}
    _run(monkeypatch, _argv(image_folder, tmp_path, 'exp', '--epochs', '1', *common))

    moved = tmp_path / 'exp.1'
    assert {p.name: p.read_bytes() for p in moved.iterdir()} == first  # every file of the first run, unchanged
    assert [int(r['epoch']) for r in _summary(moved)] == [0, 1]
    assert [int(r['epoch']) for r in _summary(tmp_path / 'exp')] == [0]
    assert sorted(p.name for p in (tmp_path / 'exp').glob('checkpoint-*')) == ['checkpoint-0.pth.tar']
    assert (f'{tmp_path / "exp"} already held a run: it is now in {moved}, and this fresh run starts in '
            f'{tmp_path / "exp"}; to continue the earlier run instead, pass --resume auto --experiment exp.1'
            in caplog.text)


def test_full_disk_at_a_save_exits_2_saying_no_space_and_leaves_no_temporary_file(monkeypatch, tmp_path,
                                                                                   image_folder, caplog):
    exp = tmp_path / 'full'
    exp.mkdir()
    os.symlink('/dev/full', exp / 'tmp.pth.tar')  # the checkpoint's temporary file: every write hits ENOSPC
    monkeypatch.setattr('sys.argv', _argv(image_folder, tmp_path, 'full', '--epochs', '1', '--drloc-lambda', '0.5'))
    with pytest.raises(SystemExit) as exc:
        train.run()
    assert exc.value.code == 2
    assert f'no space left on the device while writing a checkpoint in {exp}' in caplog.text
    assert not os.path.lexists(exp / 'tmp.pth.tar') and not (exp / 'last.pth.tar').exists()
    assert not list(exp.glob('*tmp*'))


def _damage(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])  # a truncated download


def test_truncated_image_is_skipped_with_its_path_named(monkeypatch, tmp_path, image_folder, caplog):
    broken = image_folder / 'train' / 'class_1' / '3.png'
    _damage(broken)
    _run(monkeypatch, _argv(image_folder, tmp_path, 'skip', '--epochs', '1'))
    assert f'cannot read image {broken} (OSError: image file is truncated' in caplog.text
    assert [int(r['epoch']) for r in _summary(tmp_path / 'skip')] == [0]


def test_split_of_unreadable_images_is_refused_before_training_naming_files(monkeypatch, tmp_path, image_folder):
    for path in (image_folder / 'train').rglob('*.png'):
        _damage(path)
    monkeypatch.setattr('sys.argv', _argv(image_folder, tmp_path, 'corrupt', '--epochs', '1'))
    with pytest.raises(ValueError) as exc:
        train.main()
    message = str(exc.value)
    assert message.startswith(f'{image_folder / "train"}: none of its first 10 images can be read, e.g. '
                              f'{image_folder / "train" / "class_0" / "0.png"} (image file is truncated)')
    assert not (tmp_path / 'corrupt').exists()


def test_damaged_stretch_met_by_loader_workers_ends_in_one_line_exit_2(tmp_path, image_folder_factory):
    data = image_folder_factory(images_per_class=12)
    for path in (data / 'validation' / 'class_1').glob('*.png'):
        _damage(path)  # 12 unreadable images in a row in validation/, met by a worker process
    argv = _argv(data, tmp_path, 'stretch', '--epochs', '1', '-j', '2')[1:]
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve().parents[1] / 'train_drloc.py'), *argv],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith('ERROR: ')]  # the other worker may warn
    assert len(errors) == 1 and errors[0].endswith(
        'images in a row could not be read (each is named in a "Skipped sample" warning above): replace or '
        'remove the damaged files, then run again (with --resume to continue)')
    assert 'Traceback' not in proc.stderr
    assert f'cannot read image {data / "validation" / "class_1" / "0.png"}' in proc.stderr


def test_a_resumed_run_draws_what_a_straight_run_draws(monkeypatch, tmp_path, image_folder):
    # the checkpoint carries the random generators' states: the pairs and the shuffles continue as they were
    common = ('--epochs', '2', '--drloc-lambda', '0.5', '--seed', '5')
    _run(monkeypatch, _argv(image_folder, tmp_path, 'straight', *common))
    _run(monkeypatch, _argv(image_folder, tmp_path, 'halves', *common, '--resume', 'auto', '--stop-epoch', '1'))
    _run(monkeypatch, _argv(image_folder, tmp_path, 'halves', *common, '--resume', 'auto'))
    assert _summary(tmp_path / 'halves') == _summary(tmp_path / 'straight')
    straight = torch.load(tmp_path / 'straight' / 'last.pth.tar', map_location='cpu', weights_only=False)
    halves = torch.load(tmp_path / 'halves' / 'last.pth.tar', map_location='cpu', weights_only=False)
    for part in ('state_dict', 'optimizer'):
        flat = dict(_tensors(straight[part]))
        assert flat.keys() == dict(_tensors(halves[part])).keys()
        assert all(torch.equal(flat[k], v) for k, v in _tensors(halves[part])), part
    heads = straight['task_state']['drloc_heads']
    assert all(torch.equal(heads[k], v) for k, v in halves['task_state']['drloc_heads'].items())


def _tensors(tree, prefix=''):
    """(path, tensor) of every tensor in nested dicts / lists."""
    if torch.is_tensor(tree):
        yield prefix, tree
    elif isinstance(tree, dict):
        for key, value in tree.items():
            yield from _tensors(value, f'{prefix}.{key}')
    elif isinstance(tree, (list, tuple)):
        for i, value in enumerate(tree):
            yield from _tensors(value, f'{prefix}.{i}')
