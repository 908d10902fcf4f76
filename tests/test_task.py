"""DRLocTask: timm training-task contract, loss composition, checkpoint state and lambda schedule."""
import pytest
import timm
import torch
import torch.nn.functional as F
from timm.task import TrainingTask

from timm_drloc import DRLocModel, DRLocTask, drloc_lambda_at


def make_task(**kwargs):
    torch.manual_seed(0)
    model = timm.create_model('vit_tiny_patch16_224', img_size=32, depth=2, embed_dim=48, num_heads=2, num_classes=4)
    return model, DRLocTask(model, hidden_dim=16, verbose=False, **kwargs)


def batch(soft=False):
    torch.manual_seed(1)
    x = torch.randn(4, 3, 32, 32)
    y = torch.tensor([0, 1, 2, 3])
    return x, (F.one_hot(y, 4).float() * 0.9 + 0.025 if soft else y)


def test_is_a_timm_training_task_with_backbone_as_eval_model():
    model, task = make_task(drloc_lambda=0.5)
    assert isinstance(task, TrainingTask)
    assert isinstance(task.get_trainable_module(), DRLocModel)
    assert task.get_eval_model() is model


@pytest.mark.parametrize('criterion_kwargs,soft', [
    (None, False),
    (dict(smoothing=0.1), False),
    (dict(soft_targets=True), True),
    (dict(loss_type='bce'), False),
])
def test_loss_is_task_loss_plus_lambda_times_drloc_loss(criterion_kwargs, soft):
    model, task = make_task(drloc_lambda=0.3, criterion_kwargs=criterion_kwargs)
    task.train()
    x, y = batch(soft)
    out = task(x, y)
    assert set(out) == {'loss', 'output', 'task_loss', 'drloc_loss'}
    assert out['output'].shape == (4, 4)
    torch.testing.assert_close(out['task_loss'], task.criterion(out['output'], y))
    torch.testing.assert_close(out['loss'], out['task_loss'] + 0.3 * out['drloc_loss'])
    assert out['drloc_loss'] > 0


def test_lambda_zero_still_reports_drloc_loss_but_adds_nothing():
    _, task = make_task(drloc_lambda=0.0)
    task.train()
    out = task(*batch())
    assert out['drloc_loss'] > 0
    torch.testing.assert_close(out['loss'], out['task_loss'])


def test_set_lambda_changes_the_weight_and_rejects_negative():
    _, task = make_task(drloc_lambda=0.5)
    task.set_drloc_lambda(0.25)
    assert task.drloc_lambda == 0.25
    with pytest.raises(ValueError, match=r'drloc_lambda must be a finite number >= 0, got -1.*use 0 to turn DRLoc off'):
        task.set_drloc_lambda(-1)


def test_negative_lambda_refused_at_construction():
    with pytest.raises(ValueError, match='got -0.5'):
        make_task(drloc_lambda=-0.5)


def test_checkpoint_state_dict_is_plain_timm_and_heads_are_task_state():
    model, task = make_task()
    state = task.get_checkpoint_state()
    assert list(state['state_dict']) == list(model.state_dict())
    heads = state['task_state']['drloc_heads']
    assert set(heads) == set(task.get_trainable_module().heads.state_dict())


def test_task_state_round_trip_restores_heads():
    _, task = make_task()
    saved = {k: v.clone() for k, v in task.get_task_state()['drloc_heads'].items()}
    _, other = make_task()
    torch.nn.init.normal_(other.get_trainable_module().heads[0].mlp[0].weight)
    other.load_checkpoint_state(task.get_checkpoint_state()['state_dict'], {'drloc_heads': saved})
    for k, v in other.get_task_state()['drloc_heads'].items():
        assert torch.equal(v, saved[k]), k


def test_loading_a_checkpoint_without_heads_is_a_clear_error():
    _, task = make_task()
    with pytest.raises(RuntimeError, match="no DRLoc head state"):
        task.load_task_state({}, strict=True)


def test_ema_keeps_its_own_heads_and_eval_backbone():
    model, task = make_task()
    task.setup_ema(decay=0.5)
    ema_backbone = task.get_eval_model(ema=True)
    assert ema_backbone is not model and type(ema_backbone) is type(model)
    state = task.get_checkpoint_state(ema=True)
    assert list(state['state_dict_ema']) == list(model.state_dict())
    assert 'drloc_heads' in state['task_state_ema']
    # one step then an EMA update moves the EMA heads halfway
    task.train()
    head = task.get_trainable_module().heads[0].mlp[0].weight
    before = task.get_task_state(ema=True)['drloc_heads']['0.mlp.0.weight'].clone()
    with torch.no_grad():
        head.add_(1.0)
    task.update_ema()
    after = task.get_task_state(ema=True)['drloc_heads']['0.mlp.0.weight']
    torch.testing.assert_close(after, 0.5 * before + 0.5 * head.detach())


