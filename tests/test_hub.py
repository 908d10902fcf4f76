"""Hub export and upload: folders that plain timm loads, model cards, uploads and refused inputs.

A tiny ViT (img_size 32, depth 2 via --model-kwargs, 3 classes) is trained for two steps with DRLocTask and saved by timm's own
CheckpointSaver, so the checkpoints have what a real run writes: an argparse.Namespace 'args', the DRLoc
heads in 'task_state', EMA weights and a summary.csv.
"""
import argparse
import hashlib
import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import huggingface_hub
import pytest
import safetensors.torch
import timm
import torch
from timm.utils import CheckpointSaver, update_summary

import timm_drloc
from timm_drloc import card, hub
from timm_drloc.train import publish
from timm_drloc.errors import ExitCode

pytestmark = pytest.mark.training_run  # trains: left out of the core modules' mutation run

MEAN = (0.25, 0.5, 0.75)
STD = (0.2, 0.3, 0.4)
CLASSES = ['cat', 'dog', 'frog']


def training_args(**overrides) -> argparse.Namespace:
    values = dict(
        model='vit_tiny_patch16_224', num_classes=3, model_kwargs={'depth': 2}, img_size=32, input_size=None,
        in_chans=None, mean=list(MEAN), std=list(STD), crop_pct=1.0, interpolation='bilinear', gp=None,
        dataset='torch/cifar10', data_dir='/home/someone/private/data', epochs=2, opt='adamw', lr=1e-3,
        sched='cosine', batch_size=4, weight_decay=0.05, model_ema=True, drloc_lambda=0.5, drloc_mode='l1',
        drloc_samples=16, drloc_warmup_epochs=1, drloc_decay=True, drloc_normalize=False,
        push_to_hub=None, hub_private=False, hub_model='best', rank=0)
    values.update(overrides)
    return argparse.Namespace(**values)


def train_and_save(run_dir: Path, args: argparse.Namespace, model_kwargs=None) -> torch.nn.Module:
    """Two DRLoc training steps, then checkpoints and summary.csv as timm's train.py writes them."""
    torch.manual_seed(0)
    kwargs = dict(model_kwargs if model_kwargs is not None else dict(args.model_kwargs, img_size=args.img_size))
    model = timm.create_model(args.model, num_classes=3, **kwargs)
    task = timm_drloc.DRLocTask(model, drloc_lambda=0.5, num_samples=16, hidden_dim=32, verbose=False,
                                input_size=(3, args.img_size, args.img_size))
    task.setup_ema(decay=0.5)
    optimizer = torch.optim.SGD(task.get_trainable_module().parameters(), lr=0.1)
    saver = CheckpointSaver(model=task.get_trainable_module(), optimizer=optimizer, args=args, task=task,
                            checkpoint_dir=str(run_dir), recovery_dir=str(run_dir), decreasing=False)
    for epoch, top1 in enumerate((40.0, 55.0)):
        task.train()
        result = task(torch.randn(4, 3, args.img_size, args.img_size), torch.tensor([0, 1, 2, 0]))
        optimizer.zero_grad()
        result['loss'].backward()
        optimizer.step()
        task.update_ema(step=epoch + 2)  # timm's first EMA updates copy the model: past them, EMA != model
        update_summary(epoch, {'loss': result['loss'].item()}, {'loss': 1.0, 'top1': top1, 'top5': 100.0},
                       str(run_dir / 'summary.csv'), write_header=epoch == 0)
        saver.save_checkpoint(epoch, metric=top1)
    return task


@pytest.fixture(scope='module')
def run(tmp_path_factory):
    """An experiment folder of a finished DRLoc run, and the trained model's logits on a fixed input."""
    run_dir = tmp_path_factory.mktemp('run')
    task = train_and_save(run_dir, training_args())
    model = task.get_eval_model().eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(x)
    torch.save({'x': x, 'logits': logits}, run_dir / 'reference.pt')
    return argparse.Namespace(dir=run_dir, task=task, model=model, x=x, logits=logits)


