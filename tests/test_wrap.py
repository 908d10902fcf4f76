"""wrap() / DRLocModel / unwrap() on real timm models and a user CNN."""
import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

import timm_drloc
from timm_drloc import DRLocModel, DRLocOutput, unwrap, wrap

# (model name, create_model kwargs, input size, expected grid, layout, prefix tokens)
MODELS = {
    'vit_cls': ('vit_tiny_patch16_224', dict(img_size=32, depth=2), 32, (2, 2), 'NLC', 1),
    'vit_registers': ('vit_tiny_patch16_224', dict(img_size=32, depth=2, reg_tokens=4), 32, (2, 2), 'NLC', 5),
    'deit_distilled': ('deit_tiny_distilled_patch16_224', dict(img_size=32, depth=2), 32, (2, 2), 'NLC', 2),
    'swin': ('swin_tiny_patch4_window7_224', dict(img_size=64, window_size=2, depths=(1, 1, 1, 1)), 64, (2, 2), 'NHWC', 0),
    'convnext': ('convnext_atto', {}, 64, (2, 2), 'NCHW', 0),
    'resnet': ('resnet18', {}, 64, (2, 2), 'NCHW', 0),
    'efficientnet': ('efficientnet_b0', {}, 64, (2, 2), 'NCHW', 0),
}


def make(key, **model_kwargs):
    name, kwargs, size, *_ = MODELS[key]
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=5, **{**kwargs, **model_kwargs})
    return model, torch.randn(2, 3, size, size)


class TinyCNN(nn.Module):
    """A user model with no timm metadata at all."""

    def __init__(self, in_chans: int = 3):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(in_chans, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2, padding=1))
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        return self.fc(self.features(x).mean((2, 3)))


@pytest.mark.parametrize('key', list(MODELS))
def test_grid_found_and_gradients_reach_backbone_and_heads(key):
    model, x = make(key)
    _, _, _, grid, layout, prefix = MODELS[key]
    drloc = wrap(model, hidden_dim=32, input_size=(3, *x.shape[-2:]))
    source, = drloc.sources
    assert (source.grid_size, source.layout, source.num_prefix_tokens) == (grid, layout, prefix)
    assert source.num_chs == model.feature_info[-1]['num_chs']

    logits, drloc_loss = drloc(x)
    assert logits.shape == (2, 5)
    assert drloc_loss.ndim == 0 and drloc_loss.dtype == torch.float32 and drloc_loss > 0
    (F.cross_entropy(logits, torch.tensor([0, 1])) + drloc_loss).backward()
    first_param = next(model.parameters())
    assert first_param.grad is not None and first_param.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in drloc.heads.parameters())


@pytest.mark.parametrize('key', list(MODELS))
def test_eval_logits_identical_to_unwrapped_model_and_train_logits_too(key):
    model, x = make(key)
    drloc = wrap(model, hidden_dim=16, input_size=(3, *x.shape[-2:]))
    drloc.eval()
    out = drloc(x)
    assert isinstance(out, torch.Tensor)
    assert torch.equal(out, model(x))
    if key in ('vit_cls', 'convnext'):  # no batch norm, dropout or drop path: train logits match the train forward
        model.train()
        expected = model(x)
        drloc.train()
        assert torch.equal(drloc(x).logits, expected)


def test_backbone_runs_once_per_call():
    model, x = make('resnet')
    calls = []
    model.register_forward_hook(lambda *a: calls.append(1))
    drloc = wrap(model, hidden_dim=16, input_size=(3, 64, 64))
    calls.clear()
    drloc(x)
    assert len(calls) == 1


def test_user_cnn_through_layers():
    model = TinyCNN()
    drloc = wrap(model, layers=['features'], input_size=(3, 32, 32), hidden_dim=16)
    source, = drloc.sources
    assert (source.grid_size, source.num_chs, source.layout) == ((8, 8), 16, 'NCHW')
    logits, loss = drloc(torch.randn(3, 3, 32, 32))
    assert logits.shape == (3, 4) and loss > 0


