"""Where the DRLoc parts live: the heads and the grid probe on the backbone's device and in its dtype, the CPU
in float32 for a backbone without parameters. The meta device stands in for a GPU (no memory, no kernels)."""
from collections import OrderedDict

import pytest
import torch
import torch.nn as nn

from timm_drloc import wrap
from timm_drloc.head import DRLocHead, offsets_to_targets, per_axis


def tiny_cnn() -> nn.Module:
    return nn.Sequential(OrderedDict(
        features=nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, 2, 1)),
        pool=nn.AdaptiveAvgPool2d(1), flat=nn.Flatten(), fc=nn.Linear(16, 4)))


def test_a_backbone_on_another_device_is_probed_there_and_gets_its_heads_there():
    drloc = wrap(tiny_cnn().to('meta'), layers=['features'], input_size=(3, 32, 48), hidden_dim=8)
    assert drloc.sources[0].grid_size == (8, 12)
    assert {p.device.type for p in drloc.heads.parameters()} == {'meta'}


def test_a_backbone_without_parameters_gets_float32_heads_on_the_cpu():
    model = nn.Sequential(OrderedDict(features=nn.PixelUnshuffle(4), pool=nn.AdaptiveAvgPool2d(1),
                                      flat=nn.Flatten()))
    drloc = wrap(model, layers=['features'], input_size=(3, 32, 32), hidden_dim=8)
    assert {(p.device.type, p.dtype) for p in drloc.heads.parameters()} == {('cpu', torch.float32)}
    _, loss = drloc(torch.randn(2, 3, 32, 32))
    assert loss.ndim == 0 and torch.isfinite(loss)


def test_per_axis_scales_of_a_non_square_grid_are_made_on_the_device_of_the_offsets():
    meta = torch.device('meta')
    assert per_axis(3, 5, meta, torch.float32).device == meta
    classes = torch.zeros(2, 4, 2, device=meta)
    assert offsets_to_targets(classes, (3, 5), normalize=True).device == meta


@pytest.mark.parametrize('normalize', [False, True], ids=['cells', 'normalized'])
def test_the_cbr_loss_of_outputs_on_another_device_is_computed_there(normalize):
    # normalized, the offset values are divided by per-axis scales (3, 5), made on the outputs' device too
    meta = torch.device('meta')
    head = DRLocHead(8, (3, 5), mode='cbr', normalize=normalize, hidden_dim=8).to(meta)
    out = torch.zeros(2, 4, 8, device=meta)
    classes = torch.zeros(2, 4, 2, dtype=torch.long, device=meta)
    assert head.loss(out, classes, (3, 5)).device == meta


@pytest.mark.parametrize('mode,normalize', [('l1', True), ('ce', False), ('cbr', True)])
def test_a_head_computes_on_its_grids_device_whatever_torchs_default_device(mode, normalize):
    # a default device of 'meta' stands in for set_default_device('cuda'): every tensor the head makes (pairs, class
    # shifts and scales of a non-square grid, offset values) must follow the grid, here on the CPU
    torch.manual_seed(0)
    head = DRLocHead(8, (3, 5), mode=mode, use_abs=False, normalize=normalize, hidden_dim=8)
    grid = torch.randn(2, 3, 5, 8)
    torch.manual_seed(1)
    expected = head(grid)
    torch.set_default_device('meta')
    try:
        torch.manual_seed(1)  # the same pairs
        loss = head(grid)
    finally:
        torch.set_default_device(None)
    assert loss.device.type == 'cpu' and torch.equal(loss, expected)
