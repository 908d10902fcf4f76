"""DRLocModel passes the backbone's optimizer hooks through with the 'model.' prefix its parameters gain."""
import re

import pytest
import timm
import torch.nn as nn

from timm_drloc import wrap


def vit():
    return timm.create_model('vit_tiny_patch16_224', num_classes=3, img_size=32, patch_size=8, depth=2,
                             embed_dim=32, num_heads=2)


@pytest.mark.parametrize('coarse', [False, True])
def test_group_matcher_is_the_backbones_anchored_at_model(coarse):
    model = vit()
    drloc = wrap(model, hidden_dim=8)
    inner, outer = model.group_matcher(coarse=coarse), drloc.group_matcher(coarse=coarse)
    assert outer.keys() == inner.keys()
    names = [n for n, _ in model.named_parameters()]
    for key, pattern in inner.items():
        patterns = pattern if isinstance(pattern, (list, tuple)) else [pattern]
        wrapped = outer[key] if isinstance(outer[key], (list, tuple)) else [outer[key]]
        for (p_in, p_out) in zip(patterns, wrapped):
            p_in, p_out = (p_in[0], p_out[0]) if isinstance(p_in, (list, tuple)) else (p_in, p_out)
            for name in names:
                assert bool(re.match(p_in, name)) == bool(re.match(p_out, f'model.{name}')), (key, name)
                assert not re.match(p_out, name)


def test_group_matcher_default_is_the_fine_grouping():
    drloc = wrap(timm.create_model('resnet10t', num_classes=3), hidden_dim=8, input_size=(3, 64, 64))
    assert drloc.group_matcher() == drloc.group_matcher(coarse=False) != drloc.group_matcher(coarse=True)


class Plain(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Conv2d(3, 4, 3, stride=4)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.features(x).mean((2, 3)))


def test_backbone_without_optimizer_hooks_has_no_group_matcher_and_no_weight_decay_exclusions():
    drloc = wrap(Plain(), layers=['features'], input_size=(3, 32, 32), hidden_dim=8)
    with pytest.raises(AttributeError, match='Plain has no group_matcher'):
        drloc.group_matcher()
    assert drloc.no_weight_decay() == set()
    assert wrap(vit(), hidden_dim=8).no_weight_decay() == {'model.pos_embed', 'model.cls_token', 'model.dist_token',
                                                           'model.reg_token'} & {f'model.{n}' for n in
                                                                                 vit().no_weight_decay()}


class Grouped(Plain):
    """A user model whose group_matcher mixes plain patterns, (pattern, order) pairs, or is a function."""

    def __init__(self, as_function: bool = False):
        super().__init__()
        self.as_function = as_function

    def group_matcher(self, coarse: bool = False):
        if self.as_function:
            return lambda name: (0,) if name.startswith('features') else (1,)
        return dict(stem=r'^features', blocks=[r'^fc\.weight', (r'^fc\.bias', (9,))])


def test_group_matcher_patterns_of_every_form_are_anchored_at_model():
    drloc = wrap(Grouped(), layers=['features'], input_size=(3, 32, 32), hidden_dim=8)
    matcher = drloc.group_matcher()
    assert matcher['stem'] == r'^model\.(?:features)'
    (weight, (bias, order)) = matcher['blocks']
    assert (weight, bias, order) == (r'^model\.(?:fc\.weight)', r'^model\.(?:fc\.bias)', (9,))


def test_group_matcher_function_sees_the_backbones_own_names():
    drloc = wrap(Grouped(as_function=True), layers=['features'], input_size=(3, 32, 32), hidden_dim=8)
    matcher = drloc.group_matcher()
    assert [matcher('model.features.weight'), matcher('model.fc.weight'), matcher('features.bias')] == [(0,), (1,), (0,)]


def test_timms_model_attributes_read_the_backbones_through_the_wrapper():
    # what timm's train.py and hub code ask of the model: answered by the backbone, not by an error
    model = vit()
    drloc = wrap(model, hidden_dim=8)
    assert (drloc.num_classes, drloc.num_features, drloc.head_hidden_size) == (3, 32, 32)
    assert drloc.pretrained_cfg is model.pretrained_cfg and drloc.default_cfg == model.default_cfg
    assert drloc.get_classifier() is model.head
    drloc.reset_classifier(5)
    assert model.num_classes == 5 and model.head.out_features == 5
    drloc.set_grad_checkpointing(True)
    assert model.grad_checkpointing is True
    with pytest.raises(AttributeError):
        drloc.cls_token  # the backbone has it, but only the attributes timm asks for pass through