def test_user_model_without_layers_is_refused():
    with pytest.raises(ValueError, match=r"TinyCNN has no timm feature_info.*layers=\['module.path'\]"):
        wrap(TinyCNN())


def test_layers_naming_no_module_is_refused():
    with pytest.raises(ValueError, match="no module named 'feature'.*Some module names it has: \\['features'"):
        wrap(TinyCNN(), layers=['feature'], input_size=(3, 32, 32))


def test_model_without_spatial_output_is_refused():
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 16), nn.ReLU(), nn.Linear(16, 2))
    with pytest.raises(ValueError, match=r'has no spatial grid'):
        wrap(model, layers=['1'], input_size=(3, 8, 8))


def test_1x1_grid_is_refused():
    model = timm.create_model('resnet18', num_classes=3)
    with pytest.raises(ValueError, match='grid is 1x1: a single cell has no relative position'):
        wrap(model, input_size=(3, 32, 32))


def test_wrap_twice_is_refused():
    model, _ = make('resnet')
    drloc = wrap(model, hidden_dim=16, input_size=(3, 64, 64))
    with pytest.raises(ValueError, match='already wrapped'):
        wrap(drloc)


def test_multiscale_one_head_per_stage():
    model, x = make('swin')
    drloc = wrap(model, multiscale=True, hidden_dim=16)
    assert [s.name for s in drloc.sources] == ['layers.0', 'layers.1', 'layers.2', 'layers.3']
    assert [s.grid_size for s in drloc.sources] == [(16, 16), (8, 8), (4, 4), (2, 2)]
    assert len(drloc.heads) == 4
    torch.manual_seed(3)
    _, total = drloc(x)
    # the loss is the sum of the per-stage losses (same random draws replayed)
    torch.manual_seed(3)
    _, feats = drloc.forward_logits_and_features(x)
    per_stage = [head(timm_drloc.grids.to_grid(f, s, (64, 64))) for head, s, f in zip(drloc.heads, drloc.sources, feats)]
    torch.testing.assert_close(total, sum(per_stage))


def test_multiscale_on_resnet_skips_the_stride_2_stem():
    model, _ = make('resnet')
    drloc = wrap(model, multiscale=True, hidden_dim=16, input_size=(3, 64, 64))
    assert [s.grid_size for s in drloc.sources] == [(16, 16), (8, 8), (4, 4), (2, 2)]
    assert [s.name for s in drloc.sources] == ['layer1', 'layer2', 'layer3', 'layer4']


def test_multiscale_on_single_scale_vit_is_refused():
    model, _ = make('vit_cls')
    with pytest.raises(ValueError, match='multiscale=True needs a hierarchical model.*Use multiscale=False') as error:
        wrap(model, multiscale=True)
    strides = sorted({e['reduction'] for e in model.feature_info})  # one stride: every block's
    assert f'VisionTransformer has features at stride(s) {strides} only' in str(error.value)



def test_multiscale_on_a_two_stage_swin_with_patch_size_2_is_refused_and_the_named_layers_train_a_head_each():
    model, x = make('swin', img_size=32, patch_size=2, depths=(1, 1), num_heads=(1, 1), embed_dim=16)
    with pytest.raises(ValueError) as error:
        wrap(model, multiscale=True)
    assert "features at strides [2, 4], so one stage at most" in str(error.value)
    named = str(error.value).split('layers=')[1].rstrip('.')
    assert named == "['layers.0', 'layers.1']"
    drloc = wrap(model, layers=['layers.0', 'layers.1'], hidden_dim=16, input_size=(3, 32, 32))
    assert [s.grid_size for s in drloc.sources] == [(16, 16), (8, 8)]
    _, drloc_loss = drloc(x[..., :32, :32])
    drloc_loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in drloc.heads.parameters())

def test_non_square_input_gives_non_square_grid():
    model = timm.create_model('resnet18', num_classes=3)
    drloc = wrap(model, input_size=(3, 224, 160), hidden_dim=16)
    assert drloc.sources[0].grid_size == (7, 5)
    seen = {}
    drloc.heads[0].register_forward_pre_hook(lambda m, args: seen.update(shape=tuple(args[0].shape)))
    drloc(torch.randn(1, 3, 224, 160))
    assert seen['shape'] == (1, 7, 5, 512)


