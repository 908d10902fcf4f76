"""timm_drloc.settings: each DRLoc setting declared once, as a keyword, a flag, a default and a rule."""
import argparse
import inspect

import pytest

from timm_drloc import DRLocTask, wrap
from timm_drloc.errors import ConfigError, SettingError
from timm_drloc.settings import (
    SETTINGS, add_drloc_args, check_settings, drloc_kwargs, drloc_lambda_for_epoch, ignored_drloc_flags)


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_drloc_args(parser)
    return parser.parse_args(list(argv))


def _defaults(func) -> dict:
    return {name: p.default for name, p in inspect.signature(func).parameters.items()
            if p.default is not inspect.Parameter.empty}


def test_each_flag_default_is_the_keyword_default_of_wrap_and_drloc_task_passes_wrap_keywords_on():
    keywords = drloc_kwargs(_args('--drloc-lambda', '0.5'))  # every flag at its default, DRLoc on
    wrap_defaults, task_defaults = _defaults(wrap), _defaults(DRLocTask.__init__)
    assert keywords.keys() == wrap_defaults.keys() - {'layout', 'input_size'} | {'drloc_lambda'}
    for keyword, value in keywords.items():
        if keyword != 'drloc_lambda':  # the flag's 0 means off; the task's default is the paper's 0.5
            assert value == wrap_defaults[keyword], keyword
            assert keyword not in task_defaults, f'DRLocTask declares {keyword} again instead of passing it to wrap()'
    passed_on = [p.kind for p in inspect.signature(DRLocTask.__init__).parameters.values()][-1]
    assert passed_on is inspect.Parameter.VAR_KEYWORD


def test_flags_map_to_keywords_and_lambda_0_means_no_drloc():
    assert drloc_kwargs(_args('--drloc-signed', '--drloc-samples', '16')) is None
    keywords = drloc_kwargs(_args('--drloc-lambda', '0.5', '--drloc-signed', '--drloc-samples', '16',
                                  '--drloc-layers', 'blocks.1', 'blocks.3'))
    assert (keywords['use_abs'], keywords['num_samples'], keywords['layers']) == (False, 16, ['blocks.1', 'blocks.3'])
    assert 'warmup_epochs' not in keywords and 'decay' not in keywords  # the schedule is not a task keyword


def test_a_rule_reads_in_keywords_for_the_library_and_in_flags_for_the_command_line():
    with pytest.raises(SettingError) as library:
        check_settings(mode='ce', normalize=True)
    assert str(library.value).startswith("normalize has no meaning with mode 'ce'")
    with pytest.raises(ConfigError) as command_line:
        drloc_kwargs(_args('--drloc-lambda', '0.5', '--drloc-mode', 'ce', '--drloc-normalize'))
    assert str(command_line.value).startswith("--drloc-normalize has no meaning with --drloc-mode 'ce'")


def test_the_lambda_schedule_follows_the_flags():
    args = _args('--drloc-lambda', '0.5', '--drloc-warmup-epochs', '2', '--drloc-decay')
    assert [drloc_lambda_for_epoch(args, e, 4) for e in range(4)] == [0.0, 0.25, 0.5, 0.25]


def test_flags_given_without_lambda_are_named_as_ignored():
    assert ignored_drloc_flags(_args('--drloc-multiscale', '--drloc-samples', '16')) == [
        '--drloc-samples', '--drloc-multiscale']
    assert ignored_drloc_flags(_args('--drloc-lambda', '0.5', '--drloc-multiscale')) == []
    assert {s.flag for s in SETTINGS} >= {'--drloc-lambda', '--drloc-layers', '--drloc-decay'}


def test_layers_with_multiscale_is_refused_as_the_multiscale_setting_in_keyword_and_flag_terms():
    with pytest.raises(SettingError) as library:
        check_settings(layers=['blocks.1'], multiscale=True)
    assert (library.value.setting, library.value.value) == ('multiscale', True)
    with pytest.raises(ConfigError) as command_line:
        drloc_kwargs(_args('--drloc-lambda', '0.5', '--drloc-multiscale', '--drloc-layers', 'blocks.1'))
    assert str(command_line.value) == ('--drloc-multiscale picks the stages itself; with --drloc-layers name each '
                                       'grid module instead')


def test_an_empty_layers_list_is_refused_saying_how_to_name_a_grid_module():
    with pytest.raises(SettingError) as error:
        check_settings(layers=[])
    assert str(error.value) == ("layers=[] names no module; name the grid module(s) as model.named_modules() lists "
                                "them, e.g. ['blocks.11'], or layers=None to use timm's feature_info")