def load_in_plain_timm(folder: Path, input_path: Path) -> dict:
    """Build `local-dir:folder` in a fresh python with only timm imported; its logits and data config."""
    script = textwrap.dedent(f"""
        import json, sys, torch, timm
        model = timm.create_model('local-dir:{folder}', pretrained=True).eval()
        x = torch.load('{input_path}', weights_only=True)['x']
        with torch.no_grad():
            logits = model(x)
        cfg = timm.data.resolve_data_config({{}}, model=model)
        print(json.dumps(dict(
            logits=logits.tolist(), input_size=list(cfg['input_size']), mean=list(cfg['mean']),
            std=list(cfg['std']), crop_pct=cfg['crop_pct'], interpolation=cfg['interpolation'],
            drloc_imported=any(m.startswith('timm_drloc') for m in sys.modules))))
    """)
    out = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True, timeout=300,
                         cwd=str(folder.parent))
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow
def test_exported_checkpoint_loads_in_plain_timm_with_same_logits_and_training_preprocessing(run, tmp_path):
    out = hub.export(run.dir / 'model_best.pth.tar', tmp_path / 'export', label_names=CLASSES)
    loaded = load_in_plain_timm(out, run.dir / 'reference.pt')

    assert loaded['drloc_imported'] is False
    torch.testing.assert_close(torch.tensor(loaded['logits']), run.logits, rtol=1e-5, atol=1e-5)
    assert loaded['input_size'] == [3, 32, 32]
    assert loaded['mean'] == pytest.approx(MEAN)
    assert loaded['std'] == pytest.approx(STD)
    assert loaded['crop_pct'] == 1.0
    assert loaded['interpolation'] == 'bilinear'


def test_config_json_names_architecture_classes_and_label_names(run, tmp_path):
    out = hub.export(run.dir / 'last.pth.tar', tmp_path / 'export', label_names=CLASSES)
    config = json.loads((out / 'config.json').read_text())

    assert config['architecture'] == 'vit_tiny_patch16_224'
    assert config['num_classes'] == 3
    assert config['label_names'] == CLASSES
    assert config['pretrained_cfg']['input_size'] == [3, 32, 32]
    assert config['model_args']['depth'] == 2  # the run's --model-kwargs, so timm rebuilds the same model
    assert config['pretrained_cfg']['mean'] == pytest.approx(MEAN)


def test_safetensors_hold_the_backbone_weights_and_no_drloc_head_tensors(run, tmp_path):
    out = hub.export(run.dir / 'model_best.pth.tar', tmp_path / 'export')
    tensors = safetensors.torch.load_file(str(out / 'model.safetensors'))

    assert not [k for k in tensors if 'drloc' in k or k.startswith(('heads.', 'model.'))]
    assert set(tensors) == set(run.model.state_dict())
    assert sorted(p.name for p in out.iterdir()) == ['README.md', 'config.json', 'model.safetensors']


def test_model_card_has_timm_front_matter_drloc_recipe_results_and_citation(run, tmp_path):
    out = hub.export(run.dir / 'last.pth.tar', tmp_path / 'export')
    card = (out / 'README.md').read_text()
    front_matter = card.split('---')[1]

    assert 'library_name: timm' in front_matter
    for tag in ('- drloc', '- image-classification', '- timm'):
        assert tag in front_matter
    assert 'license: apache-2.0' in front_matter
    assert '- cifar10' in front_matter
    assert '**Epochs:** 2' in card or 'Epochs: 2' in card
    assert 'DRLoc lambda: 0.5' in card
    assert 'DRLoc mode: l1' in card
    assert 'DRLoc samples per image: 16' in card
    assert 'warm-up from 0 over 1 epochs, then linear decay' in card
    assert 'Top-1 (final epoch 1): 55.00 %' in card
    assert 'Top-5 (final epoch 1): 100.00 %' in card
    assert 'Efficient Training of Visual Transformers with Small Datasets' in card
    assert 'NeurIPS' in card
    assert '/home/someone' not in card


