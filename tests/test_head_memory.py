"""The memory estimate that refuses DRLoc heads too large for their device (head_memory, memory_text):
its weight count is the real head's, for every mode, and the figures it prints are readable."""
import pytest
import torch

from timm_drloc.head import DRLocHead, head_memory, memory_text

BYTES_PER_PARAMETER = 4 * 4  # float32 weights, gradients and two Adam moments


@pytest.mark.parametrize('mode', ['l1', 'ce', 'cbr'])
@pytest.mark.parametrize('use_abs', [True, False])
def test_estimated_weights_are_those_of_the_head_it_estimates(mode, use_abs):
    head = DRLocHead(8, (3, 5), mode=mode, use_abs=use_abs, hidden_dim=16)
    parameters = sum(p.numel() for p in head.parameters())
    memory = head_memory([(8, (3, 5))], hidden_dim=16, num_samples=10, mode=mode, use_abs=use_abs)
    assert memory.weights == BYTES_PER_PARAMETER * parameters


def test_the_estimate_of_several_grids_is_the_sum_of_each_grids_estimate():
    grids = [(8, (4, 4)), (32, (2, 2))]
    settings = dict(hidden_dim=16, num_samples=10, mode='cbr', batch_size=3)
    each = [head_memory([grid], **settings) for grid in grids]
    both = head_memory(grids, **settings)
    assert (both.weights, both.activations) == (sum(m.weights for m in each), sum(m.activations for m in each))


@pytest.mark.parametrize('size, text', [(512, '512 B'), (1024, '1 KiB'), (5 * 2 ** 20, '5 MiB'),
                                        (1.5 * 2 ** 30, '1.5 GiB'), (1007 * 2 ** 30, '1007 GiB'),
                                        (3 * 2 ** 40, '3 TiB')])
def test_memory_figures_are_written_in_binary_units(size, text):
    assert memory_text(size) == text
