"""What a user gets without asking: the paper's 64 pairs per image, a head that is not compiled, the probe
input's channels from the model's own in_chans, and the DRLoc flags in their own --help group."""
import argparse

import torch
import torch.nn as nn

from timm_drloc import DRLocHead, add_drloc_args, wrap
from timm_drloc.settings import SETTINGS


class StemDeclaredLast(nn.Module):
    """A model that records its input channels, with a later stage registered before its stem."""

    def __init__(self):
        super().__init__()
        self.in_chans = 1
        self.stage = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.stem = nn.Conv2d(1, 8, 3, stride=2, padding=1)
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        return self.fc(self.stage(self.stem(x)).mean((2, 3)))


def test_wrap_draws_the_papers_64_pairs_per_image_by_default():
    drloc = wrap(StemDeclaredLast(), layers=['stage'], input_size=(1, 32, 32), hidden_dim=8)
    assert [head.num_samples for head in drloc.heads] == [64]


def test_a_head_is_compiled_only_when_asked():
    assert DRLocHead(8, (4, 4), hidden_dim=8).compiled is False


def test_without_input_size_the_probe_takes_its_channels_from_the_models_in_chans():
    drloc = wrap(StemDeclaredLast(), layers=['stage'], hidden_dim=8)
    assert drloc.sources[0].grid_size == (56, 56)  # 224 / 4: a 1-channel 224 x 224 probe went through
    _, loss = drloc(torch.randn(2, 1, 32, 32))
    assert torch.isfinite(loss)


def test_the_drloc_flags_appear_in_their_own_help_group_naming_the_method():
    parser = argparse.ArgumentParser()
    add_drloc_args(parser)
    help_text = parser.format_help()
    assert 'DRLoc parameters:\n  The DRLoc auxiliary loss (Liu et al., NeurIPS 2021).' in help_text
    assert '--drloc-lambda' in help_text.split('DRLoc parameters:')[1]  # the flags are listed under it


def test_without_input_size_a_model_with_no_convolution_is_probed_with_three_channels():
    from collections import OrderedDict
    model = nn.Sequential(OrderedDict(features=nn.PixelUnshuffle(4), pool=nn.AdaptiveAvgPool2d(1), flat=nn.Flatten()))
    drloc = wrap(model, layers=['features'], hidden_dim=8)
    assert (drloc.sources[0].num_chs, drloc.sources[0].grid_size) == (3 * 4 * 4, (56, 56))


def test_help_explains_each_drloc_flag():
    parser = argparse.ArgumentParser()
    add_drloc_args(parser)
    help_text = ' '.join(parser.format_help().split())  # argparse wraps help lines at the terminal width
    assert '--drloc-signed predict signed offsets instead of absolute ones' in help_text
    assert '--drloc-lambda W weight of the DRLoc loss; 0 (default) trains plain classification.' in help_text
    for setting in SETTINGS:
        assert ' '.join(setting.help.split()) in help_text, setting.flag