def test_ema_copy_captures_its_own_grids():
    _, task = make_task()
    task.setup_ema(decay=0.5)
    ema_drloc = task.get_trainable_module(ema=True).module
    ema_drloc.train()
    logits, loss = ema_drloc(batch()[0])
    assert logits.shape == (4, 4) and loss > 0


def test_clip_parameters_cover_backbone_and_heads():
    model, task = make_task()
    params = task.get_clip_parameters()
    assert len(params) == len(list(model.parameters())) + len(list(task.get_trainable_module().heads.parameters()))


@pytest.mark.parametrize('epoch,expected', [(0, 0.0), (10, 0.25), (20, 0.5), (60, 0.25), (99, 0.5 * 1 / 80)])
def test_reference_schedule_warmup_then_decay(epoch, expected):
    assert drloc_lambda_at(epoch, 0.5, num_epochs=100, warmup_epochs=20, decay=True) == pytest.approx(expected)


def test_schedule_constant_by_default_and_warmup_alone_then_flat():
    assert [drloc_lambda_at(e, 0.5, 10) for e in (0, 5, 9)] == [0.5, 0.5, 0.5]
    assert [drloc_lambda_at(e, 0.5, 10, warmup_epochs=4) for e in (0, 2, 4, 9)] == [0.0, 0.25, 0.5, 0.5]


@pytest.mark.parametrize('value', [float('inf'), float('nan'), True])
def test_infinite_or_non_numeric_lambda_is_refused_at_construction_and_by_the_setter(value):
    with pytest.raises(ValueError, match='drloc_lambda must be a finite number >= 0'):
        make_task(drloc_lambda=value)
    _, task = make_task(drloc_lambda=0.5)
    with pytest.raises(ValueError, match='drloc_lambda must be a finite number >= 0'):
        task.set_drloc_lambda(value)
    assert task.drloc_lambda == 0.5


def test_a_criterion_passed_second_as_to_timms_classification_task_is_refused_naming_the_keyword():
    model = timm.create_model('vit_tiny_patch16_224', img_size=32, depth=1, embed_dim=48, num_heads=2, num_classes=4)
    with pytest.raises(ValueError) as error:
        DRLocTask(model, torch.nn.CrossEntropyLoss())
    assert str(error.value) == ("DRLocTask's second argument is drloc_lambda, got CrossEntropyLoss; pass the loss by "
                                "name: DRLocTask(model, criterion=..., drloc_lambda=0.5)")

class DictOutputModel(torch.nn.Module):
    """A model whose forward returns a dict, as some detection-style or multi-head models do."""

    def __init__(self):
        super().__init__()
        self.features = torch.nn.Conv2d(3, 8, 3, stride=4, padding=1)
        self.fc = torch.nn.Linear(8, 4)

    def forward(self, x):
        return {'logits': self.fc(self.features(x).mean((2, 3))), 'aux': x.mean()}


def test_a_model_returning_a_dict_gets_a_clear_error_from_the_task():
    task = DRLocTask(DictOutputModel(), layers=['features'], input_size=(3, 32, 32), hidden_dim=8, verbose=False)
    task.train()
    with pytest.raises(ValueError, match=r"DictOutputModel's forward returns a dict \(keys \['logits', 'aux'\]\), "
                                         r"not the logits tensor"):
        task(*batch())


class ListOutputModel(DictOutputModel):
    def forward(self, x):
        return list(super().forward(x).values())


def test_a_model_returning_a_list_gets_the_error_naming_its_type():
    task = DRLocTask(ListOutputModel(), layers=['features'], input_size=(3, 32, 32), hidden_dim=8, verbose=False)
    task.train()
    with pytest.raises(ValueError) as error:
        task(*batch())
    assert str(error.value).startswith("ListOutputModel's forward returns a list, not the logits tensor the "
                                       "classification loss needs.")


# Losses of three AdamW steps recorded with the code of commit de33615, before `base_task=` existed:
# DRLocTask alone must keep giving them for the same seed.
RECORDED_STEPS = {  # mode: [(loss, task_loss, drloc_loss) per step]
    'l1': [(2.024383, 1.42565, 1.197467), (2.068764, 1.430712, 1.276106), (1.573954, 0.986634, 1.17464)],
    'cbr': [(2.212513, 1.42565, 1.573727), (2.138287, 1.432997, 1.410579), (1.660812, 0.984235, 1.353153)],
}