def test_vit_dynamic_img_size_reads_the_grid_of_each_input():
    model = timm.create_model('vit_tiny_patch16_224', img_size=32, depth=2, dynamic_img_size=True, num_classes=3)
    drloc = wrap(model, hidden_dim=16)
    seen = []
    drloc.heads[0].register_forward_pre_hook(lambda m, args: seen.append(tuple(args[0].shape[1:3])))
    for size in [(32, 32), (48, 32), (64, 80)]:
        logits, loss = drloc(torch.randn(2, 3, *size))
        assert torch.isfinite(loss)
    assert seen == [(2, 2), (3, 2), (4, 5)]


def test_state_dict_keys_unchanged_and_model_is_the_original_object():
    model, _ = make('vit_cls')
    keys = list(model.state_dict())
    drloc = wrap(model, hidden_dim=16)
    assert drloc.model is model
    assert list(drloc.model.state_dict()) == keys
    assert list(model.state_dict()) == keys
    head_keys = [k for k in drloc.state_dict() if k.startswith('heads.')]
    assert head_keys and all(k[len('model.'):] in keys for k in drloc.state_dict() if k.startswith('model.'))


def test_remove_hooks_leaves_the_backbone_as_before_wrap():
    model, x = make('resnet')
    hooks_before = {name: len(m._forward_hooks) for name, m in model.named_modules()}
    drloc = wrap(model, hidden_dim=16)
    assert sum(len(m._forward_hooks) for m in model.modules()) > sum(hooks_before.values())
    drloc.remove_hooks()
    assert {name: len(m._forward_hooks) for name, m in model.named_modules()} == hooks_before
    model.eval()
    expected = model(x)
    drloc.eval()
    assert torch.equal(drloc(x), expected)  # eval still runs the backbone alone
    drloc.train()
    with pytest.raises(RuntimeError, match=r'remove_hooks\(\) was called'):
        drloc(x)


def test_unwrap_through_drloc_compile_and_ddp(tmp_path):
    import torch.distributed as dist
    model, _ = make('resnet')
    drloc = wrap(model, hidden_dim=16, input_size=(3, 64, 64))
    assert unwrap(drloc) is model
    assert unwrap(torch.compile(drloc)) is model
    dist.init_process_group('gloo', init_method=f'file://{tmp_path}/pg', rank=0, world_size=1)
    try:
        ddp = nn.parallel.DistributedDataParallel(drloc)
        assert unwrap(ddp) is model
        assert unwrap(torch.compile(ddp)) is model
    finally:
        dist.destroy_process_group()
    assert unwrap(model) is model


def test_layer_decay_optimizer_works_on_drloc_model():
    from timm.optim import create_optimizer_v2
    model, _ = make('vit_cls')
    drloc = wrap(model, hidden_dim=16)
    optimizer = create_optimizer_v2(drloc, 'adamw', lr=1e-3, weight_decay=0.05, layer_decay=0.5)
    by_param = {}
    for group in optimizer.param_groups:
        for p in group['params']:
            by_param[p] = group
    pos_embed_group = by_param[model.pos_embed]
    head_group = by_param[drloc.heads[0].mlp[0].weight]
    assert pos_embed_group['weight_decay'] == 0.  # no_weight_decay passed through
    assert pos_embed_group['lr_scale'] < head_group['lr_scale'] == 1.0  # layer decay applies to the backbone
    assert by_param[model.blocks[1].mlp.fc1.weight]['lr_scale'] > by_param[model.blocks[0].mlp.fc1.weight]['lr_scale']
    assert sum(len(g['params']) for g in optimizer.param_groups) == len(list(drloc.parameters()))


