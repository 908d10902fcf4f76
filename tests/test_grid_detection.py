"""How wrap() finds and reads grids in models of every shape: layouts given or detected, thin and ambiguous
grids, tokens that no longer fit, the forward_intermediates route, and what wrap() refuses, word for word."""
import gc
import weakref

import pytest
import timm
import torch
import torch.nn as nn

from timm_drloc import DRLocHead, relative_targets, wrap
from timm_drloc.errors import SettingError
from timm_drloc.grids import GridReader, GridSource, Route, probe_grids


def grid_received(drloc, x):
    seen = []
    handle = drloc.heads[0].register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    drloc.train()
    drloc(x)
    handle.remove()
    return seen[0]


class Stage(nn.Module):
    """One stride-4 conv whose output is given in `layout`: NCHW, NHWC, or NLC tokens of a pooled 4 x 4 grid."""

    def __init__(self, channels: int, layout: str):
        super().__init__()
        self.conv = nn.Conv2d(3, channels, 3, stride=4, padding=1)
        self.layout = layout

    def forward(self, x):
        y = self.conv(x)  # B, C, H, W
        if self.layout == 'NHWC':
            return y.permute(0, 2, 3, 1)
        if self.layout == 'NLC':
            return nn.functional.adaptive_avg_pool2d(y, 4).flatten(2).transpose(1, 2)  # B, 16, C
        return y


class UserModel(nn.Module):
    def __init__(self, channels: int = 16, layout: str = 'NCHW'):
        super().__init__()
        self.stage = Stage(channels, layout)
        self.fc = nn.Linear(channels, 2)

    def forward(self, x):
        y = self.stage(x)
        return self.fc(y.mean(1) if y.ndim == 3 else y.mean((1, 2) if self.stage.layout == 'NHWC' else (2, 3)))


def test_a_one_row_grid_is_a_grid():
    model = timm.create_model('resnet10t', num_classes=3)
    drloc = wrap(model, hidden_dim=8, input_size=(3, 32, 64))
    assert drloc.sources[0].grid_size == (1, 2)
    assert grid_received(drloc, torch.randn(2, 3, 32, 64)).shape == (2, 1, 2, 512)


def test_user_module_with_nhwc_output_is_detected_and_read_as_is():
    model = UserModel(layout='NHWC')
    drloc = wrap(model, layers=['stage'], input_size=(3, 32, 32), hidden_dim=8)
    assert (drloc.sources[0].layout, drloc.sources[0].grid_size, drloc.sources[0].num_chs) == ('NHWC', (8, 8), 16)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(grid_received(drloc, x), model.stage(x), rtol=0, atol=0)


@pytest.mark.parametrize('layout,output_fmt,read_as', [
    (None, None, 'NCHW'), ('NCHW', None, 'NCHW'), ('NHWC', None, 'NHWC'), (None, 'NHWC', 'NHWC')])
def test_grid_with_as_many_channels_as_rows_is_read_as_given_or_as_the_models_output_fmt(layout, output_fmt, read_as):
    model = UserModel(channels=8)  # B, 8, 8, 8: NCHW and NHWC both fit
    if output_fmt:
        model.output_fmt = output_fmt  # as timm's NHWC models (Swin...) say
    drloc = wrap(model, layers=['stage'], input_size=(3, 32, 32), hidden_dim=8, layout=layout)
    x = torch.randn(2, 3, 32, 32)
    features = model.stage(x)
    expected = features if read_as == 'NHWC' else features.permute(0, 2, 3, 1)
    assert drloc.sources[0].layout == read_as
    torch.testing.assert_close(grid_received(drloc, x), expected, rtol=0, atol=0)


def test_layout_given_for_a_non_square_map_sets_rows_and_columns():
    model = UserModel()
    drloc = wrap(model, layers=['stage'], input_size=(3, 32, 48), hidden_dim=8, layout='NCHW')
    assert (drloc.sources[0].grid_size, drloc.sources[0].num_chs) == ((8, 12), 16)


