"""DRLocHead keeps its numbers: for a fixed seed, the loss, the first layer's gradient and the random draws
are those of the head as first released (commit 0fccdc0), whatever the head's inner ops become.

The pinned values were computed once with that head. The seed draws, in order, the head's weights
(default init), the grid and the sampled pairs; the next draw after the forward pins how many random
numbers the head consumed, so a rewrite that samples pairs differently shows up here even when its
losses look plausible.
"""
import logging
import re
import time
from typing import Tuple

import pytest
import torch

from timm_drloc import DRLocHead

# id: mode, use_abs, normalize, built (H, W), runtime (H, W), pairs per image, grid stored NCHW
CASES = {
    'l1-abs-7x7-project': ('l1', True, False, (7, 7), (7, 7), 64, True),
    'l1-abs-14x14-gather': ('l1', True, False, (14, 14), (14, 14), 64, False),
    'l1-signed-normalize-5x9-gather': ('l1', False, True, (5, 9), (5, 9), 8, False),
    'l1-signed-3x5-project': ('l1', False, False, (3, 5), (3, 5), 32, True),
    'ce-abs-6x6-runs-4x5-project': ('ce', True, False, (6, 6), (4, 5), 64, False),
    'ce-signed-5x7-gather': ('ce', False, False, (5, 7), (5, 7), 16, True),
    'cbr-abs-normalize-6x6-runs-3x4-project': ('cbr', True, True, (6, 6), (3, 4), 32, False),
    'cbr-signed-4x6-gather': ('cbr', False, False, (4, 6), (4, 6), 8, False),
    'cbr-signed-normalize-7x7-project': ('cbr', False, True, (7, 7), (7, 7), 64, True),
}
# 'project': fewer cells than pairs (a CPU head with a hidden width at most C runs the first layer per cell);
# 'gather': at least as many cells as pairs. Hidden 16 > C 12 here, so these heads gather first unless forced.

# id: loss, norm of mlp[0].weight.grad, next torch.randint(2 ** 30, ()) after the forward
PINNED = {
    'l1-abs-7x7-project': (2.372929811477661, 0.09287639707326889, 53637167),
    'l1-abs-14x14-gather': (4.57294225692749, 0.09309551864862442, 473048414),
    'l1-signed-normalize-5x9-gather': (0.9188601970672607, 0.15012800693511963, 306734039),
    'l1-signed-3x5-project': (3.284283399581909, 0.09670223295688629, 153112584),
    'ce-abs-6x6-runs-4x5-project': (3.0367379188537598, 0.06097373366355896, 1031407047),
    'ce-signed-5x7-gather': (4.7624616622924805, 0.08863847702741623, 410252308),
    'cbr-abs-normalize-6x6-runs-3x4-project': (1.7050352096557617, 0.05748981982469559, 340667209),
    'cbr-signed-4x6-gather': (1.370854377746582, 0.10266178846359253, 796176139),
    'cbr-signed-normalize-7x7-project': (1.2130093574523926, 0.02558373287320137, 368907770),
}


def seeded_head_and_grid(case: str, **head_kwargs):
    """The head and (3, H, W, 12) grid of `case`, built from seed = the case's index."""
    mode, use_abs, normalize, built, runtime, num_samples, nchw = CASES[case]
    torch.manual_seed(list(CASES).index(case))
    head = DRLocHead(12, built, mode=mode, num_samples=num_samples, use_abs=use_abs, normalize=normalize,
                     hidden_dim=16, **head_kwargs)
    if nchw:
        grid = torch.randn(3, 12, *runtime).permute(0, 2, 3, 1).requires_grad_()  # B, H, W, C view
    else:
        grid = torch.randn(3, *runtime, 12, requires_grad=True)
    return head, grid


def assert_pinned(case: str, **head_kwargs) -> Tuple[DRLocHead, torch.Tensor]:
    """Check the pinned values of `case`; returns its head and grid."""
    head, grid = seeded_head_and_grid(case, **head_kwargs)
    loss = head(grid)
    next_draw = torch.randint(2 ** 30, ()).item()
    loss.backward()
    pinned_loss, pinned_grad_norm, pinned_draw = PINNED[case]
    assert next_draw == pinned_draw  # the head drew exactly as many random numbers as before
    torch.testing.assert_close(loss.item(), pinned_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(head.mlp[0].weight.grad.norm().item(), pinned_grad_norm, rtol=1e-4, atol=1e-6)
    return head, grid


@pytest.mark.parametrize('case', list(CASES))
def test_same_seed_gives_the_released_heads_loss_gradient_and_draws(case):
    assert_pinned(case)


@pytest.mark.parametrize('per_cell', [True, False], ids=['project-then-gather', 'gather-then-project'])
@pytest.mark.parametrize('case', list(CASES))
def test_both_first_layer_paths_give_the_released_heads_values(case, per_cell, monkeypatch):
    # the path depends on the device and the grid (DRLocHead.projects_cells_first); the values must not
    monkeypatch.setattr(DRLocHead, 'projects_cells_first', lambda head, grid, num_samples: per_cell)
    assert_pinned(case)


@pytest.mark.parametrize('case', ['l1-abs-14x14-gather', 'cbr-abs-normalize-6x6-runs-3x4-project'])
def test_compiled_head_gives_the_released_heads_values_for_the_same_seed_and_logs_its_compile_time(case, caplog):
    torch._dynamo.reset()
    start = time.perf_counter()
    with caplog.at_level(logging.INFO, logger='timm_drloc.head'):
        head, grid = assert_pinned(case, compiled=True)
        elapsed = time.perf_counter() - start
        head(grid)  # a second step: compiled already, nothing more to report
    height, width = CASES[case][4]
    [message] = [r.getMessage() for r in caplog.records if r.name == 'timm_drloc.head']
    logged = re.fullmatch(
        rf"DRLoc head {height}x{width}x12: first compiled call took (\d+\.\d) s \(the forward's compilation, unless "
        r"a head of the same shapes compiled it already; the backward compiles in the first backward\)", message)
    assert logged and float(logged.group(1)) <= elapsed + 0.05  # the time of the call, at most the whole test's
