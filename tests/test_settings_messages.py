"""check_settings word for word: each value that cannot work is refused naming its setting, the value and the fix,
and the values next to them pass."""
import pytest

from timm_drloc.errors import SettingError
from timm_drloc.settings import check_settings

PAPER_LAMBDAS = 'use 0 to turn DRLoc off, or a weight such as 0.5 (Swin) / 0.1 (T2T, CvT) as in the paper'
REFUSED = [
    (dict(drloc_lambda=-1.0), 'drloc_lambda', f'drloc_lambda must be a finite number >= 0, got -1.0; {PAPER_LAMBDAS}'),
    (dict(drloc_lambda=float('inf')), 'drloc_lambda', f'drloc_lambda must be a finite number >= 0, got inf; '
                                                      f'{PAPER_LAMBDAS}'),
    (dict(drloc_lambda=True), 'drloc_lambda', f'drloc_lambda must be a finite number >= 0, got True; {PAPER_LAMBDAS}'),
    (dict(drloc_lambda='0.5'), 'drloc_lambda', f"drloc_lambda must be a finite number >= 0, got '0.5'; {PAPER_LAMBDAS}"),
    (dict(mode='l2'), 'mode', "mode must be one of l1, ce, cbr, got 'l2'"),
    (dict(num_samples=0), 'num_samples',
     'num_samples must be an integer >= 1 (pairs per image), got 0; the reference uses 64'),
    (dict(num_samples=True), 'num_samples',
     'num_samples must be an integer >= 1 (pairs per image), got True; the reference uses 64'),
    (dict(hidden_dim=0), 'hidden_dim', 'hidden_dim must be an integer >= 1, got 0; the reference uses 512'),
    (dict(hidden_dim=2.5), 'hidden_dim', 'hidden_dim must be an integer >= 1, got 2.5; the reference uses 512'),
    (dict(normalize=True, mode='ce'), 'normalize',
     "normalize has no meaning with mode 'ce': its targets are offset classes, not values; drop normalize, or use "
     "mode 'l1' or 'cbr'"),
    (dict(compile_head='fast'), 'compile_head', "compile_head must be True, False or a torch.compile mode (default, "
                                                "reduce-overhead, max-autotune, max-autotune-no-cudagraphs), got 'fast'"),
    (dict(warmup_epochs=-1), 'warmup_epochs', 'warmup_epochs must be an integer >= 0, got -1'),
]


@pytest.mark.parametrize('values, setting, message', REFUSED, ids=[str(v) for v, _, _ in REFUSED])
def test_a_value_that_cannot_work_is_refused_naming_the_setting_the_value_and_the_fix(values, setting, message):
    with pytest.raises(SettingError) as error:
        check_settings(**values)
    assert (error.value.setting, str(error.value)) == (setting, message)
    assert error.value.value == values[setting] and type(error.value.value) is type(values[setting])


ACCEPTED = [
    dict(drloc_lambda=0), dict(drloc_lambda=0.5), dict(drloc_lambda=2), dict(mode='l1'), dict(mode='cbr'),
    dict(num_samples=1), dict(hidden_dim=1), dict(warmup_epochs=0), dict(normalize=True, mode='l1'),
    dict(normalize=True, mode='cbr'), dict(normalize=False, mode='ce'), dict(compile_head=True),
    dict(compile_head=False), dict(compile_head='max-autotune'), dict(layers='blocks.1'),
    dict(layers=None, multiscale=True),
]


@pytest.mark.parametrize('values', ACCEPTED, ids=[str(v) for v in ACCEPTED])
def test_the_values_next_to_the_refused_ones_pass(values):
    assert check_settings(**values) is None
