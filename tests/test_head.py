"""DRLocHead and losses: targets, loss values, sampling, dtypes and compilation."""
import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from timm_drloc import DRLocHead, relative_targets, sample_positions
from timm_drloc.head import compiled_pair_loss, draw_cells, num_offsets
from timm_drloc.losses import cbr_loss

# two pairs on a 4 x 6 grid: (row, col) of the first and second cell
POS_A = torch.tensor([[[3, 0], [1, 5]]])
POS_B = torch.tensor([[[0, 2], [1, 1]]])


@pytest.mark.parametrize('use_abs,normalize,expected', [
    (True, False, [[3., 2.], [0., 4.]]),                       # |i - p|, |j - h|
    (True, True, [[3 / 4, 2 / 6], [0., 4 / 6]]),               # divided by the axis size (paper)
    (False, False, [[3 + 3., -2 + 5.], [0 + 3., 4 + 5.]]),     # i - p + (k - 1)
    (False, True, [[6 / 4, 3 / 6], [3 / 4, 9 / 6]]),
])
def test_targets_equal_hand_computed_offsets(use_abs, normalize, expected):
    target = relative_targets(POS_A, POS_B, (4, 6), use_abs=use_abs, normalize=normalize)
    assert target.dtype == torch.float32
    torch.testing.assert_close(target, torch.tensor([expected]))


@pytest.mark.parametrize('mode', ['l1', 'ce', 'cbr'])
@pytest.mark.parametrize('use_abs', [True, False])
@pytest.mark.parametrize('normalize', [False, True])
def test_loss_uses_the_targets_of_the_sampled_positions(monkeypatch, mode, use_abs, normalize):
    if mode == 'ce' and normalize:
        pytest.skip('ce with normalize is rejected (tested below)')
    torch.manual_seed(0)
    head = DRLocHead(8, (4, 6), mode=mode, num_samples=2, use_abs=use_abs, normalize=normalize, hidden_dim=16)
    grid = torch.randn(1, 4, 6, 8)
    cells = torch.stack((POS_A, POS_B), dim=1) @ torch.tensor([6, 1])  # B, 2, M: row * W + col
    monkeypatch.setattr('timm_drloc.head.draw_cells', lambda *a, **k: cells)
    loss = head(grid)

    # recompute by hand from the same positions
    cells_a = grid[0, POS_A[0, :, 0], POS_A[0, :, 1]]
    cells_b = grid[0, POS_B[0, :, 0], POS_B[0, :, 1]]
    out = head.mlp(torch.cat((cells_a, cells_b), -1))
    target = relative_targets(POS_A[0], POS_B[0], (4, 6), use_abs, normalize)
    if mode == 'l1':
        expected = (out - target).abs().mean()
    else:
        logits = [head.axis_heads[0](out), head.axis_heads[1](out)]
        assert [lg.shape[-1] for lg in logits] == [num_offsets(4, use_abs), num_offsets(6, use_abs)]
        if mode == 'ce':
            expected = F.cross_entropy(logits[0], target[:, 0].long()) + F.cross_entropy(logits[1], target[:, 1].long())
        else:
            expected = 0
            for axis, size in enumerate((4, 6)):
                values = torch.arange(num_offsets(size, use_abs)).float() / (size if normalize else 1)
                beta = logits[axis].softmax(-1)
                mu = (beta * values).sum(-1)
                var = (beta * (values - mu[:, None]) ** 2).sum(-1) + 1e-8
                expected = expected + ((mu - target[:, axis]) ** 2 / var + 1e-3 * var.log()).mean()
    torch.testing.assert_close(loss, expected)


def test_cbr_with_uniform_scores_matches_closed_form():
    # uniform beta over offsets 0..2: mu = 1, var = 2/3 (+eps); target 0 -> (1 / (2/3) + 1e-3 log(2/3)) per axis
    logits = torch.zeros(1, 1, 2, 3)  # B, M, axes, offsets
    loss = cbr_loss(logits, torch.zeros(1, 1, 2), torch.arange(3.))
    var = torch.tensor(2 / 3 + 1e-8)
    torch.testing.assert_close(loss, 2 * (1 / var + 1e-3 * var.log()))


