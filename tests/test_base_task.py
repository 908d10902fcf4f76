"""DRLoc over timm's distillation tasks: `DRLocTask(student, base_task=...)` with real timm tasks, tiny real
timm students and teachers (random weights): the loss, one student forward, checkpoint state, EMA,
compile, layer decay, errors, and DDP across two real processes (gloo)."""
import contextlib
import copy
import os

import pytest
import timm
import torch
import torch.multiprocessing as mp
import torch.nn as nn
from timm.optim import create_optimizer_v2
from timm.task import (
    ClassificationTask, FeatureDistillationTask, LogitDistillationTask, TokenDistillationTask, TrainingTask)

from timm_drloc import DRLocTask, wrap
from timm_drloc.errors import ConfigError

STUDENT_KWARGS = dict(img_size=32, patch_size=8, depth=2, embed_dim=48, num_heads=2, num_classes=4)  # 4x4x48 grid
TEACHER_KWARGS = dict(img_size=32, patch_size=8, depth=1, embed_dim=32, num_heads=2, num_classes=4)  # 32 features
STUDENTS = {'logit': 'vit_tiny_patch16_224', 'feature': 'vit_tiny_patch16_224',
            'token': 'deit_tiny_distilled_patch16_224'}
BASE_TASKS = {'logit': LogitDistillationTask, 'feature': FeatureDistillationTask, 'token': TokenDistillationTask}
KD_TERM = {'logit': 'kd_loss', 'feature': 'kd_loss', 'token': 'distill_loss'}
KINDS = list(BASE_TASKS)