@pytest.mark.slow
def test_drloc_loss_decreases_when_training_on_a_fixed_batch():
    torch.manual_seed(0)
    model = timm.create_model(
        'vit_tiny_patch16_224', img_size=32, patch_size=8, depth=2, embed_dim=64, num_heads=2, num_classes=3)
    drloc = wrap(model, hidden_dim=64, num_samples=64)
    x = torch.randn(8, 3, 32, 32)
    optimizer = torch.optim.AdamW(drloc.parameters(), lr=3e-3)
    losses = []
    for _ in range(80):
        _, loss = drloc(x)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    # 4x4 grid, |offsets| in 0..3: the best position-blind guess (the median, 1) has an L1 loss of 0.75;
    # only embeddings that know where they are get below it
    assert last < 0.5 < 0.75 < first


def test_output_is_a_named_tuple():
    model, x = make('convnext')
    drloc = wrap(model, hidden_dim=16, input_size=(3, 64, 64))
    assert isinstance(drloc, DRLocModel)
    out = drloc(x)
    assert isinstance(out, DRLocOutput) and out.logits is out[0] and out.drloc_loss is out[1]


class TupleStage(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=4, padding=1)

    def forward(self, x):
        y = self.conv(x)
        return y, y.mean((2, 3))  # a grid and a pooled summary, as multi-output stages return


class TupleModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.stage = TupleStage()
        self.fc = nn.Linear(16, 3)

    def forward(self, x):
        grid, pooled = self.stage(x)
        return self.fc(torch.cat((grid.amax((2, 3)), pooled), 1))


def test_module_with_tuple_output_reads_its_grid_and_keeps_the_model_running():
    model = TupleModel()
    drloc = wrap(model, layers=['stage'], input_size=(3, 32, 32), hidden_dim=8)
    assert drloc.sources[0].grid_size == (8, 8) and drloc.sources[0].num_chs == 8
    x = torch.randn(2, 3, 32, 32)
    logits, loss = drloc(x)
    assert loss > 0
    drloc.eval()
    assert torch.equal(drloc(x), model(x))


@pytest.mark.parametrize('name,kwargs,size,grid,prefix', [
    ('cait_xxs24_224', dict(img_size=64, depth=2), 64, (4, 4), 0),    # blocks output patch tokens only
    ('xcit_nano_12_p8_224', dict(img_size=32, depth=2), 32, (4, 4), 0),
])
def test_token_models_whose_blocks_carry_no_class_token(name, kwargs, size, grid, prefix):
    model = timm.create_model(name, num_classes=3, **kwargs)
    assert model.num_prefix_tokens == 1  # the model's own count, which its block outputs do not have
    drloc = wrap(model, hidden_dim=8)
    assert (drloc.sources[0].grid_size, drloc.sources[0].num_prefix_tokens) == (grid, prefix)
    logits, loss = drloc(torch.randn(2, 3, size, size))
    assert logits.shape == (2, 3) and loss > 0


def test_multi_branch_output_reads_the_feature_info_branch():
    model = timm.create_model('crossvit_tiny_240', num_classes=3)
    drloc = wrap(model, hidden_dim=8)
    source = drloc.sources[0]
    assert source.num_chs == model.feature_info[-1]['num_chs'] == 192 and source.output_index == 1
    assert source.grid_size == (14, 14)


@pytest.mark.slow
def test_repeated_feature_info_names_use_the_last_stage():
    model = timm.create_model('coat_tiny', num_classes=3, img_size=64)
    drloc = wrap(model, hidden_dim=8, input_size=(3, 64, 64))
    assert drloc.route == 'intermediates'
    assert drloc.sources[0].grid_size == (2, 2)  # stride 32, not the first of the three same-named entries
    logits, loss = drloc(torch.randn(2, 3, 64, 64))
    assert logits.shape == (2, 3) and loss > 0


def test_grids_read_through_forward_intermediates_leave_no_hooks_on_the_model():
    model = timm.create_model('hiera_tiny_224', num_classes=3, img_size=(64, 64), embed_dim=16, num_heads=1,
                              stages=(1, 1, 1, 1))
    drloc = wrap(model, multiscale=True, hidden_dim=8, input_size=(3, 64, 64))
    assert drloc.route == 'intermediates'
    assert [s.grid_size for s in drloc.sources] == [(16, 16), (8, 8), (4, 4), (2, 2)]
    assert sum(len(m._forward_hooks) for m in model.modules()) == 0  # nothing captures (and keeps) block outputs
    _, loss = drloc(torch.randn(2, 3, 64, 64))
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in drloc.heads.parameters())

