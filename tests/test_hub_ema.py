"""Hub export writes the weights asked for: the EMA weights (which differ from the model's) with --ema /
--hub-model ema, and a classifier of the checkpoint's own size when no class count is given."""
import argparse

import pytest
import safetensors.torch
import timm
import torch

from test_hub import FakeHub, train_and_save, training_args
from timm_drloc import hub
from timm_drloc.train import publish

pytestmark = pytest.mark.training_run  # trains: left out of the core modules' mutation run


@pytest.fixture(scope='module')
def ema_run(tmp_path_factory):
    """A finished DRLoc run with EMA: its folder, task and a fixed input."""
    run_dir = tmp_path_factory.mktemp('ema_run')
    task = train_and_save(run_dir, training_args())
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    return argparse.Namespace(dir=run_dir, task=task, x=x)


def checkpoint(run, name='last.pth.tar') -> dict:
    return torch.load(run.dir / name, map_location='cpu', weights_only=False)


def exported_weights(folder) -> dict:
    return safetensors.torch.load_file(str(folder / 'model.safetensors'))


def assert_same_weights(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(actual[key], value), key


def test_the_runs_ema_weights_differ_from_its_model_weights(ema_run):
    saved = checkpoint(ema_run)
    assert any(not torch.equal(v, saved['state_dict_ema'][k]) for k, v in saved['state_dict'].items())


@pytest.mark.parametrize('use_ema', [True, False], ids=['ema', 'model'])
def test_export_of_a_checkpoint_writes_the_ema_weights_only_when_asked(ema_run, tmp_path, use_ema):
    saved = checkpoint(ema_run)
    out = hub.export(ema_run.dir / 'last.pth.tar', tmp_path / 'export', use_ema=use_ema)

    assert_same_weights(exported_weights(out), saved['state_dict_ema' if use_ema else 'state_dict'])
    model = timm.create_model(f'local-dir:{out}', pretrained=True).eval()
    expected = ema_run.task.get_eval_model(ema=use_ema).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(ema_run.x), expected(ema_run.x))


def test_export_of_a_task_with_use_ema_writes_its_ema_backbone(ema_run, tmp_path):
    out = hub.export(ema_run.task, tmp_path / 'export', use_ema=True)
    assert_same_weights(exported_weights(out), ema_run.task.get_eval_model(ema=True).state_dict())


@pytest.mark.parametrize('hub_model,key', [('ema', 'state_dict_ema'), ('last', 'state_dict')])
def test_push_after_training_uploads_the_weights_hub_model_names(ema_run, tmp_path, monkeypatch, hub_model, key):
    monkeypatch.setenv('HF_TOKEN', 'hf_test_value')
    FakeHub().install(monkeypatch)
    run_dir = tmp_path / 'run'
    run_dir.mkdir()
    (run_dir / 'last.pth.tar').write_bytes((ema_run.dir / 'last.pth.tar').read_bytes())

    code = publish.push_after_training(training_args(push_to_hub='someone/drloc-vit', hub_model=hub_model), run_dir)
    assert code == 0
    assert_same_weights(exported_weights(run_dir / 'hub_export'), checkpoint(ema_run)[key])


def test_export_without_a_class_count_reads_it_from_the_classifier(ema_run, tmp_path):
    saved = checkpoint(ema_run)
    saved['args'].num_classes = None  # a run that took its class count from the model or the data
    torch.save(saved, tmp_path / 'no_count.pth.tar')
    bare = tmp_path / 'bare.pth'
    torch.save(saved['state_dict'], bare)  # a plain state dict: no args at all

    from_checkpoint = hub.export(tmp_path / 'no_count.pth.tar', tmp_path / 'from_checkpoint')
    from_bare = hub.export(bare, tmp_path / 'from_bare', model_name='vit_tiny_patch16_224',
                           model_kwargs={'depth': 2, 'img_size': 32})
    for out in (from_checkpoint, from_bare):
        model = timm.create_model(f'local-dir:{out}', pretrained=True).eval()
        assert model.num_classes == 3
        with torch.no_grad():
            torch.testing.assert_close(model(ema_run.x), ema_run.task.get_eval_model().eval()(ema_run.x))