def test_best_checkpoint_card_reports_its_own_epoch_when_it_is_not_the_last(tmp_path):
    rows = [{'epoch': '0', 'eval_top1': '70.0', 'eval_top5': '99.0'},
            {'epoch': '1', 'eval_top1': '60.0', 'eval_top5': '98.0'}]
    recipe = card.training_recipe({'epochs': 2}, rows, epoch=0)

    assert recipe['Top-1 (final epoch 1)'] == '60.00 %'
    assert recipe['Top-1 (exported checkpoint, epoch 0)'] == '70.00 %'


def test_ema_export_writes_the_ema_weights(run, tmp_path):
    out = hub.export(run.dir / 'last.pth.tar', tmp_path / 'export', use_ema=True)
    tensors = safetensors.torch.load_file(str(out / 'model.safetensors'))
    ema_state = torch.load(run.dir / 'last.pth.tar', weights_only=False)['state_dict_ema']

    torch.testing.assert_close(tensors['head.weight'], ema_state['head.weight'])


def test_export_of_a_drloc_task_or_model_object_matches_the_backbone(run, tmp_path):
    from_task = hub.export(run.task, tmp_path / 'task', data_config={'mean': MEAN, 'std': STD})
    from_drloc_model = hub.export(run.task.get_trainable_module(), tmp_path / 'drloc_model')

    for folder in (from_task, from_drloc_model):
        tensors = safetensors.torch.load_file(str(folder / 'model.safetensors'))
        assert set(tensors) == set(run.model.state_dict())
        torch.testing.assert_close(tensors['head.weight'], run.model.state_dict()['head.weight'])
    config = json.loads((from_task / 'config.json').read_text())
    assert config['pretrained_cfg']['mean'] == pytest.approx(MEAN)


@pytest.mark.parametrize('model_name, build_kwargs, size', [
    ('resnet10t', {}, 64),  # ResNets take no img_size argument
    ('vit_tiny_patch16_224', {'depth': 1, 'dynamic_img_size': True}, 32),  # built at 224, trained at 32
], ids=['cnn_without_img_size_argument', 'vit_built_at_default_size_trained_at_another'])
def test_checkpoint_rebuilds_at_its_training_size_with_same_logits(tmp_path, model_name, build_kwargs, size):
    run_dir = tmp_path / 'run'
    run_dir.mkdir()
    args = training_args(model=model_name, img_size=size, model_kwargs=build_kwargs, mean=None, std=None,
                         model_ema=False)
    task = train_and_save(run_dir, args, model_kwargs=build_kwargs)
    out = hub.export(run_dir / 'last.pth.tar', tmp_path / 'export')
    model = timm.create_model(f'local-dir:{out}', pretrained=True).eval()
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        expected = task.get_eval_model().eval()(x)

    torch.testing.assert_close(model(x), expected)
    assert timm.data.resolve_data_config({}, model=model)['input_size'] == (3, size, size)


def test_export_with_model_kwargs_naming_the_class_count_builds_that_model(run, tmp_path):
    out = hub.export(run.dir / 'last.pth.tar', tmp_path / 'export', model_kwargs={'num_classes': len(CLASSES)})
    model = timm.create_model(f'local-dir:{out}', pretrained=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(run.x), run.model(run.x))
    with pytest.raises(ValueError, match='size mismatch for head.weight'):  # the weights name 3 classes, not 5
        hub.export(run.dir / 'last.pth.tar', tmp_path / 'export5', model_kwargs={'num_classes': 5})