@pytest.mark.slow
def test_hiera_multiscale_grids_are_in_row_major_order():
    model = timm.create_model('hiera_tiny_224', num_classes=3).eval()
    drloc = wrap(model, multiscale=True, hidden_dim=8)
    x = torch.randn(1, 3, 224, 224)
    _, feats = drloc.forward_logits_and_features(x)
    grids = [timm_drloc.grids.to_grid(f, s, (224, 224)) for f, s in zip(feats, drloc.sources)]
    _, reference = model.forward_intermediates(x, indices=4, norm=False)  # NCHW, rows in image order
    assert [tuple(g.shape[1:3]) for g in grids] == [(56, 56), (28, 28), (14, 14), (7, 7)]
    for grid, ref in zip(grids, reference):
        torch.testing.assert_close(grid, ref.permute(0, 2, 3, 1))


# ---- the probe input comes from the model: channels and built size -------------------------------------

def _gray_vit():
    from timm.models.vision_transformer import VisionTransformer
    return VisionTransformer(img_size=32, patch_size=8, in_chans=1, depth=1, embed_dim=32, num_heads=2, num_classes=4)


# (builder, wrap kwargs, probe input the model was built for, training batch)
BUILT_FOR = {
    'vit_class_1ch': (_gray_vit, {}, (1, 32, 32), (2, 1, 32, 32)),
    'resnet_create_model_1ch': (lambda: timm.create_model('resnet10t', in_chans=1, num_classes=4), {},
                                (1, 176, 176), (2, 1, 64, 64)),
    'convnext_4ch': (lambda: timm.create_model('convnext_atto', in_chans=4, num_classes=4), {}, (4, 224, 224),
                     (2, 4, 64, 64)),
    'user_cnn_1ch': (lambda: TinyCNN(in_chans=1), dict(layers=['features']), (1, 224, 224), (2, 1, 32, 32)),
    # a fixed-size model whose input embedding is not called patch_embed: MLP-Mixer's stem records the size
    'mixer_built_at_64': (lambda: timm.models.MlpMixer(img_size=64, patch_size=16, num_blocks=2, embed_dim=32,
                                                       num_classes=4), {}, (3, 64, 64), (2, 3, 64, 64)),
}


@pytest.mark.parametrize('key', list(BUILT_FOR))
def test_wrap_probes_with_the_channels_and_size_the_model_was_built_for_and_trains(key):
    build, kwargs, built_for, batch_shape = BUILT_FOR[key]
    torch.manual_seed(0)
    model = build()
    drloc = wrap(model, hidden_dim=16, **kwargs)  # no input_size: the model says what it takes
    assert drloc.sources[0].input_size == built_for[1:]
    assert timm_drloc.grids.default_input_size(model) == built_for

    before = [p.detach().clone() for p in drloc.parameters()]
    optimizer = torch.optim.SGD(drloc.parameters(), lr=0.1)
    logits, drloc_loss = drloc(torch.randn(*batch_shape))
    loss = F.cross_entropy(logits, torch.tensor([0, 3])) + 0.5 * drloc_loss
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss) and drloc_loss > 0
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))


def test_input_size_argument_still_overrides_what_the_model_says():
    drloc = wrap(_gray_vit(), hidden_dim=16, input_size=(1, 32, 32))
    assert drloc.sources[0].grid_size == (4, 4)
    with pytest.raises(ValueError, match=r'probe pass of VisionTransformer on an input of \(3, 32, 32\) failed'):
        wrap(_gray_vit(), hidden_dim=16, input_size=(3, 32, 32))


# ---- heads follow the model's dtype; the loss stays float32 ---------------------------------------------

