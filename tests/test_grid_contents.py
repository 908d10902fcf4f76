"""The grid each DRLoc head receives holds the model's own spatial tokens, cell for cell.

Shapes alone do not catch a grid that keeps the class token and drops the last patch, a Swin (NHWC) map
read with H and W swapped, or a non-square token grid split with the aspect ratio inverted. Here the
tensor a head receives in a training forward of `wrap()` is compared with an independent reference: the
model's own `forward_intermediates()` (prefix tokens dropped, NCHW) or, for CrossViT, the branch tokens
after the class token of the block the grid is read from.
"""
from typing import List

import pytest
import timm
import torch

from timm_drloc import wrap

VIT = dict(patch_size=8, depth=2, embed_dim=48, num_heads=2)
SWIN = dict(window_size=2, depths=(1, 1, 1, 1), embed_dim=16, num_heads=(1, 1, 1, 1), drop_path_rate=0.)

# (model name, create_model kwargs, input (H, W), wrap kwargs); grids: ViT 4x4 / 6x4, Swin 2x2 / 2x3, ResNet 3x3 / 3x4
CASES = {
    'vit_cls_registers_square': ('vit_tiny_patch16_224', dict(img_size=32, reg_tokens=4, **VIT), (32, 32), {}),
    'vit_cls_registers_tall': ('vit_tiny_patch16_224', dict(img_size=(48, 32), reg_tokens=4, **VIT), (48, 32), {}),
    'vit_dynamic_img_size_wide': ('vit_tiny_patch16_224', dict(img_size=32, dynamic_img_size=True, reg_tokens=2, **VIT),
                                  (32, 56), {}),
    'deit_distilled_square': ('deit_tiny_distilled_patch16_224', dict(img_size=32, **VIT), (32, 32), {}),
    'deit_distilled_wide': ('deit_tiny_distilled_patch16_224', dict(img_size=(32, 48), **VIT), (32, 48), {}),
    'swin_square': ('swin_tiny_patch4_window7_224', dict(img_size=64, **SWIN), (64, 64), {}),
    'swin_wide': ('swin_tiny_patch4_window7_224', dict(img_size=(64, 96), **SWIN), (64, 96), {}),
    'swin_wide_multiscale': ('swin_tiny_patch4_window7_224', dict(img_size=(64, 96), **SWIN), (64, 96),
                             dict(multiscale=True)),
    'resnet_square': ('resnet10t', {}, (96, 96), {}),
    'resnet_wide': ('resnet10t', {}, (96, 128), {}),
    'resnet_wide_multiscale': ('resnet10t', {}, (96, 128), dict(multiscale=True)),
}


def grids_received(drloc, x: torch.Tensor) -> List[torch.Tensor]:
    """The (B, H, W, C) tensor each head of `drloc` is called with in one training forward on `x`."""
    seen = []
    handles = [head.register_forward_pre_hook(lambda module, args: seen.append(args[0])) for head in drloc.heads]
    try:
        drloc.train()
        drloc(x)
    finally:
        for handle in handles:
            handle.remove()
    return seen


@pytest.mark.parametrize('case', list(CASES))
def test_head_receives_the_models_forward_intermediates_cell_for_cell(case):
    name, model_kwargs, size, wrap_kwargs = CASES[case]
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=3, **model_kwargs)
    drloc = wrap(model, hidden_dim=8, input_size=(3, *size), **wrap_kwargs)
    x = torch.randn(2, 3, *size)

    received = grids_received(drloc, x)
    model.train()  # same mode as the wrapped forward (batch norm uses the batch's statistics)
    _, reference = model.forward_intermediates(x, indices=len(received), norm=False)  # NCHW, prefix tokens dropped

    assert len(received) == len(reference) == len(drloc.heads)
    for grid, ref in zip(received, reference):
        torch.testing.assert_close(grid, ref.permute(0, 2, 3, 1), rtol=0, atol=0)  # B, H, W, C


def test_vit_grid_is_the_patch_tokens_after_class_and_register_tokens_in_row_major_order():
    torch.manual_seed(0)
    model = timm.create_model('vit_tiny_patch16_224', num_classes=3, img_size=(48, 32), reg_tokens=4, **VIT)
    drloc = wrap(model, hidden_dim=8)
    tokens = []
    model.blocks[-1].register_forward_hook(lambda module, args, out: tokens.append(out))
    x = torch.randn(2, 3, 48, 32)

    grid, = grids_received(drloc, x)
    patches = tokens[0][:, model.num_prefix_tokens:]  # B, 6 * 4, C: 1 class + 4 register tokens first
    assert model.num_prefix_tokens == 5
    assert grid.shape == (2, 6, 4, 48)
    torch.testing.assert_close(grid, patches.reshape(2, 6, 4, 48), rtol=0, atol=0)


def test_multi_branch_model_trains_on_the_feature_info_branch_tokens():
    # CrossViT blocks output one token sequence per branch; feature_info's 192-channel grid is branch 1
    torch.manual_seed(0)
    model = timm.create_model('crossvit_tiny_240', num_classes=3, img_size=120, depth=((1, 1, 0),) * 2)
    drloc = wrap(model, hidden_dim=8, input_size=(3, 120, 120))
    branches = []
    model.get_submodule(drloc.sources[0].name).register_forward_hook(lambda module, args, out: branches.append(out))
    x = torch.randn(2, 3, 120, 120)

    grid, = grids_received(drloc, x)
    small, large = branches[0]
    assert (small.shape[-1], large.shape[-1]) == (96, 192)
    torch.testing.assert_close(grid, large[:, 1:].reshape(2, 7, 7, 192), rtol=0, atol=0)