@pytest.mark.parametrize('mode', list(RECORDED_STEPS))
def test_drloc_alone_gives_the_losses_recorded_before_base_tasks(mode):
    from timm.optim import create_optimizer_v2
    torch.manual_seed(0)
    model = timm.create_model('vit_tiny_patch16_224', img_size=32, patch_size=8, depth=2, embed_dim=48, num_heads=2,
                              num_classes=4)
    task = DRLocTask(model, drloc_lambda=0.5, mode=mode, hidden_dim=16, verbose=False)
    optimizer = create_optimizer_v2(task.get_trainable_module(), 'adamw', lr=1e-2)
    generator = torch.Generator().manual_seed(1)
    x, y = torch.randn(4, 3, 32, 32, generator=generator), torch.tensor([0, 1, 2, 3])
    task.train()
    steps = []
    for _ in range(3):
        out = task(x, y)
        out['loss'].backward()
        optimizer.step()
        optimizer.zero_grad()
        steps.append([out[k].item() for k in ('loss', 'task_loss', 'drloc_loss')])
    torch.testing.assert_close(torch.tensor(steps), torch.tensor(RECORDED_STEPS[mode]), rtol=1e-5, atol=1e-5)


def test_an_explicit_module_is_read_for_the_eval_model_and_the_task_state():
    # e.g. the EMA copy or a module from another run: what is asked about, not the task's own module
    _, task = make_task()
    other_model, other = make_task()
    torch.nn.init.normal_(other.get_trainable_module().heads[0].mlp[0].weight)
    module = other.get_trainable_module()
    assert task.get_eval_model(module=module) is other_model
    state = task.get_task_state(module=module)['drloc_heads']
    assert all(torch.equal(v, module.heads.state_dict()[k]) for k, v in state.items())


def test_heads_state_missing_a_key_loads_the_rest_only_without_strict():
    _, task = make_task()
    heads = task.get_trainable_module().heads
    state = {k: torch.full_like(v, 0.25) for k, v in heads.state_dict().items()}
    missing = next(k for k in state if k.endswith('bias'))
    kept = heads.state_dict()[missing].clone()
    del state[missing]
    with pytest.raises(RuntimeError, match=f'Missing key.*"{missing}"'):
        task.load_task_state({'drloc_heads': state})
    task.load_task_state({'drloc_heads': state}, strict=False)
    loaded = heads.state_dict()
    assert torch.equal(loaded[missing], kept)
    assert all(torch.equal(loaded[k], v) for k, v in state.items())


def test_an_empty_task_state_without_strict_is_a_no_op_even_before_ema_exists():
    _, task = make_task()
    before = {k: v.clone() for k, v in task.get_task_state()['drloc_heads'].items()}
    task.load_task_state({}, strict=False, ema=True)  # no EMA yet: nothing to load, nothing to refuse
    task.load_task_state(None, strict=False)
    assert all(torch.equal(v, before[k]) for k, v in task.get_task_state()['drloc_heads'].items())


def test_a_criterion_with_class_weights_is_moved_to_the_tasks_device():
    # as timm's ClassificationTask does: a criterion's buffers follow `device=` ('meta': the other device every
    # machine has), so weighted cross-entropy does not mix devices on a GPU
    weighted = torch.nn.CrossEntropyLoss(weight=torch.tensor([1., 2., 1., 1.]))
    _, task = make_task(criterion=weighted, device=torch.device('meta'))
    assert task.criterion is weighted
    assert task.criterion.weight.device == torch.device('meta')


def test_a_plain_logits_and_loss_tuple_from_a_wrapper_of_the_trainable_module_gives_the_same_loss():
    # a wrapper around the trainable module (DDP-like: it keeps it as .module) may hand back the (logits, drloc
    # loss) pair as a plain tuple; the task reads it as the DRLocOutput it was
    class PlainTuple(torch.nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, x):
            return tuple(self.module(x))

    _, task = make_task(drloc_lambda=0.5)
    task.train()
    x, y = batch()
    torch.manual_seed(2)
    expected = task(x, y)
    task.trainable_module = PlainTuple(task.trainable_module)
    torch.manual_seed(2)
    result = task(x, y)
    torch.testing.assert_close(result['loss'], expected['loss'])
    torch.testing.assert_close(result['drloc_loss'], expected['drloc_loss'])