@pytest.mark.parametrize('mode', ['l1', 'ce', 'cbr'])
@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16], ids=['bf16', 'fp16'])
def test_heads_take_the_dtype_of_a_low_precision_model_and_the_loss_is_float32(mode, dtype):
    torch.manual_seed(0)
    model = timm.create_model('vit_tiny_patch16_224', img_size=32, patch_size=8, depth=1, embed_dim=32,
                              num_heads=2, num_classes=4).to(dtype)
    drloc = wrap(model, mode=mode, hidden_dim=16)
    assert {p.dtype for p in drloc.heads.parameters()} == {dtype}
    logits, drloc_loss = drloc(torch.randn(2, 3, 32, 32, dtype=dtype))
    assert logits.dtype == dtype and drloc_loss.dtype == torch.float32 and torch.isfinite(drloc_loss)
    drloc_loss.backward()
    assert all(p.grad is not None and p.grad.dtype == dtype for p in drloc.heads.parameters())


# ---- bad input to wrap() and DRLocModel: one clear error each ----------------------------------------------

@pytest.mark.parametrize('mode', ['eval', 'train'])
def test_wrapper_takes_the_mode_of_the_model_it_wraps(mode):
    model, x = make('resnet')
    getattr(model, mode)()
    drloc = wrap(model, hidden_dim=16, input_size=(3, 64, 64))
    assert drloc.training == model.training == (mode == 'train')
    assert all(h.training == model.training for h in drloc.heads.modules())
    if mode == 'eval':
        assert torch.equal(drloc(x), model(x))  # an eval wrapper returns the plain logits


def test_attention_tensor_named_in_layers_is_not_read_as_a_grid():
    # q_norm outputs (B, heads, tokens, head_dim) = (1, 2, 17, 16) here: close to a 17x16 NCHW map of 2 channels
    model = timm.create_model('vit_tiny_patch16_224', img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2,
                              num_classes=3)
    with pytest.raises(ValueError, match=r'\(1, 2, 17, 16\) for an input of \(32, 32\) is not a spatial grid'):
        wrap(model, layers=['blocks.1.attn.q_norm'], hidden_dim=8)
    assert wrap(model, layers=['blocks.1'], hidden_dim=8).sources[0].grid_size == (4, 4)  # the tokens still are


def test_empty_layers_list_is_refused_with_its_own_message():
    from timm_drloc.errors import SettingError
    with pytest.raises(SettingError, match=r"layers=\[\] names no module.*layers=None") as error:
        wrap(TinyCNN(), layers=[], input_size=(3, 32, 32))
    assert error.value.setting == 'layers'  # what maps it to --drloc-layers on the command line
    assert error.value.message({'layers': '--drloc-layers'}).startswith('--drloc-layers=[] names no module')


def test_a_layer_named_twice_is_refused():
    from timm_drloc.errors import SettingError
    with pytest.raises(SettingError) as error:
        wrap(TinyCNN(), layers=['features', 'features'], input_size=(3, 32, 32))
    assert (error.value.setting, str(error.value)) == (
        'layers', "layers names ['features'] more than once; name each grid module once")


def test_numpy_integers_are_valid_sample_and_width_counts():
    import numpy as np
    drloc = wrap(TinyCNN(), layers=['features'], input_size=(3, 32, 32), num_samples=np.int64(16),
                 hidden_dim=np.int32(8))
    head = drloc.heads[0]
    assert head.num_samples == 16 and type(head.num_samples) is int and head.mlp[0].out_features == 8
    _, loss = drloc(torch.randn(2, 3, 32, 32))
    assert torch.isfinite(loss)


def test_an_image_without_its_batch_dimension_is_refused_naming_the_layout():
    drloc = wrap(TinyCNN(), layers=['features'], input_size=(3, 32, 32), hidden_dim=8)
    with pytest.raises(ValueError, match=r'needs a batch of images, \(B, C, H, W\), got a 3-D input of shape '
                                         r'\(3, 32, 32\)\. Add the batch dimension with x.unsqueeze\(0\)'):
        drloc(torch.randn(3, 32, 32))
    with pytest.raises(ValueError) as error:  # other ranks: the shape, and no unsqueeze advice
        drloc(torch.randn(2, 3 * 32 * 32))
    assert str(error.value) == 'DRLocModel needs a batch of images, (B, C, H, W), got a 2-D input of shape (2, 3072).'