def test_tokens_that_do_not_grow_with_the_input_are_refused_naming_the_count():
    model = UserModel(layout='NLC')  # always 16 tokens
    drloc = wrap(model, layers=['stage'], input_size=(3, 32, 32), hidden_dim=8)
    assert (drloc.sources[0].layout, drloc.sources[0].grid_size) == ('NLC', (4, 4))
    with pytest.raises(ValueError, match=r"Cannot split 16 tokens of 'stage' into a grid for an input of \(64, 64\) "
                                         r"\(the probe saw a 4x4 grid for \(32, 32\)\)"):
        drloc(torch.randn(2, 3, 64, 64))


class TwoStrides(nn.Module):
    """A user model with timm-style feature_info at strides 2 (stem), 4 and 8."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.s1 = nn.Conv2d(4, 8, 3, stride=2, padding=1)
        self.s2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.fc = nn.Linear(16, 2)
        self.feature_info = [dict(module='stem', num_chs=4, reduction=2), dict(module='s1', num_chs=8, reduction=4),
                             dict(module='s2', num_chs=16, reduction=8)]

    def forward(self, x):
        return self.fc(self.s2(self.s1(self.stem(x))).mean((2, 3)))


def test_multiscale_on_a_model_with_two_stage_strides_has_a_head_for_each():
    drloc = wrap(TwoStrides(), multiscale=True, input_size=(3, 32, 32), hidden_dim=8)
    assert [(s.name, s.grid_size) for s in drloc.sources] == [('s1', (8, 8)), ('s2', (4, 4))]
    assert wrap(TwoStrides(), input_size=(3, 32, 32), hidden_dim=8).sources[0].name == 's2'


class Intermediates(nn.Module):
    """feature_info names a ModuleList (iterated, never called): only forward_intermediates gives the grid."""

    def __init__(self):
        super().__init__()
        self.stages = nn.ModuleList([nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.Conv2d(8, 8, 3, stride=2, padding=1)])
        self.fc = nn.Linear(8, 2)
        self.feature_info = [dict(module='stages', num_chs=8, reduction=2), dict(module='stages', num_chs=8, reduction=4)]

    def forward_intermediates(self, x, indices=None, norm=False):
        feats = []
        for i, stage in enumerate(self.stages):
            x = torch.relu(stage(x))
            if i in indices:
                feats.append(x)
        return x, feats

    def forward_head(self, x):
        return self.fc(x.mean((2, 3)))

    def forward(self, x):
        return self.forward_head(self.forward_intermediates(x, indices=[])[0])


def test_grid_of_a_container_module_comes_from_forward_intermediates():
    torch.manual_seed(0)
    model = Intermediates()
    drloc = wrap(model, input_size=(3, 32, 32), hidden_dim=8)
    assert drloc.route == 'intermediates'
    assert [(s.name, s.feature_index, s.grid_size, s.layout) for s in drloc.sources] == [('stages', 1, (8, 8), 'NCHW')]
    x = torch.randn(2, 3, 32, 32)
    logits, loss = drloc(x)
    torch.testing.assert_close(logits, model(x), rtol=0, atol=0)
    _, (expected,) = model.forward_intermediates(x, indices=[1])
    torch.testing.assert_close(grid_received(drloc, x), expected.permute(0, 2, 3, 1), rtol=0, atol=0)
    drloc.eval()
    torch.testing.assert_close(drloc(x), model(x), rtol=0, atol=0)


class Split(nn.Module):
    def forward(self, y):
        return y[:, :3], y[:, 3:]


class ConvThenTuple(nn.Module):
    """A 6-channel conv map, then a module returning a tuple, which feature_info names as the 6-channel stage;
    forward_intermediates returns the conv map."""

    def __init__(self, name: str, module: nn.Module):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, stride=4, padding=1)
        self.add_module(name, module)
        self.fc = nn.Linear(6, 2)
        self.feature_info = [dict(module=name, num_chs=6, reduction=4)]

    def forward_intermediates(self, x, indices=None, norm=False):
        y = self.conv(x)
        return y, [y] if 0 in indices else []

    def forward_head(self, y):
        return self.fc(y.mean((2, 3)))


class Branches(ConvThenTuple):
    """feature_info names a module that returns two 3-channel branches: neither is its 6-channel grid."""

    def __init__(self):
        super().__init__('split', Split())

    def forward(self, x):
        return self.forward_head(torch.cat(self.split(self.conv(x)), 1))


def test_multi_branch_module_without_the_feature_info_branch_is_read_through_forward_intermediates():
    torch.manual_seed(0)
    model = Branches()
    drloc = wrap(model, input_size=(3, 32, 32), hidden_dim=8)
    assert drloc.sources == [GridSource('split', 6, 'NCHW', 0, (8, 8), (32, 32), Route.INTERMEDIATES, 0, 0)]
    assert drloc.route == 'intermediates'
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(grid_received(drloc, x), model.conv(x).permute(0, 2, 3, 1), rtol=0, atol=0)


def test_one_module_path_may_be_given_as_a_string():
    model = UserModel()
    assert probe_grids(model, (3, 32, 48), layers='stage') == probe_grids(model, (3, 32, 48), layers=['stage'])
    assert probe_grids(model, (3, 32, 48), layers='stage')[0].grid_size == (8, 12)


def test_a_named_module_with_several_outputs_is_read_at_its_first_through_hooks():
    torch.manual_seed(0)
    model = Branches()  # layers= names the grid: no feature_info channels to pick a branch by, and no fallback
    drloc = wrap(model, layers=['split'], input_size=(3, 32, 32), hidden_dim=8)
    assert drloc.route == 'hooks'
    assert drloc.sources == [GridSource('split', 3, 'NCHW', 0, (8, 8), (32, 32), Route.HOOKS, 0, None)]
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(grid_received(drloc, x), model.conv(x)[:, :3].permute(0, 2, 3, 1), rtol=0, atol=0)


class Pooled(nn.Module):
    """A stride-4 conv pooled to a fixed 4 x 4 NCHW map: no stride of a 32 x 48 input gives 4 x 4."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, stride=4, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.fc = nn.Linear(16, 2)

    def forward(self, x):
        y = self.pool(self.conv(x))  # B, 16, 4, 4
        return self.fc(y.mean((2, 3)))


