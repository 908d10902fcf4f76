"""The rules grids.py reads shapes by, on shapes alone: which 4-D maps and token sequences are grids of an input,
how tokens are split at another input size, which feature_info entries are read, and the input a model was built for."""
import pytest
import torch
import torch.nn as nn

from timm_drloc.errors import GridNotFoundError, SingleScaleError
from timm_drloc.grids import GridSource, default_input_size, feature_modules, find_layout, to_grid, token_grid_size


def _grid_of(hw, input_hw):
    """The (h, w) an NCHW map of 100 channels is read as for an input of input_hw, or None when it is no grid."""
    try:
        return find_layout((1, 100, *hw), input_hw, num_chs=100)[2]
    except GridNotFoundError:
        return None


@pytest.mark.parametrize('hw, input_hw, is_grid', [
    ((8, 12), (32, 48), True),  # stride 4
    ((1, 1), (17, 16), True),  # pooled to one cell
    ((1, 6), (8, 32), True),  # rounded down at a stride of 5: 8 / 5 -> 1, 32 / 5 -> 6
    ((10, 4), (17, 8), True),  # rounded down at a stride of 1.65: 17 / 1.65 -> 10, 8 / 1.65 -> 4
    ((9, 5), (17, 8), True),  # rounded up at a stride of 1.9: 17 / 1.9 -> 9, 8 / 1.9 -> 5
    ((1, 2), (8, 8), False),  # a square input gives a square map at every stride
    ((2, 1), (8, 8), False),
    ((1, 5), (8, 8), False),
    ((8, 7), (8, 8), False),  # 8 rows need a stride <= 1, 7 columns one > 1
    ((4, 0), (16, 16), False),  # an empty axis
    ((16, 16), (8, 8), False),  # twice the input: a stride below 1
])
def test_a_map_is_a_grid_when_one_stride_of_at_least_1_rounds_the_input_to_it_on_both_axes(hw, input_hw, is_grid):
    assert _grid_of(hw, input_hw) == (hw if is_grid else None)


@pytest.mark.parametrize('shape, input_hw, num_chs, prefer, read_as', [
    ((1, 16, 8, 12), (32, 48), 16, None, ('NCHW', 0, (8, 12))),
    ((1, 8, 12, 16), (32, 48), 16, None, ('NHWC', 0, (8, 12))),  # Swin's stages
    ((1, 64, 8, 8), (32, 32), None, None, ('NCHW', 0, (8, 8))),  # no channel count: the shape alone
    ((1, 8, 8, 64), (32, 32), None, None, ('NHWC', 0, (8, 8))),
    ((1, 8, 8, 8), (32, 32), 8, None, ('NCHW', 0, (8, 8))),  # both fit: NCHW unless the model says NHWC
    ((1, 8, 8, 8), (32, 32), 8, 'NHWC', ('NHWC', 0, (8, 8))),
    ((1, 8, 8, 8), (32, 32), 8, 'NCHW', ('NCHW', 0, (8, 8))),
    ((1, 8, 8, 8), (32, 32), 8, 'NLC', ('NCHW', 0, (8, 8))),
    ((1, 8, 8, 8), (32, 32), 8, 'nchw', ('NCHW', 0, (8, 8))),  # not a layout name: the default
])
def test_a_four_dimensional_map_is_read_as_nchw_or_nhwc_by_its_shape_and_channels(shape, input_hw, num_chs, prefer,
                                                                                  read_as):
    assert find_layout(shape, input_hw, num_chs=num_chs, prefer=prefer) == read_as


@pytest.mark.parametrize('length, input_hw, num_prefix_tokens, read_as', [
    (16, (32, 32), None, ('NLC', 0, (4, 4))),
    (17, (32, 32), None, ('NLC', 1, (4, 4))),  # a class token: the fewest prefix tokens leaving a square
    (21, (32, 32), 5, ('NLC', 5, (4, 4))),  # a class token and 4 registers, as the model says
    (25, (32, 48), 1, ('NLC', 1, (4, 6))),  # 25 tokens are also a 5 x 5 square: the model's count wins
    (16, (32, 32), 1, ('NLC', 0, (4, 4))),  # CaiT's blocks: patch tokens only, the class token joins later
    (8, (32, 64), None, ('NLC', 0, (2, 4))),  # rows and columns in the input's aspect ratio
    (2, (32, 64), None, ('NLC', 0, (1, 2))),  # one row
    (21, (32, 32), None, ('NLC', 5, (4, 4))),  # a class token and 4 registers the model does not declare
    (2, (32, 32), None, ('NLC', 1, (1, 1))),  # a class token and one grid token (too small, refused later)
    (4, (32, 32), 5, ('NLC', 0, (2, 2))),  # fewer tokens than the model's prefix count: none of them is a prefix
])
def test_tokens_are_split_into_the_grid_of_the_inputs_aspect_ratio_after_their_prefix_tokens(
        length, input_hw, num_prefix_tokens, read_as):
    assert find_layout((1, length, 8), input_hw, num_prefix_tokens=num_prefix_tokens) == read_as