def test_a_model_whose_blocks_share_a_module_exports_and_loads_with_the_same_logits(tmp_path):
    torch.manual_seed(0)
    model = timm.create_model('coat_lite_tiny', num_classes=3, img_size=64).eval()
    assert model.cpe1 is model.serial_blocks1[0].cpe  # CoaT: the blocks of a stage share their positional conv
    out = hub.export(model, tmp_path / 'export')  # safetensors refuses tensors that share memory
    loaded = timm.create_model(f'local-dir:{out}', pretrained=True).eval()
    assert loaded.cpe1.proj.weight is loaded.serial_blocks1[0].cpe.proj.weight
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
    assert model.cpe1 is model.serial_blocks1[0].cpe  # the model exported is left as it was

def test_export_into_non_empty_folder_needs_overwrite(run, tmp_path):
    out = tmp_path / 'export'
    out.mkdir()
    (out / 'notes.txt').write_text('mine')

    with pytest.raises(FileExistsError, match=r"(?s)'.*export' is not empty.*overwrite=True \(--overwrite\)"):
        hub.export(run.dir / 'last.pth.tar', out)
    assert [p.name for p in out.iterdir()] == ['notes.txt']
    hub.export(run.dir / 'last.pth.tar', out, overwrite=True)
    assert (out / 'model.safetensors').is_file() and (out / 'notes.txt').read_text() == 'mine'


