"""DRLocTask through torch.compile and DistributedDataParallel: which module each wrapper holds, and that
the DRLoc heads stay reachable for checkpoints, clipping and training."""
import re

import pytest
import timm
import torch
from torch.nn.parallel import DistributedDataParallel

from timm_drloc import DRLocModel, DRLocTask


def make_task():
    torch.manual_seed(0)
    model = timm.create_model('vit_tiny_patch16_224', num_classes=3, img_size=32, patch_size=8, depth=1,
                              embed_dim=32, num_heads=2)
    return model, DRLocTask(model, hidden_dim=16, verbose=False)


def test_compile_wraps_the_backbone_for_eval_and_backbone_with_heads_for_training():
    model, task = make_task()
    drloc = task.get_trainable_module()
    eval_model = task.compile(backend='eager')

    assert eval_model is task.get_eval_model()
    assert eval_model._orig_mod is model  # validation runs the plain backbone
    assert task.get_trainable_module()._orig_mod is drloc  # training runs backbone and heads
    assert task.get_task_state()['drloc_heads'].keys() == drloc.heads.state_dict().keys()


@pytest.mark.parametrize('kwargs,expected', [
    ({}, dict(backend='inductor', mode=None)),
    (dict(backend='eager', mode='max-autotune', dynamic=False), dict(backend='eager', mode='max-autotune', dynamic=False)),
])
def test_compile_gives_torch_compile_the_backend_mode_and_options_for_both_modules(monkeypatch, kwargs, expected):
    model, task = make_task()
    drloc = task.get_trainable_module()
    calls = []
    monkeypatch.setattr(torch, 'compile', lambda module, **options: calls.append((module, options)) or module)
    task.compile(**kwargs)
    assert calls == [(model, expected), (drloc, expected)]


@pytest.mark.usefixtures('process_group')
def test_prepare_distributed_puts_backbone_and_heads_in_one_ddp_module():
    model, task = make_task()
    drloc = task.get_trainable_module()
    assert task.prepare_distributed(find_unused_parameters=True) is task

    ddp = task.get_trainable_module()
    assert isinstance(ddp, DistributedDataParallel) and ddp.module is drloc and ddp.find_unused_parameters
    assert task.get_eval_model() is model
    assert len(task.get_clip_parameters()) == len(list(drloc.parameters()))
    task.train()
    out = task(torch.randn(2, 3, 32, 32), torch.tensor([0, 1]))
    out['loss'].backward()
    assert all(p.grad is not None for p in drloc.heads.parameters())
    assert isinstance(drloc, DRLocModel)


@pytest.mark.usefixtures('process_group')
def test_prepare_distributed_gives_ddp_the_device_ids():
    _, task = make_task()
    with pytest.raises(ValueError, match='device_ids'):  # DDP refuses device ids for a CPU module: they reached it
        task.prepare_distributed(device_ids=[torch.device('cpu')])


def test_clip_parameters_without_the_classifier_leave_out_only_its_weight_and_bias():
    model, task = make_task()
    heads = list(task.get_trainable_module().heads.parameters())
    params = task.get_clip_parameters(exclude_head=True)

    backbone = list(model.parameters())
    assert params == backbone[:-2] + heads
    assert backbone[-2] is model.head.weight and backbone[-1] is model.head.bias


@pytest.mark.parametrize('epoch,expected', [(0, 0.0), (0.5, 0.25), (1, 0.5), (2, 0.5)])
def test_one_warmup_epoch_ramps_from_zero(epoch, expected):
    from timm_drloc import drloc_lambda_at
    assert drloc_lambda_at(epoch, 0.5, num_epochs=3, warmup_epochs=1) == pytest.approx(expected)


@pytest.mark.parametrize('epoch,expected', [(2, 1.0), (2.5, 0.5), (3, 0.0), (4, 0.0)])
def test_decay_over_the_last_epoch_reaches_zero_and_stays_there(epoch, expected):
    from timm_drloc import drloc_lambda_at
    assert drloc_lambda_at(epoch, 1.0, num_epochs=3, warmup_epochs=2, decay=True) == pytest.approx(expected)


def test_forward_in_eval_mode_and_heads_for_another_module_are_refused_with_the_fix():
    _, task = make_task()
    task.eval()
    with pytest.raises(RuntimeError) as error:
        task(torch.randn(2, 3, 32, 32), torch.tensor([0, 1]))
    assert str(error.value) == 'DRLocTask needs the trainable module in train mode (call task.train()).'
    with pytest.raises(RuntimeError) as error:
        task.load_task_state(task.get_task_state(), module=torch.nn.Linear(2, 2))
    assert str(error.value) == 'Cannot load task state without a trainable module.'


def test_task_defaults_are_the_reference_settings_and_criterion_kwargs_reach_timms_loss():
    from timm.loss import LabelSmoothingCrossEntropy
    model = timm.create_model('vit_tiny_patch16_224', num_classes=3, img_size=32, patch_size=8, depth=1,
                              embed_dim=32, num_heads=2)
    task = DRLocTask(model, criterion_kwargs=dict(smoothing=0.2), verbose=False)
    head, = task.get_trainable_module().heads
    assert 'mode=l1, num_samples=64, use_abs=True, normalize=False, grid_size=(4, 4)' in repr(head)
    assert sum(p.numel() for p in head.parameters()) == (64 * 512 + 512) + (512 * 512 + 512) + (512 * 2 + 2)
    assert task.drloc_lambda == 0.5
    assert isinstance(task.criterion, LabelSmoothingCrossEntropy) and task.criterion.smoothing == 0.2


@pytest.mark.parametrize('verbose', [True, False])
def test_set_up_is_logged_only_when_verbose(caplog, verbose):
    model = timm.create_model('vit_tiny_patch16_224', num_classes=3, img_size=32, patch_size=8, depth=1,
                              embed_dim=32, num_heads=2)
    with caplog.at_level('INFO'):
        DRLocTask(model, drloc_lambda=0.25, hidden_dim=8, verbose=verbose)
    lines = [r.getMessage() for r in caplog.records if r.name.startswith('timm_drloc')]
    expected = ['DRLocTask: lambda=0.25, mode=l1, samples=64, abs=True, normalize=False, compile_head=False, grids: blocks.0 4x4x32 (NLC)']
    assert lines == (expected if verbose else [])


@pytest.mark.parametrize('value', [float('nan'), '0.5', None])
def test_lambda_that_is_not_a_number_is_refused(value):
    _, task = make_task()
    with pytest.raises(ValueError, match=re.escape(f'got {value!r}')):
        task.set_drloc_lambda(value)
    assert task.drloc_lambda == 0.5


def test_ema_update_passes_the_step_on_so_warmup_starts_from_the_live_weights():
    # timm's EMA warm-up: decay 1 - (1 + step / gamma) ** -power is 0 at step 0, so the copy becomes the live
    # weights; without the step it would average with decay 0.9 instead
    _, task = make_task()
    task.setup_ema(decay=0.9, use_warmup=True)
    with torch.no_grad():
        for p in task.get_trainable_module().parameters():
            p.add_(1.0)
    task.update_ema(step=0)
    live = task.get_trainable_module().state_dict()
    ema = task.get_trainable_module(ema=True).module.state_dict()
    for key, value in live.items():
        assert torch.equal(ema[key], value), key