class PooledNHWC(Pooled):
    def __init__(self):
        super().__init__()
        self.out = nn.Identity()

    def forward(self, x):
        y = self.out(self.pool(self.conv(x)).permute(0, 2, 3, 1))  # B, 4, 4, 16
        return self.fc(y.mean((1, 2)))


def test_a_layout_given_is_taken_as_given_for_a_map_no_stride_of_the_input_explains():
    nchw = wrap(Pooled(), layers=['pool'], input_size=(3, 32, 48), hidden_dim=8, layout='NCHW')
    assert nchw.sources == [GridSource('pool', 16, 'NCHW', 0, (4, 4), (32, 48), Route.HOOKS, 0, None)]
    nhwc = wrap(PooledNHWC(), layers=['out'], input_size=(3, 32, 48), hidden_dim=8, layout='NHWC')
    assert nhwc.sources == [GridSource('out', 16, 'NHWC', 0, (4, 4), (32, 48), Route.HOOKS, 0, None)]


class ClassToken(nn.Module):
    """A ViT-like model that declares its one class token; 24 patch tokens of a 32 x 48 input, 25 in all."""
    num_prefix_tokens = 1

    def __init__(self):
        super().__init__()
        self.embed = nn.Conv2d(3, 8, 8, stride=8)
        self.tokens = nn.Identity()
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        patches = self.embed(x).flatten(2).transpose(1, 2)  # B, 24, 8
        t = self.tokens(torch.cat([patches.mean(1, keepdim=True), patches], 1))  # B, 25, 8
        return self.fc(t[:, 0])