@pytest.mark.parametrize('shape, input_hw, num_prefix_tokens, message', [
    ((1, 2, 17, 16), (32, 32), None,
     "Output of shape (1, 2, 17, 16) for an input of (32, 32) is not a spatial grid (neither NCHW nor NHWC fits). "
     "Pass layout='NCHW' or 'NHWC', or name another module with layers=[...]."),
    ((1, 13, 8), (32, 48), 2,
     "Tokens of shape (1, 13, 8) do not form a grid for an input of (32, 48), with 2 (the model's), 0 or any "
     "square-leaving number of prefix tokens. Name a module that outputs a spatial grid with layers=[...]."),
    ((1, 8), (32, 32), None,
     "Output of shape (1, 8) has no spatial grid (need NCHW, NHWC or NLC tokens). Name a module that outputs a grid "
     "with layers=[...]."),
    ((1, 2, 3, 4, 5), (32, 32), None,
     "Output of shape (1, 2, 3, 4, 5) has no spatial grid (need NCHW, NHWC or NLC tokens). Name a module that outputs "
     "a grid with layers=[...]."),
])
def test_a_shape_that_is_no_grid_is_refused_with_the_shape_the_input_and_the_fix(shape, input_hw, num_prefix_tokens,
                                                                                   message):
    with pytest.raises(GridNotFoundError) as error:
        find_layout(shape, input_hw, num_prefix_tokens=num_prefix_tokens)
    assert str(error.value) == message


def _source(layout: str, num_prefix_tokens: int = 0) -> GridSource:
    return GridSource('blocks.1', 3, layout, num_prefix_tokens, (4, 6), (32, 48))


def test_each_layout_is_viewed_as_rows_columns_channels_without_a_copy():
    nchw = torch.arange(2 * 3 * 4 * 6).reshape(2, 3, 4, 6)
    grid = to_grid(nchw, _source('NCHW'), (32, 48))
    assert grid.shape == (2, 4, 6, 3) and grid[1, 2, 5, 0] == nchw[1, 0, 2, 5] and grid[0, 3, 1, 2] == nchw[0, 2, 3, 1]
    nhwc = torch.arange(2 * 4 * 6 * 3).reshape(2, 4, 6, 3)
    assert to_grid(nhwc, _source('NHWC'), (32, 48)) is nhwc
    nlc = torch.arange(2 * 25 * 3).reshape(2, 25, 3)  # a class token, then 4 x 6 grid tokens row by row
    grid = to_grid(nlc, _source('NLC', num_prefix_tokens=1), (32, 48))
    assert grid.shape == (2, 4, 6, 3) and grid[1, 2, 5].tolist() == nlc[1, 1 + 2 * 6 + 5].tolist()
    assert grid.data_ptr() == nlc[:, 1:].data_ptr()


@pytest.mark.parametrize('num_tokens, input_hw, grid', [
    (24, (32, 48), (4, 6)),  # the probe's
    (96, (64, 96), (8, 12)),  # stride 8 on both axes
    (24, (48, 32), (6, 4)),  # as many tokens, the input turned: rows and columns follow it
    (24, (36, 52), (4, 6)),  # 4.5 x 6.5 rounded down
    (35, (36, 52), (5, 7)),  # 4.5 x 6.5 rounded up
])
def test_tokens_at_another_input_size_are_split_at_the_probes_stride(num_tokens, input_hw, grid):
    assert token_grid_size(num_tokens, _source('NLC'), input_hw) == grid
    assert to_grid(torch.zeros(1, 1 + num_tokens, 3), _source('NLC', 1), input_hw).shape == (1, *grid, 3)


def test_the_probes_input_size_gives_back_the_probes_grid_where_its_stride_does_not_divide_exactly():
    source = GridSource('blocks.1', 3, 'NLC', 0, (7, 7), (18, 17))  # 18 / (18 / 7) is just below 7, 17 / (17 / 7) above
    assert token_grid_size(49, source, (18, 17)) == (7, 7)


def test_tokens_that_fit_no_grid_at_the_probes_stride_are_refused_naming_the_module_and_both_sizes():
    with pytest.raises(GridNotFoundError) as error:
        token_grid_size(30, _source('NLC'), (32, 48))  # even at the probe's own input size
    assert str(error.value) == (
        "Cannot split 30 tokens of 'blocks.1' into a grid for an input of (32, 48) (the probe saw a 4x6 grid for "
        "(32, 48)). Pass layout='NCHW' or 'NHWC' if this module does not output tokens, or name another module with "
        "layers=[...].")


class Info(nn.Module):
    def __init__(self, feature_info=None):
        super().__init__()
        if feature_info is not None:
            self.feature_info = feature_info