def make_student(kind: str = 'logit', seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return timm.create_model(STUDENTS[kind], pretrained=False, **STUDENT_KWARGS)


def make_teacher(seed: int = 1) -> nn.Module:
    torch.manual_seed(seed)
    return timm.create_model('vit_tiny_patch16_224', pretrained=False, **TEACHER_KWARGS)


def make_base(kind: str, student: nn.Module, teacher: nn.Module = None):
    return BASE_TASKS[kind](student, teacher if teacher is not None else make_teacher(), verbose=False)


def make_task(kind: str = 'feature', drloc_lambda: float = 0.5, seed: int = 0):
    """(student, DRLocTask over the `kind` distillation task), the heads seeded with `seed`."""
    student = make_student(kind, seed)
    base = make_base(kind, student)
    torch.manual_seed(seed)
    return student, DRLocTask(student, drloc_lambda=drloc_lambda, hidden_dim=16, base_task=base, verbose=False)


def batch(seed: int = 2):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(4, 3, 32, 32, generator=generator), torch.tensor([0, 1, 2, 3])


def heads_of(task: DRLocTask) -> nn.ModuleList:
    return task.get_trainable_module().heads


@pytest.mark.parametrize('kind', KINDS)
def test_loss_is_the_distillation_loss_plus_lambda_times_the_drloc_loss(kind):
    student = make_student(kind)
    reference_student = copy.deepcopy(student)  # before DRLoc: no hooks on the copy
    teacher = make_teacher()
    reference_base = make_base(kind, reference_student, teacher)
    task = DRLocTask(student, drloc_lambda=0.5, hidden_dim=16, base_task=make_base(kind, student, teacher),
                     verbose=False)
    task.set_drloc_lambda(0.3)
    base_state = {k: v for k, v in task.get_task_state().items() if k != 'drloc_heads'}  # the feature projection
    reference_base.load_task_state(base_state)
    # the DRLoc loss of the same grid computed on its own: a plain DRLocModel with the same heads
    reference_drloc = wrap(copy.deepcopy(reference_student), hidden_dim=16)
    reference_drloc.heads.load_state_dict(heads_of(task).state_dict())
    task.train(), reference_base.train(), reference_drloc.train()
    x, y = batch()

    torch.manual_seed(7)
    out = task(x, y)
    torch.manual_seed(7)  # the same sampled pairs
    _, drloc_loss = reference_drloc(x)
    expected = reference_base(x, y)

    assert set(out) == set(expected) | {'drloc_loss'}
    torch.testing.assert_close(out['drloc_loss'], drloc_loss)
    for term in ('task_loss', KD_TERM[kind]):
        torch.testing.assert_close(out[term], expected[term])
    torch.testing.assert_close(out['output'], expected['output'])
    torch.testing.assert_close(out['loss'], expected['loss'] + 0.3 * drloc_loss)
    assert out[KD_TERM[kind]] > 0 and drloc_loss > 0


@pytest.mark.parametrize('kind', KINDS)
def test_a_few_steps_lower_the_loss_train_heads_and_student_and_leave_the_teacher(kind):
    student, task = make_task(kind)
    teacher = {k: v.clone() for k, v in task.base_task.teacher.state_dict().items()}
    heads = {k: v.clone() for k, v in heads_of(task).state_dict().items()}
    optimizer = create_optimizer_v2(task.get_trainable_module(), 'adamw', lr=3e-3)
    task.train()
    x, y = batch()

    def loss_on_fixed_pairs() -> float:
        torch.manual_seed(11)
        with torch.no_grad():
            return task(x, y)['loss'].item()

    before = loss_on_fixed_pairs()
    for _ in range(5):
        task(x, y)['loss'].backward()
        optimizer.step()
        optimizer.zero_grad()
    assert loss_on_fixed_pairs() < before
    assert all(torch.equal(v, teacher[k]) for k, v in task.base_task.teacher.state_dict().items())
    assert not any(torch.equal(v, heads[k]) for k, v in heads_of(task).state_dict().items())


def test_over_classification_task_gives_the_numbers_of_drloc_alone():
    losses = {}
    for over in (False, True):
        torch.manual_seed(0)
        model = timm.create_model(STUDENTS['logit'], pretrained=False, **STUDENT_KWARGS)
        base = ClassificationTask(model, verbose=False) if over else None
        task = DRLocTask(model, drloc_lambda=0.5, hidden_dim=16, base_task=base, verbose=False)
        optimizer = create_optimizer_v2(task.get_trainable_module(), 'adamw', lr=1e-2)
        task.train()
        torch.manual_seed(3)
        losses[over] = []
        for _ in range(3):
            out = task(*batch())
            out['loss'].backward()
            optimizer.step()
            optimizer.zero_grad()
            losses[over].append([out[k].item() for k in ('loss', 'drloc_loss')])  # timm's task has no task_loss
    torch.testing.assert_close(torch.tensor(losses[True]), torch.tensor(losses[False]))


@pytest.mark.parametrize('kind', KINDS)
def test_the_student_runs_forward_once_per_step(kind):
    student, task = make_task(kind)
    calls = []
    student.patch_embed.register_forward_pre_hook(lambda *_: calls.append(1))  # once per backbone pass
    task.train()
    task(*batch())
    assert len(calls) == 1


def test_checkpoint_state_dict_is_the_plain_student_and_loads_in_a_fresh_timm_model():
    student, task = make_task('feature')
    state = task.get_checkpoint_state()
    assert list(state['state_dict']) == list(student.state_dict())
    assert set(state['task_state']) == {'projection', 'drloc_heads'}
    fresh = timm.create_model(STUDENTS['feature'], pretrained=False, **STUDENT_KWARGS)
    fresh.load_state_dict(state['state_dict'])  # strict, no plugin
    fresh.eval(), task.eval()
    x, _ = batch()
    torch.testing.assert_close(fresh(x), task.get_eval_model()(x), rtol=0, atol=0)


def test_hub_export_of_the_task_writes_the_plain_student_alone(tmp_path):
    from safetensors.torch import load_file
    from timm_drloc import export
    student, task = make_task('feature')
    tensors = load_file(export(task, tmp_path / 'export') / 'model.safetensors')
    assert sorted(tensors) == sorted(student.state_dict())
    assert all(torch.equal(tensors[k], v) for k, v in student.state_dict().items())


def test_task_state_round_trip_restores_heads_and_projection():
    _, saved = make_task('feature', seed=0)
    _, loaded = make_task('feature', seed=5)
    checkpoint = saved.get_checkpoint_state()
    loaded.load_checkpoint_state(checkpoint['state_dict'], checkpoint['task_state'])
    for name, value in saved.get_task_state().items():
        restored = loaded.get_task_state()[name]
        assert all(torch.equal(restored[k], v) for k, v in value.items()), name
    saved.train(), loaded.train()
    torch.manual_seed(4)
    expected = saved(*batch())['loss']
    torch.manual_seed(4)
    torch.testing.assert_close(loaded(*batch())['loss'], expected, rtol=0, atol=0)


@pytest.mark.parametrize('missing,message', [
    ('projection', r"task state for FeatureDistillationTask has entries \[\], this task keeps \['projection'\]"),
    ('drloc_heads', 'no DRLoc head state'),
])
def test_task_state_missing_the_projection_or_the_heads_is_refused(missing, message):
    _, task = make_task('feature')
    state = task.get_task_state()
    del state[missing]
    with pytest.raises(RuntimeError, match=message):
        task.load_task_state(state)


def test_ema_averages_heads_projection_and_student_and_evaluates_a_plain_student():
    student, task = make_task('feature')
    task.setup_ema(decay=0.5)
    ema_model = task.get_eval_model(ema=True)
    assert type(ema_model) is type(student) and ema_model is not student
    state = task.get_checkpoint_state(ema=True)
    assert list(state['state_dict_ema']) == list(student.state_dict())
    before = {name: {k: v.clone() for k, v in part.items()} for name, part in state['task_state_ema'].items()}
    live = task.get_trainable_module()
    with torch.no_grad():
        for p in live.parameters():
            p.add_(1.0)
    task.update_ema()
    after = task.get_task_state(ema=True)
    live_state = task.get_task_state()
    for name in ('projection', 'drloc_heads'):
        for key, value in after[name].items():
            torch.testing.assert_close(value, 0.5 * before[name][key] + 0.5 * live_state[name][key])
    torch.testing.assert_close(ema_model.pos_embed, 0.5 * (student.pos_embed - 1.0) + 0.5 * student.pos_embed)


def test_ema_task_state_with_a_projection_round_trips():
    # resuming EMA weights over feature distillation: the EMA projection loads strictly, as saved
    _, saved = make_task('feature', seed=0)
    saved.setup_ema(decay=0.5)
    with torch.no_grad():
        for p in saved.get_trainable_module(ema=True).parameters():
            p.add_(0.25)
    state = saved.get_task_state(ema=True)
    assert set(state) == {'projection', 'drloc_heads'}
    _, loaded = make_task('feature', seed=5)
    loaded.setup_ema(decay=0.5)
    loaded.load_task_state(state, ema=True)
    for name, part in loaded.get_task_state(ema=True).items():
        assert all(torch.equal(part[k], v) for k, v in state[name].items()), name
    assert not torch.equal(loaded.get_task_state()['projection']['weight'], state['projection']['weight'])


def test_ema_copy_reads_its_own_grids():
    _, task = make_task('logit')
    task.setup_ema(decay=0.5)
    ema_trainable = task.get_trainable_module(ema=True).module
    ema_trainable.train()
    logits = ema_trainable(batch()[0])
    assert logits.shape == (4, 4) and ema_trainable.pop_drloc_loss() > 0


@pytest.mark.parametrize('kind', ['logit', 'feature'])
def test_clip_parameters_are_the_base_tasks_plus_the_heads(kind):
    student, task = make_task(kind)
    heads = list(heads_of(task).parameters())
    extra = list(task.get_trainable_module().module.projection.parameters()) if kind == 'feature' else []
    names = {id(p): n for n, p in task.get_trainable_module().named_parameters()}
    params = task.get_clip_parameters()
    assert len(params) == len(list(student.parameters())) + len(extra) + len(heads)
    without_head = task.get_clip_parameters(exclude_head=True)
    left_out = {names[id(p)] for p in params} - {names[id(p)] for p in without_head}
    student_prefix = 'module.student.' if kind == 'feature' else 'module.'
    assert left_out == {student_prefix + 'head.weight', student_prefix + 'head.bias'}
    assert {id(p) for p in heads + extra} <= {id(p) for p in without_head}


@pytest.mark.parametrize('kind', ['logit', 'feature'])
def test_layer_decay_reaches_the_student_through_the_wrapper(kind):
    student, task = make_task(kind)
    trainable = task.get_trainable_module()
    optimizer = create_optimizer_v2(trainable, 'adamw', lr=1e-3, weight_decay=0.05, layer_decay=0.5)
    group_of = {id(p): g for g in optimizer.param_groups for p in g['params']}
    assert len(group_of) == len(list(trainable.parameters()))
    assert group_of[id(student.pos_embed)]['weight_decay'] == 0  # the student's no_weight_decay()
    first, last = group_of[id(student.patch_embed.proj.weight)], group_of[id(student.head.weight)]
    assert first['lr_scale'] < last['lr_scale']
    assert group_of[id(heads_of(task)[0].mlp[0].weight)]['lr_scale'] == last['lr_scale']


def test_compiled_task_gives_the_uncompiled_numbers_and_a_plain_checkpoint():
    student, task = make_task('feature')
    _, reference = make_task('feature')
    eval_model = task.compile(backend='eager')
    task.train(), reference.train()
    torch.manual_seed(6)
    out = task(*batch())
    torch.manual_seed(6)
    expected = reference(*batch())
    for term in ('loss', 'kd_loss', 'drloc_loss'):
        torch.testing.assert_close(out[term], expected[term])
    out['loss'].backward()
    assert all(p.grad is not None for p in [*student.parameters(), *heads_of(task).parameters()])
    assert eval_model is task.get_eval_model()
    assert list(task.get_checkpoint_state()['state_dict']) == list(student.state_dict())
    assert set(task.get_task_state()) == {'projection', 'drloc_heads'}


def test_forward_in_eval_mode_says_to_call_train():
    _, task = make_task('logit')
    task.eval()
    with pytest.raises(RuntimeError) as error:
        task(*batch())
    assert str(error.value) == ("The base task's forward did not run its trainable module in train mode, so there is "
                                "no DRLoc loss: call task.train() before training steps.")


class MLPStudent(nn.Module):
    """A classifier with timm's attributes and no spatial grid."""
    pretrained_cfg = dict(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    num_classes, in_chans = 4, 3

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(3 * 32 * 32, 16), nn.Linear(16, 4)

    def forward(self, x):
        return self.fc2(self.fc1(x.flatten(1)).relu())


def test_student_without_a_spatial_grid_is_refused_and_the_base_task_left_as_it_was():
    student = MLPStudent()
    base = LogitDistillationTask(student, make_teacher(), verbose=False)
    with pytest.raises(ValueError, match='has no spatial grid'):
        DRLocTask(student, base_task=base, layers=['fc1'], input_size=(3, 32, 32), verbose=False)
    assert base.trainable_module is student and not student.fc1._forward_hooks


def test_token_distillation_of_a_student_without_a_distillation_token_is_refused():
    with pytest.raises(ValueError, match=r"VisionTransformer does not have 'set_distilled_training'"):
        make_base('token', make_student('logit'))


def test_multiscale_over_a_base_task_on_a_vit_is_refused():
    student = make_student('logit')
    with pytest.raises(ValueError, match=r'multiscale=True needs a hierarchical model'):
        DRLocTask(student, multiscale=True, base_task=make_base('logit', student), verbose=False)


def test_a_model_the_base_task_does_not_train_is_refused():
    base = make_base('feature', make_student('feature'))
    with pytest.raises(ConfigError, match=r'the model \(VisionTransformer\) is not inside the trainable module of '
                                          r'FeatureDistillationTask \(FeatureDistillationTrainableModule\)'):
        DRLocTask(make_student('feature'), base_task=base, verbose=False)


class _NoModuleTask(TrainingTask):
    """A timm task that keeps no trainable module."""


@pytest.mark.parametrize('prepare,message', [  # prepare: the base task -> what is passed as base_task
    (lambda base: [base.compile(backend='eager'), base][-1],
     "the trainable module of LogitDistillationTask is already compiled or DDP-wrapped (OptimizedModule). Add DRLoc "
     "first; DRLocTask.compile() and prepare_distributed() then do both for the base task too."),
    (lambda base: [base.setup_ema(), base][-1],
     "LogitDistillationTask already has an EMA, whose copy would lack the DRLoc heads. Call setup_ema() on the "
     "DRLocTask instead."),
    (lambda base: base,
     "criterion / criterion_kwargs with base_task: LogitDistillationTask computes the task loss with its own "
     "criterion. Pass the criterion to the base task instead."),
    (lambda base: base.trainable_module,  # the student itself
     "base_task must be a timm.task.TrainingTask, got VisionTransformer. Build a timm task (e.g. "
     "LogitDistillationTask(model, teacher)) and pass it."),
    (lambda base: _NoModuleTask(),
     "_NoModuleTask keeps no `trainable_module`: DRLoc needs the module the task trains to put its heads beside it."),
], ids=['compiled', 'ema', 'criterion', 'not-a-task', 'no-module'])
def test_a_base_task_that_cannot_take_drloc_is_refused(prepare, message):
    student = make_student('logit')
    base = make_base('logit', student)
    criterion = nn.CrossEntropyLoss() if 'criterion' in message else None
    with pytest.raises(ConfigError) as error:
        DRLocTask(student, base_task=prepare(base), criterion=criterion, verbose=False)
    assert str(error.value) == message


def test_drloc_twice_and_a_grid_read_by_forward_intermediates_are_refused():
    student, task = make_task('logit')
    with pytest.raises(ConfigError) as error:
        DRLocTask(student, base_task=task, verbose=False)
    assert str(error.value) == "base_task is a DRLocTask already: add DRLoc to a task once."
    with pytest.raises(ConfigError) as error:
        DRLocTask(student, base_task=task.base_task, verbose=False)
    assert str(error.value) == "LogitDistillationTask already has DRLoc: add DRLoc to a task once."
    torch.manual_seed(0)  # Twins: feature_info names a container, so its grid comes from forward_intermediates()
    twins = timm.create_model('twins_svt_small', pretrained=False, img_size=64, num_classes=4, depths=(1, 1, 1, 1),
                              embed_dims=(8, 16, 16, 32), num_heads=(1, 1, 1, 1), sr_ratios=(2, 1, 1, 1))
    with pytest.raises(ConfigError) as error:
        DRLocTask(twins, base_task=make_base('logit', twins), hidden_dim=8, verbose=False)
    assert str(error.value) == (
        "Twins's grid is read with forward_intermediates() (['block.3']), a forward pass of its own; over a base task "
        "the grid must come from the pass the base task runs. Name the module that outputs the grid with "
        "layers=[...] (--drloc-layers).")


def test_ddp_find_unused_parameters_is_refused():
    _, task = make_task('logit')
    with pytest.raises(ConfigError) as error:
        task.prepare_distributed(find_unused_parameters=True)
    assert str(error.value) == (
        "find_unused_parameters=True does not work with DRLoc over a base task: DDP looks for used parameters in "
        "the module output, and the DRLoc loss travels beside it. Leave it False (every head parameter gets a "
        "gradient at each step).")


# --- DDP in this process: a one-rank gloo group (conftest.process_group) ---------------------------------

@pytest.mark.usefixtures('process_group')
@pytest.mark.parametrize('kind', ['logit', 'feature'])
def test_prepare_distributed_lets_the_base_task_wrap_a_module_holding_the_heads(kind):
    student, task = make_task(kind)
    trainable = task.get_trainable_module()
    assert task.prepare_distributed(gradient_as_bucket_view=True) is task
    ddp = task.get_trainable_module()
    assert isinstance(ddp, nn.parallel.DistributedDataParallel) and ddp.module is trainable
    assert ddp.gradient_as_bucket_view is True  # the DDP options reach DDP through the base task
    assert task.base_task.trainable_module is ddp
    assert task.get_eval_model() is student
    task.train()
    task(*batch())['loss'].backward()
    assert all(p.grad is not None for p in trainable.heads.parameters())
    _, refused = make_task(kind)
    with pytest.raises(ValueError, match='device_ids'):  # DDP refuses device ids for a CPU module: they reached it
        refused.prepare_distributed(device_ids=[torch.device('cpu')])


class _ReplacingTask(LogitDistillationTask):
    """A base task whose prepare_distributed() swaps its trainable module for one without the heads."""

    def prepare_distributed(self, device_ids=None, **ddp_kwargs):
        self.trainable_module = nn.Sequential(nn.Linear(2, 2))
        return self


def test_a_base_task_that_drops_the_heads_when_distributing_is_refused():
    student = make_student('logit')
    task = DRLocTask(student, hidden_dim=16, base_task=_ReplacingTask(student, make_teacher(), verbose=False),
                     verbose=False)
    with pytest.raises(RuntimeError) as error:
        task.prepare_distributed()
    assert str(error.value) == (
        "_ReplacingTask.prepare_distributed() replaced its trainable module with Sequential, which does not hold "
        "the DRLoc heads: their gradients would not be averaged across ranks.")


class _RecordingTask(FeatureDistillationTask):
    """Feature distillation that records how DRLocTask asks for its task state."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls = []

    def get_task_state(self, module=None, ema=False):
        self.calls.append(('get', module is not None, ema))
        return super().get_task_state(module=module, ema=ema)

    def get_eval_model(self, module=None, ema=False):
        self.calls.append(('eval', module is not None, ema))
        return super().get_eval_model(module=module, ema=ema)

    def load_task_state(self, state, strict=True, module=None, ema=False):
        self.calls.append(('load', module is not None, ema, strict))
        return super().load_task_state(state, strict=strict, module=module, ema=ema)


@pytest.mark.parametrize('ema', [False, True])
@pytest.mark.parametrize('strict', [True, False])
def test_loading_task_state_hands_the_base_task_its_module_ema_and_strict(ema, strict):
    student = make_student('feature')
    base = _RecordingTask(student, make_teacher(), verbose=False)
    task = DRLocTask(student, hidden_dim=16, base_task=base, verbose=False)
    task.setup_ema(decay=0.5)
    state = task.get_task_state(ema=ema)
    base.calls.clear()
    task.load_task_state(state, strict=strict, ema=ema)
    loads = [call for call in base.calls if call[0] == 'load']
    gets = [call for call in base.calls if call[0] == 'get']
    assert loads == [('load', True, ema, strict)]
    assert gets and set(gets) == {('get', True, ema)}  # the entries it expects: of the copy being loaded


@pytest.mark.parametrize('ema', [False, True])
def test_the_eval_model_and_task_state_come_from_the_base_task_for_the_copy_asked_for(ema):
    student = make_student('feature')
    base = _RecordingTask(student, make_teacher(), verbose=False)
    task = DRLocTask(student, hidden_dim=16, base_task=base, verbose=False)
    task.setup_ema(decay=0.5)
    base.calls.clear()
    eval_model = task.get_eval_model(ema=ema)
    assert (eval_model is student) is not ema and type(eval_model) is type(student)
    assert set(task.get_task_state(ema=ema)) == {'projection', 'drloc_heads'}
    assert base.calls == [('eval', True, ema), ('get', True, ema)]


def test_a_task_state_without_heads_still_loads_the_projection_without_strict():
    _, saved = make_task('feature', seed=0)
    _, loaded = make_task('feature', seed=5)
    state = saved.get_task_state()
    del state['drloc_heads']
    state['projection'] = {k: torch.full_like(v, 0.5) for k, v in state['projection'].items()}
    loaded.load_task_state(state, strict=False)
    restored = loaded.get_task_state()['projection']
    assert all(torch.equal(restored[k], v) for k, v in state['projection'].items())


def test_an_empty_task_state_without_strict_is_a_no_op_even_before_ema_exists():
    _, task = make_task('feature')
    before = task.get_task_state()
    task.load_task_state({}, strict=False, ema=True)  # no EMA yet: nothing to load, nothing to refuse
    after = task.get_task_state()
    assert all(torch.equal(after[name][k], v) for name, part in before.items() for k, v in part.items())


def test_a_projection_state_with_missing_keys_loads_only_without_strict():
    _, task = make_task('feature')
    state = task.get_task_state()
    projection = task.get_trainable_module().module.projection
    state['projection'] = {'weight': torch.full_like(projection.weight, 0.5)}  # no bias
    bias = projection.bias.detach().clone()
    with pytest.raises(RuntimeError, match=r'Missing key\(s\) in state_dict: "bias"'):
        task.load_task_state(state)
    task.load_task_state(state, strict=False)
    assert torch.equal(projection.weight, torch.full_like(projection.weight, 0.5))
    assert torch.equal(projection.bias, bias)


class _OwnEvaluatorTask(LogitDistillationTask):
    def create_evaluator(self, **kwargs):
        return ('own evaluator', kwargs)


def test_the_evaluator_is_the_base_tasks_over_a_base_task_and_timms_alone():
    from timm.task.evaluator import ClassificationEvaluator
    student = make_student('logit')
    task = DRLocTask(student, hidden_dim=16, base_task=_OwnEvaluatorTask(student, make_teacher(), verbose=False),
                     verbose=False)
    assert task.create_evaluator(topk=(1, 3)) == ('own evaluator', {'topk': (1, 3)})
    alone = DRLocTask(make_student('logit'), hidden_dim=16, verbose=False)
    assert isinstance(alone.create_evaluator(), ClassificationEvaluator)


# --- DDP: two real processes, gloo ----------------------------------------------------------------------

def _trainable_grads(task: DRLocTask):
    """Gradients of everything DRLocTask trains over feature distillation: heads, projection, student."""
    trainable = task.get_trainable_module()
    if isinstance(trainable, nn.parallel.DistributedDataParallel):
        trainable = trainable.module
    return {n: p.grad.detach().clone() for n, p in trainable.named_parameters()}


def _two_micro_steps(task: DRLocTask, rank: int, no_sync) -> None:
    """Gradient accumulation as timm's loop does it: the first micro-batch under no_sync()."""
    task.train()
    for micro in range(2):
        torch.manual_seed(100 + 10 * rank + micro)  # sampled pairs differ per rank and per micro-batch
        with no_sync() if micro == 0 else contextlib.nullcontext():
            task(*batch(seed=20 + 10 * rank + micro))['loss'].backward()


def _ddp_worker(rank: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist
    dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=2)
    try:
        _, local = make_task('feature')
        _two_micro_steps(local, rank, contextlib.nullcontext)
        _, task = make_task('feature')
        task.prepare_distributed()
        _two_micro_steps(task, rank, task.no_sync)
        torch.save({'local': _trainable_grads(local), 'ddp': _trainable_grads(task)},
                   os.path.join(out_dir, f'rank{rank}.pt'))
    finally:
        dist.destroy_process_group()


def test_ddp_averages_the_gradients_of_heads_projection_and_student_across_two_ranks(tmp_path):
    mp.spawn(_ddp_worker, args=(str(tmp_path / 'init'), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f'rank{r}.pt') for r in range(2)]
    names = set(ranks[0]['ddp'])
    assert {'heads.0.mlp.0.weight', 'module.projection.weight', 'module.student.head.weight'} <= names
    assert not torch.equal(ranks[0]['local']['heads.0.mlp.0.weight'], ranks[1]['local']['heads.0.mlp.0.weight'])
    for name in names:
        mean = (ranks[0]['local'][name] + ranks[1]['local'][name]) / 2
        for rank in ranks:
            torch.testing.assert_close(rank['ddp'][name], mean, msg=name)


def test_an_explicit_device_wins_over_the_base_tasks():
    # 'meta' is the one device besides the CPU that every machine has: the heads and task follow `device=`
    student = make_student('logit')
    task = DRLocTask(student, hidden_dim=16, base_task=make_base('logit', student), device=torch.device('meta'),
                     verbose=False)
    assert task.device == torch.device('meta')
    assert {p.device.type for p in heads_of(task).parameters()} == {'meta'}


def test_the_base_tasks_device_and_dtype_are_the_default():
    student = make_student('logit')
    base = BASE_TASKS['logit'](student, make_teacher(), device=torch.device('meta'), dtype=torch.bfloat16,
                               verbose=False)
    task = DRLocTask(student, hidden_dim=16, base_task=base, verbose=False)
    assert (task.device, task.dtype) == (torch.device('meta'), torch.bfloat16)
    assert {p.device.type for p in heads_of(task).parameters()} == {'meta'}


def test_compile_gives_the_base_task_the_backend_and_mode(monkeypatch):
    # the base task compiles its own module and teacher: with the options DRLocTask.compile() was given
    _, task = make_task('logit')
    calls = []
    monkeypatch.setattr(torch, 'compile', lambda module, **options: calls.append(options) or module)
    task.compile(backend='eager', mode='max-autotune', dynamic=False)
    assert len(calls) >= 3  # the base task's student and teacher, then backbone with heads
    assert all(options == dict(backend='eager', mode='max-autotune', dynamic=False) for options in calls), calls


class _HeadsKeyTask(FeatureDistillationTask):
    """A base task whose own task state has an entry named as DRLoc's."""

    def get_task_state(self, module=None, ema=False):
        return {'drloc_heads': {}}


def test_a_base_task_keeping_state_named_drloc_heads_is_refused_by_name():
    student = make_student('feature')
    task = DRLocTask(student, hidden_dim=16, base_task=_HeadsKeyTask(student, make_teacher(), verbose=False),
                     verbose=False)
    with pytest.raises(RuntimeError, match=r"_HeadsKeyTask keeps task state named 'drloc_heads' too; DRLoc "
                                           r"cannot be added to it"):
        task.get_task_state()


class _EagerBaseTask(LogitDistillationTask):
    """A base task that compiles nothing itself (TrainingTask.compile's default: None)."""

    def compile(self, backend='inductor', mode=None, **compile_kwargs):
        return None


def test_over_a_base_task_that_compiles_nothing_the_eval_model_is_compiled_with_the_options(monkeypatch):
    student = make_student('logit')
    task = DRLocTask(student, hidden_dim=16, base_task=_EagerBaseTask(student, make_teacher(), verbose=False),
                     verbose=False)
    trainable = task.get_trainable_module()
    calls = []
    monkeypatch.setattr(torch, 'compile', lambda module, **options: calls.append((module, options)) or module)
    eval_model = task.compile(backend='eager', mode='max-autotune')
    assert eval_model is student
    assert calls == [(student, dict(backend='eager', mode='max-autotune')),
                     (trainable, dict(backend='eager', mode='max-autotune'))]


class _FailingCompileTask(LogitDistillationTask):
    def compile(self, backend='inductor', mode=None, **compile_kwargs):
        raise RuntimeError('no compiler here')


def test_a_base_task_whose_compile_fails_keeps_the_module_with_the_heads():
    student = make_student('logit')
    base = _FailingCompileTask(student, make_teacher(), verbose=False)
    task = DRLocTask(student, hidden_dim=16, base_task=base, verbose=False)
    trainable = task.get_trainable_module()
    with pytest.raises(RuntimeError, match='no compiler here'):
        task.compile(backend='eager')
    assert base.trainable_module is trainable and task.get_trainable_module() is trainable
    task.train()
    assert torch.isfinite(task(*batch())['drloc_loss'])


class _Scaled(nn.Module):
    """A trainable module whose forward takes more than the images."""

    def __init__(self, student: nn.Module):
        super().__init__()
        self.student = student

    def forward(self, x, scale, shift=0.0):
        return self.student(x) * scale + shift


@pytest.mark.parametrize('train', [True, False])
def test_the_wrapper_hands_the_inner_module_every_argument(train):
    from timm_drloc.trainable import DRLocTrainableModule
    student = make_student('logit')
    drloc = wrap(student, hidden_dim=16, layers=['blocks.1'])
    module = DRLocTrainableModule(drloc.heads, _Scaled(student), drloc.reader).train(train)
    images = batch()[0]
    with torch.no_grad():
        expected = student.eval()(images) * 2.0 + 1.0
        module.train(train)
        student.train(False)  # no dropout in these students: train and eval give the same logits
        torch.testing.assert_close(module(images, 2.0, shift=1.0), expected)
    if train:
        assert torch.isfinite(module.pop_drloc_loss())