def test_the_models_own_prefix_token_count_splits_its_tokens():
    drloc = wrap(ClassToken(), layers=['tokens'], input_size=(3, 32, 48), hidden_dim=8)  # 25 is also 5 x 5
    assert drloc.sources == [GridSource('tokens', 8, 'NLC', 1, (4, 6), (32, 48), Route.HOOKS, 0, None)]


class RenamedFeature(Branches):
    """feature_info names a module the model does not have (renamed since), with forward_intermediates to read."""

    def __init__(self):
        super().__init__()
        self.feature_info = [dict(module='neck', num_chs=6, reduction=4)]


def test_a_feature_info_module_the_model_lacks_is_read_through_forward_intermediates():
    drloc = wrap(RenamedFeature(), input_size=(3, 32, 32), hidden_dim=8)
    assert drloc.sources == [GridSource('neck', 6, 'NCHW', 0, (8, 8), (32, 32), Route.INTERMEDIATES, 0, 0)]


class NormedByDefault(Branches):
    """Branches whose forward_intermediates normalizes its features over channels unless told not to."""

    def forward_intermediates(self, x, indices=None, norm=True):
        y = self.conv(x)
        feature = y - y.mean(1, keepdim=True) if norm else y
        return y, [feature] if 0 in indices else []


def test_forward_intermediates_features_are_read_without_norm_whatever_the_models_default():
    torch.manual_seed(0)
    model = NormedByDefault()
    drloc = wrap(model, input_size=(3, 32, 32), hidden_dim=8)
    assert drloc.route == 'intermediates'
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(grid_received(drloc, x), model.conv(x).permute(0, 2, 3, 1), rtol=0, atol=0)


class SideMapAndGrid(nn.Module):
    def forward(self, y):
        return y[:, :3] * 2, y  # B, 3, H, W and B, 6, H, W


class GridSecond(ConvThenTuple):
    """feature_info names a module returning (a 3-channel side map, the 6-channel grid), both NCHW; hooks read it,
    though forward_intermediates could too."""

    def __init__(self):
        super().__init__('pair', SideMapAndGrid())

    def forward(self, x):
        return self.forward_head(self.pair(self.conv(x))[1])


def test_the_tuple_element_with_the_feature_info_channels_is_the_grid():
    torch.manual_seed(0)
    model = GridSecond()
    drloc = wrap(model, input_size=(3, 32, 32), hidden_dim=8)
    source = drloc.sources[0]
    assert (drloc.route, source.output_index, source.layout, source.grid_size, source.num_chs) == (
        'hooks', 1, 'NCHW', (8, 8), 6)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(grid_received(drloc, x), model.conv(x).permute(0, 2, 3, 1), rtol=0, atol=0)


class NoIntermediates(nn.Module):
    def __init__(self):
        super().__init__()
        self.stages = nn.ModuleList([nn.Conv2d(3, 8, 3, stride=4, padding=1)])
        self.feature_info = [dict(module='stages', num_chs=8, reduction=4)]

    def forward(self, x):
        return self.stages[0](x).mean((2, 3))


class Rerolled(nn.Module):
    """Hiera-like: a `reroll` module (tokens out of row-major order before the last stage), two stages in
    feature_info, and forward_intermediates for them."""

    def __init__(self):
        super().__init__()
        self.s1 = nn.Conv2d(3, 8, 3, stride=4, padding=1)
        self.s2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.reroll = nn.Identity()
        self.fc = nn.Linear(16, 2)
        self.feature_info = [dict(module='s1', num_chs=8, reduction=4), dict(module='s2', num_chs=16, reduction=8)]

    def forward_intermediates(self, x, indices=None, norm=False):
        y1 = self.s1(x)
        y2 = self.s2(y1)
        return y2, [(y1, y2)[i] for i in indices]

    def forward_head(self, y):
        return self.fc(y.mean((2, 3)))

    def forward(self, x):
        return self.forward_head(self.s2(self.s1(x)))


