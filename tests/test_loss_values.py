"""DRLoc loss values computed by hand: L1 with errors of both signs, ce and cbr on a grid smaller than the
one the head was built for (its offset classes are cut to the runtime grid's, per axis)."""
import math

import pytest
import torch

from timm_drloc import DRLocHead, relative_targets, sample_positions
from timm_drloc.losses import l1_loss


def test_l1_is_the_mean_absolute_error_with_errors_of_both_signs():
    pred = torch.tensor([[[0.5, 3.0], [2.0, -1.0]]])  # B, M, 2
    target = torch.tensor([[[1.0, 1.0], [1.0, 1.0]]])
    # errors -0.5, +2, +1, -2: |.| mean 1.375 (a signed mean would be 0.125, a squared one 2.3125)
    assert l1_loss(pred, target).item() == pytest.approx(1.375)


def zero_head(mode: str, use_abs: bool, normalize: bool, built_for=(6, 6)) -> DRLocHead:
    """A head built for a 6 x 6 grid whose parameters are all 0: uniform scores over its offset classes."""
    head = DRLocHead(8, built_for, mode=mode, num_samples=32, use_abs=use_abs, normalize=normalize, hidden_dim=16)
    with torch.no_grad():
        for p in head.parameters():
            p.zero_()
    return head


@pytest.mark.parametrize('use_abs', [True, False], ids=['absolute', 'signed'])
def test_ce_on_a_smaller_grid_than_built_for_uses_the_runtime_grids_classes_per_axis(use_abs):
    head = zero_head('ce', use_abs, normalize=False)
    loss = head(torch.randn(2, 3, 4, 8))  # a 3 x 4 grid for a head built for 6 x 6
    classes = (3, 4) if use_abs else (5, 7)  # k, or 2k - 1 signed, of each runtime axis
    assert loss.item() == pytest.approx(math.log(classes[0]) + math.log(classes[1]), rel=1e-6)


def uniform_cbr(target: torch.Tensor, num_classes: int, scale: float) -> torch.Tensor:
    """cbr of one axis when every offset class 0..n-1 (each worth class / scale) has the same score."""
    values = torch.arange(num_classes, dtype=torch.float64) / scale
    mu = values.mean()
    var = ((values - mu) ** 2).mean() + 1e-8
    return ((mu - target.double()) ** 2).mean() / var + 1e-3 * var.log()


@pytest.mark.parametrize('use_abs', [True, False], ids=['absolute', 'signed'])
@pytest.mark.parametrize('normalize', [False, True], ids=['cells', 'normalized'])
def test_cbr_on_a_smaller_grid_than_built_for_matches_the_hand_computed_value(use_abs, normalize):
    head = zero_head('cbr', use_abs, normalize)
    grid = torch.randn(2, 3, 4, 8)
    torch.manual_seed(5)
    loss = head(grid)
    torch.manual_seed(5)  # the same draws: the pairs the head sampled
    pos = sample_positions(2, 3, 4, 32, grid.device)
    target = relative_targets(pos[:, 0], pos[:, 1], (3, 4), use_abs=use_abs, normalize=normalize)

    expected = sum(
        uniform_cbr(target[..., axis], size if use_abs else 2 * size - 1, size if normalize else 1)
        for axis, size in enumerate((3, 4)))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