STAGES = [dict(module='stem', num_chs=4, reduction=2), dict(module='s1', num_chs=8, reduction=4),
          dict(module='s1b', num_chs=8, reduction=4), dict(module='s2', num_chs=16, reduction=8),
          dict(module='norm', num_chs=16)]  # an entry without a stride


def test_one_head_reads_the_last_feature_info_entry_and_multiscale_the_last_of_each_stride_from_4():
    assert feature_modules(Info(STAGES), multiscale=False) == [dict(STAGES[4], index=4)]
    assert feature_modules(Info(STAGES), multiscale=True) == [dict(STAGES[2], index=2), dict(STAGES[3], index=3)]


def test_a_model_without_feature_info_or_with_one_stride_is_refused_with_the_fix():
    with pytest.raises(GridNotFoundError) as error:
        feature_modules(Info(), multiscale=False)
    assert str(error.value) == ("Info has no timm feature_info to find its spatial grid. Name the module(s) that "
                                "output the grid with layers=['module.path'].")
    with pytest.raises(SingleScaleError) as error:
        feature_modules(Info([dict(module='blocks.1', reduction=16), dict(module='blocks.3', reduction=16)]), True)
    assert str(error.value) == ("multiscale=True needs a hierarchical model with stages at several strides, but Info "
                                "has features at stride(s) [16] only. Use multiscale=False (one head on the last "
                                "grid).")



def test_multiscale_on_a_model_with_one_stage_past_its_stride_2_features_names_the_layers_to_read_instead():
    info = Info([dict(module='layers.0', reduction=2), dict(module='layers.1', reduction=4)])  # Swin, patch size 2
    with pytest.raises(SingleScaleError) as error:
        feature_modules(info, multiscale=True)
    assert str(error.value) == (
        "multiscale=True reads one grid per stage at stride 4 or more (it takes stride-2 features for a stem), and "
        "Info has features at strides [2, 4], so one stage at most. Use multiscale=False (one head on the last grid), "
        "or name each grid to read, one head each: layers=['layers.0', 'layers.1'].")

class Built(nn.Module):
    def __init__(self, conv_in: int = 0, **attributes):
        super().__init__()
        if conv_in:
            self.conv = nn.Conv2d(conv_in, 4, 3)
        for name, value in attributes.items():
            setattr(self, name, value)


def _patch_embed(img_size) -> nn.Module:
    embed = nn.Module()
    embed.img_size = img_size
    return embed


@pytest.mark.parametrize('model, size', [
    (Built(conv_in=3, in_chans=1, img_size=(24, 40)), (1, 24, 40)),  # timm's in_chans before the first conv
    (Built(conv_in=4, in_chans=None, img_size=[24, 40]), (4, 24, 40)),
    (Built(conv_in=4, patch_embed=_patch_embed(48), img_size=64), (4, 48, 48)),  # the patch embedding's first
    (Built(conv_in=4, img_size=(1, 24, 40)), (4, 224, 224)),  # not an (H, W)
    (Built(conv_in=3, stem=_patch_embed((32, 48))), (3, 32, 48)),  # an input embedding under another name
    (Built(pretrained_cfg={'input_size': (1, 160, 192)}), (1, 160, 192)),
    (Built(conv_in=2, pretrained_cfg={'input_size': (1, 160, 192)}), (2, 160, 192)),
    (Built(), (3, 224, 224)),
])
def test_the_input_a_model_was_built_for_comes_from_its_own_attributes_then_its_pretrained_cfg(model, size):
    assert default_input_size(model) == size


@pytest.mark.parametrize('length, input_hw, expected', [
    (50, (28, 28), ('NLC', 1, (7, 7))),           # a class token
    (1600 + 63, (160, 160), ('NLC', 63, (40, 40))),  # the most prefix tokens tried without the model's count
    (36 + 5, (32, 64), ('NLC', 5, (4, 9))),       # the fewest that leave a grid of the input's aspect
])
def test_tokens_without_a_prefix_count_are_read_after_the_fewest_prefix_tokens_that_leave_a_square(
        length, input_hw, expected):
    assert find_layout((2, length, 100), input_hw) == expected


@pytest.mark.parametrize('length, input_hw', [
    (1600 + 64, (160, 160)),  # 64 prefix tokens would leave 40 x 40: more than are ever tried
    (49, (32, 64)),           # square itself but not of a 1:2 input; 13 prefix tokens (4 x 9 left) are not tried
    (3200 + 1, (320, 640)),   # 1 prefix token would leave 40 x 80, but only counts that leave a square are tried
])
def test_tokens_that_no_tried_prefix_turns_into_a_grid_are_refused(length, input_hw):
    with pytest.raises(GridNotFoundError, match='do not form a grid'):
        find_layout((2, length, 100), input_hw)