def test_a_rerolling_model_is_read_through_forward_intermediates_only_at_several_stages():
    assert wrap(Rerolled(), input_size=(3, 32, 32), hidden_dim=8).route == 'hooks'  # the last stage is in order
    assert wrap(Rerolled(), input_size=(3, 32, 32), hidden_dim=8, multiscale=True).route == 'intermediates'
    in_order = Rerolled()
    del in_order.reroll
    assert wrap(in_order, input_size=(3, 32, 32), hidden_dim=8, multiscale=True).route == 'hooks'
    assert [s.name for s in probe_grids(in_order, (3, 32, 32))] == ['s2']  # one grid unless multiscale is asked


class Unused(UserModel):
    def __init__(self):
        super().__init__()
        self.spare = nn.Conv2d(3, 16, 3, stride=4, padding=1)  # built, never called


def test_a_grid_module_the_forward_never_runs_is_refused_naming_it():
    with pytest.raises(ValueError) as error:
        wrap(Unused(), layers=['spare'], input_size=(3, 32, 32))
    assert str(error.value) == "Module(s) ['spare'] did not run in Unused's forward: no grid to read there."


def test_grid_module_that_never_runs_without_forward_intermediates_is_refused_with_the_fix():
    with pytest.raises(ValueError) as error:
        wrap(NoIntermediates(), input_size=(3, 32, 32))
    assert str(error.value) == ("NoIntermediates: feature_info names ['stages'], which are not modules that run, and "
                                "there is no forward_intermediates(). Name the grid module(s) with layers=[...].")


def test_default_head_is_the_reference_mlp_and_targets_are_in_cells():
    head = DRLocHead(8, (4, 4))
    assert sum(p.numel() for p in head.parameters()) == (16 * 512 + 512) + (512 * 512 + 512) + (512 * 2 + 2)
    assert 'mode=l1, num_samples=64, use_abs=True, normalize=False, grid_size=(4, 4)' in repr(head)
    targets = relative_targets(torch.tensor([[3, 0]]), torch.tensor([[0, 2]]), (4, 6))
    assert targets.tolist() == [[3.0, 2.0]]


def test_wrap_builds_each_head_with_the_settings_given():
    model = timm.create_model('resnet10t', num_classes=3)
    drloc = wrap(model, mode='cbr', num_samples=5, use_abs=False, normalize=True, hidden_dim=12, multiscale=True,
                 input_size=(3, 64, 64))
    for head, channels, k in zip(drloc.heads, (64, 128, 256, 512), (16, 8, 4, 2)):
        assert f'mode=cbr, num_samples=5, use_abs=False, normalize=True, grid_size={(k, k)}' in repr(head)
        # MLP 2C -> 12 -> 12 -> 12, then one classifier over the 2k - 1 signed offsets per axis
        mlp = (2 * channels * 12 + 12) + 2 * (12 * 12 + 12)
        assert sum(p.numel() for p in head.parameters()) == mlp + 2 * (12 + 1) * (2 * k - 1)


def test_backbone_attributes_pass_through_and_others_do_not():
    model = timm.create_model('resnet10t', num_classes=3)
    drloc = wrap(model, hidden_dim=8, input_size=(3, 64, 64))
    assert drloc.num_classes == 3 and drloc.pretrained_cfg is model.pretrained_cfg
    assert drloc.get_classifier() is model.get_classifier()
    with pytest.raises(AttributeError):
        drloc.layer4  # the backbone's modules stay under .model