@pytest.mark.parametrize('setting', [dict(hidden_dim=10 ** 9), dict(num_samples=10 ** 13)],
                         ids=['hidden_dim', 'num_samples'])
def test_heads_larger_than_the_device_memory_are_refused_before_allocation(setting):
    from timm_drloc.head import HeadTooLargeError, device_memory
    with pytest.raises(HeadTooLargeError) as exc:
        wrap(TinyCNN(), layers=['features'], input_size=(3, 32, 32), **setting)
    assert exc.value.memory.total > exc.value.available == device_memory(torch.device('cpu'))
    name, value = next(iter(setting.items()))
    assert f'{name}={value}' in str(exc.value) and 'the reference uses 512 and 64' in str(exc.value)


@pytest.mark.parametrize('size', [(32, 32), (1, 3, 32, 32), 32])  # 32: a side alone
def test_an_input_size_that_is_not_channels_height_width_is_refused_naming_it(size):
    with pytest.raises(ValueError) as error:
        wrap(TinyCNN(), layers=['features'], input_size=size)
    assert str(error.value) == f"input_size must be (C, H, W), got {size}."


def test_the_memory_check_of_wrap_counts_the_heads_mode(monkeypatch):
    # a device with room for l1's two outputs per pair but not for ce's offset classes: only ce is refused
    import timm_drloc.head as head_module
    from timm_drloc.head import HeadTooLargeError, head_memory
    grids = [(16, (8, 8))]  # TinyCNN's 'features' grid at 32 px
    l1 = head_memory(grids, 8, 64, 'l1', True).total
    ce = head_memory(grids, 8, 64, 'ce', True).total
    assert l1 < ce
    monkeypatch.setattr(head_module, 'device_memory', lambda device: (l1 + ce) // 2)
    assert wrap(TinyCNN(), layers=['features'], input_size=(3, 32, 32), hidden_dim=8).heads[0].mode == 'l1'
    with pytest.raises(HeadTooLargeError):
        wrap(TinyCNN(), layers=['features'], input_size=(3, 32, 32), hidden_dim=8, mode='ce')


def test_an_unknown_mode_is_refused_by_wrap_before_the_model_is_probed():
    # settings first: the probe pass (and its errors, here a layer the model lacks) would cost time for nothing
    from timm_drloc.errors import SettingError
    with pytest.raises(SettingError) as error:
        wrap(TinyCNN(), layers=['nowhere'], input_size=(3, 32, 32), hidden_dim=8, mode='l2')
    assert (error.value.setting, str(error.value)) == ('mode', "mode must be one of l1, ce, cbr, got 'l2'")


@pytest.mark.parametrize('setting, kwargs, message', [
    ('multiscale', dict(multiscale=True), 'multiscale picks the stages itself; with layers name each grid module instead'),
    ('hidden_dim', dict(hidden_dim=0), 'hidden_dim must be an integer >= 1, got 0; the reference uses 512'),
    ('compile_head', dict(compile_head='fast'), 'compile_head must be True, False or a torch.compile mode (default, '
                                                "reduce-overhead, max-autotune, max-autotune-no-cudagraphs), got 'fast'"),
])
def test_multiscale_hidden_dim_and_compile_head_are_refused_by_wrap_before_the_model_is_probed(setting, kwargs, message):
    from timm_drloc.errors import SettingError
    with pytest.raises(SettingError) as error:
        wrap(TinyCNN(), layers=['nowhere'], input_size=(3, 32, 32), **{'hidden_dim': 8, **kwargs})
    assert (error.value.setting, str(error.value)) == (setting, message)


@pytest.mark.parametrize('mode', ['l1', 'ce', 'cbr'])
def test_wrap_builds_heads_of_the_mode_asked_for(mode):
    # l1 regresses 2 numbers; ce and cbr score every offset per axis from a hidden-wide output
    model = wrap(TinyCNN(), layers=['features'], input_size=(3, 32, 32), hidden_dim=8, mode=mode)
    [head] = model.heads
    assert head.mode == mode
    assert head.mlp[4].out_features == (2 if mode == 'l1' else 8)
    assert (head.axis_heads is None) == (mode == 'l1')