@pytest.mark.parametrize('damage', ['truncated', 'garbage', 'empty'])
def test_corrupt_checkpoint_is_a_value_error_naming_the_file(run, tmp_path, damage):
    bad = tmp_path / f'{damage}.pth.tar'
    data = (run.dir / 'last.pth.tar').read_bytes()
    bad.write_bytes({'truncated': data[:len(data) // 2], 'garbage': os.urandom(4096), 'empty': b''}[damage])

    with pytest.raises(ValueError, match=rf"'{bad}' is truncated or corrupt"):
        hub.export(bad, tmp_path / 'export')
    assert not (tmp_path / 'export').exists()


class RunsCode:
    """Unpickling this calls os.system: what a malicious checkpoint would carry."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f'touch {self.marker}',)


def test_checkpoint_whose_pickle_would_run_code_is_refused_and_nothing_runs(run, tmp_path):
    marker = tmp_path / 'code_ran'
    crafted = tmp_path / 'crafted.pth.tar'
    state = torch.load(run.dir / 'last.pth.tar', weights_only=False)
    state['args'] = RunsCode(marker)
    torch.save(state, crafted)

    with pytest.raises(ValueError, match=rf"Refusing to load checkpoint '{crafted}'.*could run code"):
        hub.export(crafted, tmp_path / 'export')
    assert not marker.exists()


def test_missing_checkpoint_and_unknown_model_name_the_value(run, tmp_path):
    with pytest.raises(FileNotFoundError, match='nope.pth.tar'):
        hub.export(tmp_path / 'nope.pth.tar', tmp_path / 'export')
    with pytest.raises(ValueError, match="unknown model 'not_a_model'"):
        hub.export(run.dir / 'last.pth.tar', tmp_path / 'export', model_name='not_a_model')
    with pytest.raises(ValueError, match=r"timm.create_model\('resnet18'.*unexpected keyword argument 'depth'"):
        hub.export(run.dir / 'last.pth.tar', tmp_path / 'export', model_name='resnet18')
    with pytest.raises(ValueError, match=r"(?s)weights in '.*last.pth.tar' do not fit vit_tiny_patch16_224.*head"):
        hub.export(run.dir / 'last.pth.tar', tmp_path / 'export', num_classes=5)
    with pytest.raises(ValueError, match='2 label names for a model with 3 classes'):
        hub.export(run.dir / 'last.pth.tar', tmp_path / 'export', label_names=['a', 'b'])


def test_export_command_writes_folder_and_reports_errors_with_exit_codes(run, tmp_path, capsys):
    out = tmp_path / 'export'
    assert hub.export_main([str(run.dir / 'model_best.pth.tar'), str(out), '--label-names', *CLASSES]) == 0
    assert json.loads((out / 'config.json').read_text())['label_names'] == CLASSES

    assert hub.export_main([str(run.dir / 'model_best.pth.tar'), str(out)]) == 2
    assert '--overwrite' in capsys.readouterr().err
    assert hub.export_main([str(run.dir / 'model_best.pth.tar'), str(out), '--overwrite', '--ema']) == 0


class FakeHub:
    """huggingface_hub.HfApi's create_repo / upload_folder, recording what they were given."""

    def __init__(self, fail: bool = False):
        self.fail = fail
        self.calls = []

    def install(self, monkeypatch):
        fake = self

        def create_repo(api, repo_id, *, private=False, exist_ok=False, **kwargs):
            fake.calls.append(('create_repo', dict(repo_id=repo_id, private=private, exist_ok=exist_ok)))
            if fake.fail:
                raise huggingface_hub.errors.HfHubHTTPError('503 Service Unavailable')
            return huggingface_hub.RepoUrl(f'https://huggingface.co/{repo_id}')

        def upload_folder(api, *, repo_id, folder_path, **kwargs):
            files = sorted(p.name for p in Path(folder_path).iterdir())
            fake.calls.append(('upload_folder', dict(repo_id=repo_id, folder_path=folder_path, files=files, **kwargs)))
            return None

        monkeypatch.setattr(huggingface_hub.HfApi, 'create_repo', create_repo)
        monkeypatch.setattr(huggingface_hub.HfApi, 'upload_folder', upload_folder)
        return self


def test_push_to_hub_uploads_the_export_folder_to_the_repo_with_private_flag(run, tmp_path, monkeypatch):
    fake = FakeHub().install(monkeypatch)
    folder = hub.export(run.dir / 'last.pth.tar', tmp_path / 'export')

    url = hub.push_to_hub(folder, 'someone/drloc-vit', private=True)

    assert url == 'https://huggingface.co/someone/drloc-vit'
    (_, create), (_, upload) = fake.calls
    assert create == dict(repo_id='someone/drloc-vit', private=True, exist_ok=True)
    assert upload['repo_id'] == 'someone/drloc-vit'
    assert Path(upload['folder_path']) == folder
    assert {'config.json', 'model.safetensors', 'README.md'} <= set(upload['files'])


def test_push_to_hub_of_a_model_exports_it_first(run, monkeypatch):
    fake = FakeHub().install(monkeypatch)
    hub.push_to_hub(run.task, 'someone/drloc-vit')

    (_, create), (_, upload) = fake.calls
    assert create['private'] is False
    assert upload['files'] == ['README.md', 'config.json', 'model.safetensors']


def no_token_anywhere(monkeypatch, tmp_path):
    for name in ('HF_TOKEN', 'HUGGING_FACE_HUB_TOKEN', 'HF_OIDC_RESOURCE'):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, 'HF_TOKEN_PATH', str(tmp_path / 'no_token_file'))


def test_push_without_token_refuses_to_start_training(monkeypatch, tmp_path):
    no_token_anywhere(monkeypatch, tmp_path)

    with pytest.raises(ValueError, match=r'--push-to-hub someone/repo needs a Hugging Face token.*HF_TOKEN'):
        publish.check_push_args(training_args(push_to_hub='someone/repo'))


def test_push_args_checks_pass_with_token_and_catch_bad_settings(monkeypatch):
    monkeypatch.setenv('HF_TOKEN', 'hf_test_secret_value')
    args = training_args(push_to_hub='someone/repo')
    publish.check_push_args(args)
    publish.check_push_args(training_args(push_to_hub=None))  # no push: nothing to check

    assert 'hf_test_secret_value' not in repr(vars(args))
    with pytest.raises(ValueError, match="--hub-model 'newest' is not one of best, last, ema"):
        publish.check_push_args(training_args(push_to_hub='someone/repo', hub_model='newest'))
    with pytest.raises(ValueError, match='--hub-model ema needs EMA weights: add --model-ema'):
        publish.check_push_args(training_args(push_to_hub='someone/repo', hub_model='ema', model_ema=False))
    with pytest.raises(ValueError, match="'some one/repo' is not a Hub repo id"):
        publish.check_push_args(training_args(push_to_hub='some one/repo'))


def test_push_after_training_uploads_best_model_and_keeps_no_token(run, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv('HF_TOKEN', 'hf_test_secret_value')
    fake = FakeHub().install(monkeypatch)
    run_dir = tmp_path / 'run'
    run_dir.mkdir()
    for name in ('model_best.pth.tar', 'last.pth.tar', 'summary.csv'):
        (run_dir / name).write_bytes((run.dir / name).read_bytes())
    args = training_args(push_to_hub='someone/drloc-vit', hub_private=True, hub_model='best')

    with caplog.at_level(logging.INFO):
        code = publish.push_after_training(args, run_dir, data_config=None, class_names=CLASSES)

    assert code == 0
    (_, create), (_, upload) = fake.calls
    assert create['private'] is True
    assert Path(upload['folder_path']) == run_dir / 'hub_export'
    card = (run_dir / 'hub_export' / 'README.md').read_text()
    assert "hf-hub:someone/drloc-vit" in card
    assert 'hf_test_secret_value' not in card + caplog.text
    assert 'hf_test_secret_value' not in (run_dir / 'hub_export' / 'config.json').read_text()


def test_upload_failure_keeps_export_and_checkpoints_and_returns_nonzero(run, tmp_path, monkeypatch, caplog):
    FakeHub(fail=True).install(monkeypatch)
    run_dir = tmp_path / 'run'
    run_dir.mkdir()
    for name in ('model_best.pth.tar', 'last.pth.tar', 'summary.csv'):
        (run_dir / name).write_bytes((run.dir / name).read_bytes())
    digests = {p.name: file_digest(p) for p in run_dir.glob('*.pth.tar')}
    args = training_args(push_to_hub='someone/drloc-vit', hub_model='last')

    with caplog.at_level(logging.ERROR):
        code = publish.push_after_training(args, run_dir, data_config=None)

    assert code == ExitCode.UPLOAD_FAILED == 4
    folder = run_dir / 'hub_export'
    assert {'config.json', 'model.safetensors', 'README.md'} <= {p.name for p in folder.iterdir()}
    assert str(folder) in caplog.text and 'someone/drloc-vit' in caplog.text
    assert digests == {p.name: file_digest(p) for p in run_dir.glob('*.pth.tar')}


def test_push_after_training_does_nothing_off_rank_zero_or_without_push(run, tmp_path, monkeypatch):
    fake = FakeHub().install(monkeypatch)

    assert publish.push_after_training(training_args(push_to_hub='someone/repo', rank=1), tmp_path) == 0
    assert publish.push_after_training(training_args(push_to_hub=None), tmp_path) == 0
    assert fake.calls == [] and list(tmp_path.iterdir()) == []


def test_export_command_push_needs_token_then_uploads(run, tmp_path, monkeypatch, capsys):
    fake = FakeHub().install(monkeypatch)
    no_token_anywhere(monkeypatch, tmp_path)
    checkpoint, out = str(run.dir / 'last.pth.tar'), tmp_path / 'export'

    assert hub.export_main([checkpoint, str(out), '--push-to-hub', 'someone/repo']) == 2
    assert 'needs a Hugging Face token' in capsys.readouterr().err and not out.exists()
    monkeypatch.setenv('HF_TOKEN', 'hf_test_secret_value')
    assert hub.export_main([checkpoint, str(out), '--push-to-hub', 'someone/repo', '--hub-private']) == 0
    (_, create), (_, upload) = fake.calls
    assert create['private'] is True and Path(upload['folder_path']) == out
    assert 'hf_test_secret_value' not in capsys.readouterr().out


def test_push_flags_parse_with_defaults_and_no_token_flag():
    parser = argparse.ArgumentParser()
    publish.add_push_args(parser)

    assert vars(parser.parse_args([])) == dict(push_to_hub=None, hub_private=False, hub_model='best')
    args = parser.parse_args(['--push-to-hub', 'someone/repo', '--hub-private', '--hub-model', 'ema'])
    assert (args.push_to_hub, args.hub_private, args.hub_model) == ('someone/repo', True, 'ema')
    with pytest.raises(SystemExit):
        parser.parse_args(['--hub-token', 'hf_x'])


def test_bare_drloc_model_state_dict_exports_backbone_without_heads(run, tmp_path):
    saved = tmp_path / 'drloc_model.pth'
    torch.save(run.task.get_trainable_module().state_dict(), saved)  # 'model.*' and 'heads.*' keys

    out = hub.export(saved, tmp_path / 'export', model_name='vit_tiny_patch16_224', num_classes=3,
                     model_kwargs={'depth': 2, 'img_size': 32})
    tensors = safetensors.torch.load_file(str(out / 'model.safetensors'))
    assert set(tensors) == set(run.model.state_dict())
    torch.testing.assert_close(tensors['head.weight'], run.model.state_dict()['head.weight'])


def hub_answers_whoami(monkeypatch, status: int = 200):
    """HfApi.whoami as the Hub answers it: the account for a valid token, HfHubHTTPError for a rejected one."""
    from types import SimpleNamespace

    def whoami(api, *args, **kwargs):
        if status != 200:  # the response the Hub client attaches (status, headers, request)
            response = SimpleNamespace(status_code=status, headers={}, request=None)
            raise huggingface_hub.errors.HfHubHTTPError('Invalid user token.', response=response)
        return {'name': 'someone'}
    monkeypatch.setattr(huggingface_hub.HfApi, 'whoami', whoami)


def test_token_the_hub_rejects_refuses_to_start_training(monkeypatch):
    monkeypatch.setenv('HF_TOKEN', 'hf_test_secret_value')
    hub_answers_whoami(monkeypatch, status=401)

    with pytest.raises(ValueError, match=r'--push-to-hub someone/repo: the Hub rejects the Hugging Face token '
                                         r'\(401 Unauthorized.*Training was not started') as exc:
        publish.check_push_args(training_args(push_to_hub='someone/repo'))
    assert 'hf_test_secret_value' not in str(exc.value)


def test_token_checked_offline_is_reported_unverified_and_training_goes_on(monkeypatch, caplog):
    monkeypatch.setenv('HF_TOKEN', 'hf_test_secret_value')  # whoami: no network (conftest)

    with caplog.at_level(logging.WARNING):
        publish.check_push_args(training_args(push_to_hub='someone/repo'))
    assert '--push-to-hub someone/repo: the Hugging Face token could not be verified now' in caplog.text
    assert 'hf_test_secret_value' not in caplog.text
    hub_answers_whoami(monkeypatch)
    caplog.clear()
    publish.check_push_args(training_args(push_to_hub='someone/repo'))
    assert 'could not be verified' not in caplog.text


def test_card_states_the_lambda_reached_when_the_warmup_outlasts_the_run():
    args = {'epochs': 4, 'drloc_lambda': 0.5, 'drloc_warmup_epochs': 10, 'drloc_decay': False}
    rows = [{'epoch': str(e), 'drloc_lambda': str(0.5 * e / 10)} for e in range(4)]  # 0 .. 0.15

    recipe = card.training_recipe(args, rows)
    assert recipe['DRLoc lambda'] == 0.5
    assert recipe['DRLoc lambda reached'] == '0.15 (the warm-up never reached 0.5)'
    reached_rows = [{'epoch': str(e), 'drloc_lambda': '0.5'} for e in range(4)]
    assert 'DRLoc lambda reached' not in card.training_recipe(args, reached_rows)
