"""The benchmarks' `--first-layer` option (overhead.py, opcount.py, gpu_diag.py): it makes DRLoc heads take one
first-layer path, or a GPU head's choice, whatever the head would choose here; opcount counts a GPU head's
choice by default. And benchmarks/first_layer.py, which times the two paths."""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from conftest import load_benchmark as load
from timm_drloc import DRLocHead
from timm_drloc.head import draw_cells


def first_layer_rows(head: DRLocHead, height: int, width: int, num_samples: int) -> int:
    """Rows per image the head's first layer ran on: H * W when it projected every cell, M for the pairs."""
    grid = torch.randn(2, height, width, 32)
    with FlopCounterMode(display=False) as counter:
        head.pair_preactivations(grid, draw_cells(2, height * width, num_samples, grid.device))
    return counter.get_total_flops() // (2 * 2 * 2 * 32 * 16)


@pytest.fixture
def class_restored(monkeypatch):
    # force_first_layer without heads patches DRLocHead itself; monkeypatch puts the original back afterwards
    monkeypatch.setattr(DRLocHead, 'projects_cells_first', DRLocHead.projects_cells_first)


def test_forcing_the_given_heads_changes_only_those_heads():
    overhead = load('overhead')
    forced, other = (DRLocHead(32, (6, 6), num_samples=8, hidden_dim=16) for _ in range(2))
    overhead.force_first_layer('project-then-gather', [forced])
    assert first_layer_rows(forced, 6, 6, 8) == 36  # every cell, though 8 pairs are fewer than 36 cells
    assert first_layer_rows(other, 6, 6, 8) == 8


@pytest.mark.parametrize('choice,rows', [('gather-then-project', 64), ('project-then-gather', 16), ('auto', 16),
                                         ('as-on-gpu', 64)])
def test_forcing_every_head_of_the_process_makes_new_heads_take_that_path(choice, rows, class_restored):
    overhead = load('overhead')
    overhead.force_first_layer(choice)
    head = DRLocHead(32, (4, 4), num_samples=64, hidden_dim=16)  # on the CPU, auto projects its 16 cells first
    assert first_layer_rows(head, 4, 4, 64) == rows


def test_opcount_counts_the_path_a_gpu_head_takes_unless_told_otherwise():
    opcount = load('opcount')
    assert opcount.parse_args([]).first_layer == 'as-on-gpu'
    assert opcount.parse_args(['--first-layer', 'auto']).first_layer == 'auto'
    assert load('overhead').parse_args([]).first_layer == 'auto'


@pytest.mark.parametrize('grid,picks', [((4, 4, 16), 'project'), ((4, 4, 8), 'gather'), ((9, 9, 16), 'gather')])
def test_first_layer_benchmark_reports_the_path_the_cpu_head_picks_for_each_grid(grid, picks):
    # m = 32 pairs, hidden 16: per cell only on a grid of fewer than 32 cells and at least 16 channels
    first_layer = load('first_layer')
    args = first_layer.parse_args(['--batch-size', '2', '--samples', '32', '--hidden-dim', '16', '--steps', '3',
                                   '--warmup', '0'])
    choice, project, gather, (ratio, low, high) = first_layer.time_grid(grid, args, torch.device('cpu'))
    assert choice == picks
    assert project > 0 and gather > 0 and low <= ratio <= high


def test_first_layer_benchmark_refuses_a_grid_without_channels_naming_it(capsys):
    first_layer = load('first_layer')
    with pytest.raises(SystemExit) as stopped:
        first_layer.parse_args(['--grids', '7x7'])
    assert stopped.value.code == 2
    assert "grid '7x7' is not HxWxC (for example 7x7x768)" in capsys.readouterr().err
    assert first_layer.parse_grid('14X14x384') == (14, 14, 384)