def test_cbr_of_a_certain_right_prediction_is_finite_the_variance_floor_eps_keeps_its_log():
    # all weight on offset 1, the target: mu = 1, var = 0 + eps -> per axis 0 / eps + 1e-3 log(eps)
    logits = torch.tensor([0., 1e4, 0.]).expand(1, 1, 2, 3)  # B, M, axes, offsets
    loss = cbr_loss(logits, torch.ones(1, 1, 2), torch.arange(3.), eps=1e-8)
    torch.testing.assert_close(loss, 2 * 1e-3 * torch.tensor(1e-8).log())


def test_sampling_is_uniform_with_replacement_over_the_whole_grid():
    torch.manual_seed(0)
    pos = sample_positions(batch=64, height=3, width=5, num_samples=500, device=torch.device('cpu'))
    assert pos.shape == (64, 2, 500, 2) and pos.dtype == torch.long
    assert pos[..., 0].min() == 0 and pos[..., 0].max() == 2
    assert pos[..., 1].min() == 0 and pos[..., 1].max() == 4
    counts = torch.bincount((pos[..., 0] * 5 + pos[..., 1]).flatten(), minlength=15).float()
    assert counts.min() / counts.max() > 0.9  # 64k draws over 15 cells: uniform within a few percent
    assert (pos[:, 0] == pos[:, 1]).all(-1).any()  # with replacement: a pair can be the same cell twice


def test_each_image_gets_its_own_positions():
    torch.manual_seed(0)
    pos = sample_positions(batch=4, height=7, width=7, num_samples=64, device=torch.device('cpu'))
    assert not torch.equal(pos[0], pos[1])


def test_head_reads_each_cell_from_its_own_image():
    # every cell of image b holds the value b in all channels: the gathered pairs must come from image b
    head = DRLocHead(4, (3, 3), num_samples=6, hidden_dim=8)
    grid = torch.arange(5.).view(5, 1, 1, 1).expand(5, 3, 3, 4)
    seen = {}
    head.mlp[0].register_forward_hook(lambda m, args, out: seen.update(pairs=args[0]))
    head(grid)
    pairs = seen['pairs']  # B, M, 2C
    assert pairs.shape == (5, 6, 8)
    assert torch.equal(pairs, torch.arange(5.).view(5, 1, 1).expand(5, 6, 8))


@pytest.mark.parametrize('grid_size,num_samples', [((3, 3), 16), ((7, 7), 64), ((2, 5), 64)])
def test_projecting_cells_first_equals_projecting_gathered_pairs(grid_size, num_samples):
    # fewer cells than pairs: the head projects every cell with both halves of the first layer, then gathers
    torch.manual_seed(0)
    head = DRLocHead(12, grid_size, num_samples=num_samples, hidden_dim=16)
    grid = torch.randn(3, 12, *grid_size).permute(0, 2, 3, 1)  # B, H, W, C view of an NCHW map
    cells = draw_cells(3, grid_size[0] * grid_size[1], num_samples, grid.device)  # B, 2, M
    rows, cols = cells // grid_size[1], cells % grid_size[1]
    picked = grid[torch.arange(3).view(3, 1, 1), rows, cols]  # B, 2, M, C
    expected = head.mlp[0](torch.cat((picked[:, 0], picked[:, 1]), dim=-1))
    torch.testing.assert_close(head.project_then_gather(grid, cells), expected)
    torch.testing.assert_close(head.gather_then_project(grid, cells), expected)