def test_forwards_outside_training_keep_no_feature_map_alive():
    model = timm.create_model('resnet10t', num_classes=3)
    drloc = wrap(model, hidden_dim=8, input_size=(3, 64, 64))
    seen = []
    model.layer4.register_forward_hook(lambda module, args, out: seen.append(weakref.ref(out)))
    model(torch.randn(1, 3, 64, 64))  # the plain model, after wrap()
    drloc.train()(torch.randn(2, 3, 64, 64))  # a DRLoc training forward, then a plain one again
    model(torch.randn(1, 3, 64, 64))
    gc.collect()
    assert seen[0]() is None and seen[2]() is None


def test_unknown_dotted_layer_lists_the_modules_under_its_first_part():
    with pytest.raises(ValueError) as error:
        wrap(UserModel(), layers=['stage.pool'], input_size=(3, 32, 32))
    assert str(error.value) == ("layers: no module named 'stage.pool' in UserModel. Some module names it has: "
                                "['stage', 'stage.conv']. Name modules as model.named_modules() lists them.")


@pytest.mark.parametrize('kwargs,message', [
    (dict(layers=['stage'], multiscale=True),
     'multiscale picks the stages itself; with layers name each grid module instead'),
    (dict(layers=['stage'], layout='NWHC'), "Unknown layout 'NWHC'. Use one of NCHW, NHWC, NLC."),
    (dict(layers=['stage'], input_size=(32, 32)), 'input_size must be (C, H, W), got (32, 32).'),
])
def test_wrap_refuses_settings_that_cannot_work_with_the_fix(kwargs, message):
    with pytest.raises(ValueError) as error:
        wrap(UserModel(), **kwargs)
    assert str(error.value) == message


def test_wrapping_twice_says_how_to_get_the_plain_model_back():
    drloc = wrap(UserModel(), layers=['stage'], input_size=(3, 32, 32), hidden_dim=8)
    with pytest.raises(ValueError) as error:
        wrap(drloc)
    assert str(error.value) == ('This model is already wrapped by timm_drloc.wrap(); wrap the plain model once '
                                '(timm_drloc.unwrap(m) gives it back).')


def test_ce_with_normalized_targets_is_refused_with_the_alternatives():
    with pytest.raises(ValueError) as error:
        DRLocHead(8, (4, 4), mode='ce', normalize=True)
    assert isinstance(error.value, SettingError) and error.value.setting == 'normalize'
    assert str(error.value) == ("normalize has no meaning with mode 'ce': its targets are offset classes, not "
                                "values; drop normalize, or use mode 'l1' or 'cbr'")


def test_training_forward_after_remove_hooks_says_what_to_do_instead():
    drloc = wrap(UserModel(), layers=['stage'], input_size=(3, 32, 32), hidden_dim=8)
    drloc.remove_hooks()
    with pytest.raises(RuntimeError) as error:
        drloc(torch.randn(1, 3, 32, 32))
    assert str(error.value) == ("remove_hooks() was called on this DRLocModel: it no longer reads grids. Train with a "
                                "fresh timm_drloc.wrap(model), or use the plain backbone (.model) for inference.")


def test_a_forward_that_skips_the_grid_module_is_refused_naming_it():
    model = UserModel()
    reader = GridReader(model, probe_grids(model, (3, 32, 32), layers=['stage']))
    with pytest.raises(RuntimeError) as error:
        reader.read(lambda: model.fc(torch.zeros(1, 16)))  # the head alone: 'stage' does not run
    assert str(error.value) == "The forward pass did not run module(s) ['stage']: no grid to read."


def test_grids_read_through_forward_intermediates_cannot_be_read_in_someone_elses_forward():
    model = Branches()
    reader = GridReader(model, probe_grids(model, (3, 32, 32)))
    with pytest.raises(RuntimeError) as error:
        reader.read(lambda: model(torch.zeros(1, 3, 32, 32)))
    assert str(error.value) == ("These grids are read through forward_intermediates(), which only DRLocModel's own "
                                "forward calls; name the grid module(s) with layers=[...] to read them with hooks.")


