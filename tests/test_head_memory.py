"""The memory estimate that refuses DRLoc heads too large for their device (head_memory, memory_text):
its weight count is the real head's, for every mode, and the figures it prints are readable."""
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from timm_drloc.head import DRLocHead, HeadTooLargeError, check_head_memory, device_memory, head_memory, memory_text

BYTES_PER_PARAMETER = 4 * 4  # float32 weights, gradients and two Adam moments


@pytest.mark.parametrize('mode', ['l1', 'ce', 'cbr'])
@pytest.mark.parametrize('use_abs', [True, False, None], ids=['absolute', 'signed', 'default'])
def test_estimated_weights_are_those_of_the_head_it_estimates(mode, use_abs):
    offsets = {} if use_abs is None else dict(use_abs=use_abs)  # None: both at their defaults
    head = DRLocHead(8, (3, 5), mode=mode, hidden_dim=16, **offsets)
    parameters = sum(p.numel() for p in head.parameters())
    memory = head_memory([(8, (3, 5))], hidden_dim=16, num_samples=10, mode=mode, **offsets)
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


# an l1 head on one 4 x 4 x 8 grid, hidden 16, 10 pairs per image: 578 parameters (see test_head.py), and per
# pair 4 bytes x (2 x 8 + 4 x 16 + 2) activations plus 8 x 4 bytes of positions = 360 bytes
GRIDS = [(8, (4, 4))]
WEIGHTS, PER_IMAGE = 578 * BYTES_PER_PARAMETER, 10 * 360


def test_the_estimate_is_for_one_image_unless_told():
    assert head_memory(GRIDS, hidden_dim=16, num_samples=10) == (WEIGHTS, PER_IMAGE)
    meta = torch.device('meta')  # no memory figure: nothing refused, the estimate returned
    assert check_head_memory(GRIDS, 16, 10, 'l1', True, meta) == (WEIGHTS, PER_IMAGE)


@pytest.mark.parametrize('use_abs', [True, False], ids=['absolute', 'signed'])
def test_the_checked_estimate_counts_the_offset_classes_of_the_heads_settings(use_abs):
    head = DRLocHead(8, (3, 5), mode='ce', use_abs=use_abs, hidden_dim=16)
    memory = check_head_memory([(8, (3, 5))], 16, 10, 'ce', use_abs, torch.device('meta'))
    assert memory.weights == BYTES_PER_PARAMETER * sum(p.numel() for p in head.parameters())


def fake_cuda(monkeypatch, total_memory: int) -> torch.device:
    """A CUDA device of `total_memory` bytes (this machine has none): the driver's properties of cuda:1."""
    device = torch.device('cuda', 1)

    def get_device_properties(asked):
        assert asked == device
        return SimpleNamespace(total_memory=total_memory)
    monkeypatch.setattr(torch.cuda, 'get_device_properties', get_device_properties)
    return device


def test_a_cuda_devices_memory_is_the_drivers_total_for_that_device(monkeypatch):
    assert device_memory(fake_cuda(monkeypatch, 80 * 2 ** 30)) == 80 * 2 ** 30


@pytest.mark.skipif(not Path('/proc/meminfo').is_file(), reason='Linux: /proc/meminfo states the total')
def test_the_cpus_memory_is_the_hosts_total_memory():
    kib = int(re.search(r'MemTotal:\s+(\d+) kB', Path('/proc/meminfo').read_text()).group(1))
    assert device_memory(torch.device('cpu')) == kib * 1024
    assert device_memory(torch.device('meta')) is None  # no memory figure: nothing is refused there


def test_heads_that_exactly_fill_a_device_are_accepted_one_byte_less_refused(monkeypatch):
    total = WEIGHTS + 3 * PER_IMAGE
    assert check_head_memory(GRIDS, 16, 10, 'l1', True, fake_cuda(monkeypatch, total), batch_size=3).total == total
    with pytest.raises(HeadTooLargeError):
        check_head_memory(GRIDS, 16, 10, 'l1', True, fake_cuda(monkeypatch, total - 1), batch_size=3)


def test_heads_too_large_for_their_device_are_refused_naming_the_sizes_settings_and_fix(monkeypatch):
    device = fake_cuda(monkeypatch, 16 * 2 ** 10)
    with pytest.raises(HeadTooLargeError) as error:
        check_head_memory(GRIDS, 16, 10, 'l1', True, device, batch_size=3)
    # 9248 + 10800 bytes: 19.58 KiB = 9.031 KiB of weights + 10.55 KiB of activations
    assert str(error.value) == (
        "The DRLoc heads would need about 19.58 KiB (9.031 KiB for the weights with hidden_dim=16, 10.55 KiB of "
        "activations for num_samples=10 pairs x 3 image(s)), more than the 16 KiB of cuda. Lower hidden_dim or "
        "num_samples (the reference uses 512 and 64).")
    assert (error.value.available, error.value.device, error.value.batch_size) == (16 * 2 ** 10, device, 3)