@pytest.mark.parametrize('channels,num_samples,per_cell', [
    (16, 16, True),   # 10 cells < 16 pairs, and hidden 16 <= C 16: per cell, fewer multiply-adds and values gathered
    (24, 16, True),
    (16, 8, False),   # 8 pairs < 10 cells: per pair
    (16, 10, False),  # as many pairs as cells: the same multiply-adds, so the path of fewer operators
    (8, 16, False),   # hidden 16 > C 8: per cell would gather more values (hidden instead of C per pair end)
], ids=['hidden-equals-channels', 'wider-grid', 'fewer-pairs-than-cells', 'as-many-pairs-as-cells', 'narrow-grid'])
def test_cpu_heads_project_cells_first_only_where_that_saves_multiply_adds_and_gathered_values(
        channels, num_samples, per_cell):
    # a 2 x 5 grid (10 cells), hidden 16, 3 images: a Linear of 2C -> hidden on 10 rows per image (each cell
    # projected with both halves of W) or on M rows (each pair's [e_a; e_b]): 2 * 3 * rows * 2C * hidden FLOPs
    head = DRLocHead(channels, (2, 5), num_samples=num_samples, hidden_dim=16)
    grid = torch.randn(3, 2, 5, channels)
    cells = draw_cells(3, 10, num_samples, torch.device('cpu'))
    with FlopCounterMode(display=False) as counter:
        head.pair_preactivations(grid, cells)
    assert head.projects_cells_first(grid, num_samples) is per_cell
    assert counter.get_total_flops() == 2 * 3 * (10 if per_cell else num_samples) * 2 * channels * 16


def test_heads_off_the_cpu_gather_the_pairs_first_even_where_the_cpu_projects_cells_first():
    # a GPU step is bound by its launches, and gathering first dispatches fewer operators; the meta device
    # stands in for it (no GPU here): the first layer runs on the 16 gathered pairs, not on the 10 cells
    head = DRLocHead(16, (2, 5), num_samples=16, hidden_dim=16).to('meta')
    grid = torch.randn(3, 2, 5, 16, device='meta')
    cells = draw_cells(3, 10, 16, grid.device)
    with FlopCounterMode(display=False) as counter:
        out = head.pair_preactivations(grid, cells)
    assert out.shape == (3, 16, 16)
    assert not head.projects_cells_first(grid, 16)
    assert head.projects_cells_first(torch.randn(3, 2, 5, 16), 16)
    assert counter.get_total_flops() == 2 * 3 * 16 * 2 * 16 * 16


def test_compiled_heads_project_cells_first_on_any_device_where_that_is_cheaper():
    # inductor fuses the per-cell path's sum and bias add, so launches no longer favour gathering first
    head = DRLocHead(16, (2, 5), num_samples=16, hidden_dim=16)
    narrow = DRLocHead(8, (2, 5), num_samples=16, hidden_dim=16)

    def choices(grid: torch.Tensor) -> torch.Tensor:  # (B, H, W, C) -> (2,): the two heads' choices as numbers
        return grid.new_tensor([float(head.projects_cells_first(grid, 16, device_type='cuda')),
                                float(narrow.projects_cells_first(grid[..., :8], 16, device_type='cuda'))])

    grid = torch.randn(3, 2, 5, 16)
    torch._dynamo.reset()
    assert choices(grid).tolist() == [0., 0.]  # eager, on a GPU: gather first
    assert torch.compile(choices, backend='eager', fullgraph=True)(grid).tolist() == [1., 0.]


@pytest.mark.parametrize('mode', ['l1', 'cbr'])
def test_eager_heads_run_their_last_layer_as_its_module_so_its_hooks_see_every_step(mode):
    # hooks (feature capture, pruning, adapters) see the (B, M, out) output of head.mlp[4]; only a compiled head
    # writes a narrow last layer (l1's 2 outputs, or a 16-wide hidden layer) as a multiply-and-sum
    head = DRLocHead(8, (3, 4), mode=mode, num_samples=5, hidden_dim=16)
    outputs = []
    head.mlp[4].register_forward_hook(lambda module, args, out: outputs.append(out.shape))
    head(torch.randn(2, 3, 4, 8))
    assert outputs == [(2, 5, 2 if mode == 'l1' else 16)]