def test_a_bfloat16_model_is_probed_in_its_own_dtype():
    model = timm.create_model('resnet10t', num_classes=3).to(torch.bfloat16)
    drloc = wrap(model, hidden_dim=8, input_size=(3, 64, 64)).to(torch.bfloat16)
    assert drloc.sources[0].grid_size == (2, 2)
    logits, loss = drloc(torch.randn(2, 3, 64, 64, dtype=torch.bfloat16))
    assert logits.dtype == torch.bfloat16 and loss.dtype == torch.float32


class ManyTokens(nn.Module):
    """Its `tokens` module outputs 1 + 40 * 50 tokens: no square count lies within 64 below 2001."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(3, 8)
        self.tokens = nn.Unflatten(1, (2001, 8))
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        t = self.tokens(self.embed(x.mean((2, 3))).repeat(1, 2001))  # B, 2001, C
        return self.fc(t.mean(1))


def test_tokens_with_an_unknown_prefix_and_no_square_count_are_refused():
    model = ManyTokens()
    with pytest.raises(ValueError, match=r'Tokens of shape \(1, 2001, 8\) do not form a grid for an input of \(64, 80\)'):
        wrap(model, layers=['tokens'], input_size=(3, 64, 80))


class TimmStyleNHWC(UserModel):
    """A Swin-like model: feature_info names its NHWC stage, whose 18 channels make (W, C) look like a grid too."""

    def __init__(self):
        super().__init__(channels=18, layout='NHWC')
        self.feature_info = [dict(module='stage', num_chs=18, reduction=4)]


def test_feature_info_channels_tell_an_nhwc_map_from_an_nchw_one():
    model = TimmStyleNHWC()
    drloc = wrap(model, input_size=(3, 32, 48), hidden_dim=8)  # B, 8, 12, 18: (12, 18) is 32 x 48 at stride 8/3
    assert (drloc.sources[0].layout, drloc.sources[0].grid_size) == ('NHWC', (8, 12))


def test_nlc_given_for_a_four_dimensional_map_is_detected_from_its_shape():
    drloc = wrap(UserModel(), layers=['stage'], input_size=(3, 32, 48), hidden_dim=8, layout='NLC')
    assert (drloc.sources[0].layout, drloc.sources[0].grid_size) == ('NCHW', (8, 12))


class Padded(nn.Module):
    """A map one column wider than the input's aspect ratio gives, as padding on the right makes."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 2)
        self.map = nn.Identity()

    def forward(self, x):
        b, _, h, w = x.shape
        y = self.map(x.new_ones(b, 4, h // 8, w // 8 + 1) * x.mean())  # B, 4, H / 8, W / 8 + 1
        return self.fc(y.mean((2, 3)))


def test_a_map_one_cell_wider_than_the_input_suggests_is_still_a_grid():
    drloc = wrap(Padded(), layers=['map'], input_size=(3, 16, 32), hidden_dim=8)
    assert (drloc.sources[0].layout, drloc.sources[0].grid_size) == ('NCHW', (2, 5))


class ManyBlocks(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.Sequential(*[nn.Conv2d(3, 3, 1) for _ in range(12)])
        self.other = nn.Sequential(*[nn.Conv2d(3, 3, 1) for _ in range(12)])

    def forward(self, x):
        return self.other(self.blocks(x)).mean((2, 3))


@pytest.mark.parametrize('name,listed', [
    ('blocks.20', ['blocks'] + [f'blocks.{i}' for i in range(7)]),  # the names under its first part
    ('layer4', ['blocks'] + [f'blocks.{i}' for i in range(7)]),  # none match: the first names the model has
])
def test_an_unknown_layer_lists_at_most_eight_close_names(name, listed):
    with pytest.raises(ValueError) as error:
        wrap(ManyBlocks(), layers=[name], input_size=(3, 8, 8))
    assert f"Some module names it has: {listed}." in str(error.value)