def test_permuted_nchw_grid_gives_same_loss_as_contiguous_copy():
    torch.manual_seed(0)
    head = DRLocHead(6, (4, 5), hidden_dim=16)
    nchw = torch.randn(2, 6, 4, 5)
    torch.manual_seed(1)
    loss_view = head(nchw.permute(0, 2, 3, 1))
    torch.manual_seed(1)
    loss_copy = head(nchw.permute(0, 2, 3, 1).contiguous())
    torch.testing.assert_close(loss_view, loss_copy)


@pytest.mark.parametrize('mode', ['l1', 'ce', 'cbr'])
def test_loss_is_float32_under_bf16_autocast(mode):
    head = DRLocHead(16, (4, 4), mode=mode, hidden_dim=32)
    grid = torch.randn(2, 4, 4, 16)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        loss = head(grid.bfloat16())
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert head.mlp[0].weight.grad is not None


@pytest.mark.parametrize('mode,normalize', [('l1', False), ('l1', True), ('ce', False), ('cbr', False),
                                            ('cbr', True)])
@pytest.mark.parametrize('grid_size', [(4, 4), (4, 6)], ids=['square', 'non-square'])
def test_loss_is_the_same_float32_whatever_torchs_default_dtype(mode, normalize, grid_size):
    # signed offsets: the class shift k - 1 (and the scale of normalized targets) is per axis on a non-square grid
    torch.manual_seed(0)
    head = DRLocHead(8, grid_size, mode=mode, num_samples=8, use_abs=False, normalize=normalize, hidden_dim=16)
    grid = torch.randn(2, *grid_size, 8)
    torch.manual_seed(1)
    expected = head(grid)
    torch.set_default_dtype(torch.float64)
    try:
        torch.manual_seed(1)  # the same pairs
        loss = head(grid)
    finally:
        torch.set_default_dtype(torch.float32)
    assert loss.dtype == torch.float32 and torch.equal(loss, expected)


def test_smaller_grid_than_built_for_uses_its_own_offsets_and_larger_is_refused():
    head = DRLocHead(8, (6, 6), mode='ce', hidden_dim=16)
    assert torch.isfinite(head(torch.randn(2, 3, 4, 8)))
    with pytest.raises(ValueError, match='larger than the 6x6 grid'):
        head(torch.randn(2, 7, 6, 8))


def test_a_grid_taller_than_a_wide_grid_the_head_was_built_for_is_refused_naming_both_and_the_fix():
    head = DRLocHead(8, (4, 6), mode='cbr', hidden_dim=16)  # 5 rows: more than 4, fewer than the 6 columns
    with pytest.raises(ValueError) as error:
        head(torch.randn(2, 5, 6, 8))
    assert str(error.value) == ("A 5x6 grid is larger than the 4x6 grid this 'cbr' head has offset classes for. "
                                "Wrap the model with the largest input size (input_size=...) or use mode='l1'.")


def test_an_l1_head_runs_on_a_grid_larger_than_it_was_built_for():
    # l1 regresses the offset: no classes tie it to a grid size
    head = DRLocHead(8, (3, 3), hidden_dim=16)
    assert torch.isfinite(head(torch.randn(2, 5, 7, 8)))


@pytest.mark.parametrize('grid_size', [(1, 2), (2, 1)])
def test_two_cells_are_enough_to_train(grid_size):
    # the smallest grid with a relative position: the pairs' offsets are 0 or 1 along its long axis
    head = DRLocHead(8, grid_size, mode='ce', hidden_dim=16)
    assert torch.isfinite(head(torch.randn(2, *grid_size, 8)))


@pytest.mark.slow
@pytest.mark.parametrize('mode', ['l1', 'cbr'])
def test_head_and_loss_compile_fullgraph(mode):
    torch._dynamo.reset()
    head = DRLocHead(16, (4, 5), mode=mode, hidden_dim=32)
    compiled = torch.compile(head, fullgraph=True)
    grid = torch.randn(2, 4, 5, 16, requires_grad=True)
    loss = compiled(grid)
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert grid.grad is not None and grid.grad.abs().sum() > 0


@pytest.mark.parametrize('kwargs,message', [
    (dict(mode='l2'), "mode must be one of l1, ce, cbr, got 'l2'"),
    (dict(num_samples=0), 'num_samples must be an integer >= 1'),
    (dict(num_samples=-3), 'got -3'),
    (dict(hidden_dim=0), 'hidden_dim must be an integer >= 1'),
    (dict(mode='ce', normalize=True), "normalize has no meaning with mode 'ce'"),
    (dict(grid_size=(1, 1)), 'The feature grid is 1x1'),
])
def test_bad_head_arguments_are_refused_with_the_value_and_fix(kwargs, message):
    args = dict(in_dim=8, grid_size=(4, 4))
    args.update(kwargs)
    with pytest.raises(ValueError, match=message.replace('(', r'\(').replace(')', r'\)')):
        DRLocHead(**args)


def test_runtime_1x1_grid_is_refused():
    head = DRLocHead(8, (4, 4), hidden_dim=16)
    with pytest.raises(ValueError, match='1x1'):
        head(torch.randn(2, 1, 1, 8))


def test_numpy_integer_settings_are_accepted_as_integers():
    import numpy as np
    head = DRLocHead(8, (4, 4), num_samples=np.int64(16), hidden_dim=np.int16(8))
    assert (head.num_samples, head.mlp[0].out_features) == (16, 8)
    assert torch.isfinite(head(torch.randn(2, 4, 4, 8)))


def test_memory_estimate_counts_weights_and_pair_activations():
    from timm_drloc.head import head_memory
    # l1 head on one 4x4x8 grid, hidden 16: (2*8+1)*16 + (16+1)*16 + (16+1)*2 = 578 parameters
    memory = head_memory([(8, (4, 4))], hidden_dim=16, num_samples=10, batch_size=3)
    assert memory.weights == 578 * 4 * 4  # float32 weights, gradients and two Adam moments
    assert memory.activations == 4 * 30 * (2 * 8 + 4 * 16 + 2) + 8 * 4 * 30  # 30 pairs, and their positions


def test_positions_are_drawn_on_the_device_asked_for():
    # the meta device stands in for an accelerator: pairs drawn elsewhere would cost a copy per step
    positions = sample_positions(2, 4, 5, 8, torch.device('meta'))
    assert positions.device.type == 'meta' and positions.shape == (2, 2, 8, 2)


def test_a_head_built_with_defaults_is_the_reference_ones():
    # l1 on absolute offsets in grid cells, 64 pairs per image, a 512-wide MLP, not compiled
    head = DRLocHead(8, (4, 4))
    assert (head.mode, head.num_samples, head.use_abs, head.normalize, head.compiled) == ('l1', 64, True, False, False)
    assert [layer.out_features for layer in head.mlp if isinstance(layer, torch.nn.Linear)] == [512, 512, 2]


def test_the_compile_mode_asked_for_is_the_one_torch_compile_gets(monkeypatch):
    # what a mode changes ('reduce-overhead': CUDA graphs) needs a GPU; here the mode handed on is the fact.
    # torch.compile is replaced by a recorder returning the eager step, so the per-mode cache is cleared around it
    modes = []

    def record_mode(function, mode=None):
        modes.append(mode)
        return function
    monkeypatch.setattr(torch, 'compile', record_mode)
    compiled_pair_loss.cache_clear()
    try:
        for compiled in [True, 'reduce-overhead']:
            DRLocHead(8, (3, 3), num_samples=4, hidden_dim=8, compiled=compiled)(torch.randn(2, 3, 3, 8))
    finally:
        compiled_pair_loss.cache_clear()
    assert modes == [None, 'reduce-overhead']


def test_the_heads_repr_lists_its_settings_and_says_compiled_only_when_it_is():
    plain = DRLocHead(16, (4, 5), hidden_dim=8)
    assert plain.extra_repr() == "mode=l1, num_samples=64, use_abs=True, normalize=False, grid_size=(4, 5)"
    compiled = DRLocHead(16, (4, 5), hidden_dim=8, compiled=True)
    assert compiled.extra_repr() == plain.extra_repr() + ", compiled=True"
