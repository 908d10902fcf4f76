"""benchmarks/small_data_study.py: class-balanced subsets, the paired statistics, and one toy study end to end."""
import importlib.util
import json
import math
import os

import pytest
import yaml

from conftest import load_benchmark
from timm_drloc.errors import ConfigError
from timm_drloc.paired import Pair, Run, RunResult, markdown_report, pair_up, paired_stats, recorded_result
from timm_drloc.plot import read_experiment

PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'
T_975_DF2 = 4.302653  # Student's t, 97.5th percentile, 2 degrees of freedom (printed tables: 4.303)

study = load_benchmark('small_data_study')

POOL = {'cat': [f'c{i:02d}.jpg' for i in range(20)], 'dog': [f'd{i:02d}.jpg' for i in range(12)]}


# ---------------------------------------------------------------------------------------------------------
# Subsets
# ---------------------------------------------------------------------------------------------------------

def test_subset_has_n_distinct_images_of_every_class_from_that_class():
    subset = study.draw_subset(POOL, 5, seed=0)
    assert sorted(subset) == ['cat', 'dog']
    for cls, names in subset.items():
        assert len(names) == len(set(names)) == 5
        assert set(names) <= set(POOL[cls])


def test_subset_is_the_same_for_the_same_seed_and_differs_between_seeds():
    assert study.draw_subset(POOL, 5, seed=3) == study.draw_subset(POOL, 5, seed=3)
    draws = {tuple(study.draw_subset(POOL, 5, seed=s)['cat']) for s in range(4)}
    assert len(draws) == 4


def test_smaller_subset_of_a_seed_lies_inside_its_larger_subset():
    small, large = study.draw_subset(POOL, 4, seed=1), study.draw_subset(POOL, 10, seed=1)
    for cls in POOL:
        assert set(small[cls]) <= set(large[cls])


def test_subset_larger_than_a_class_is_refused_naming_the_class_and_its_count():
    with pytest.raises(ConfigError, match="class 'dog' has only 12 images"):
        study.draw_subset(POOL, 13, seed=0)


def test_holdout_is_the_last_k_names_of_each_class_and_is_not_in_the_pool():
    rest, held = study.split_holdout(POOL, 3)
    assert held == {'cat': ['c17.jpg', 'c18.jpg', 'c19.jpg'], 'dog': ['d09.jpg', 'd10.jpg', 'd11.jpg']}
    assert all(not set(rest[c]) & set(held[c]) and len(rest[c]) + 3 == len(POOL[c]) for c in POOL)


def test_holdout_that_leaves_no_training_image_is_refused():
    with pytest.raises(ConfigError, match="class 'dog' has 12 images"):
        study.split_holdout(POOL, 12)


def test_study_flag_that_the_study_sets_per_run_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        study.parse_args(['--data', str(tmp_path), '--eval-split', 'validation', '--sizes', '2', '--epochs', '1',
                          '--out', str(tmp_path / 'out'), '--seed', '3'])
    assert exit_info.value.code == 2
    assert '--seed' in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------
# Paired statistics
# ---------------------------------------------------------------------------------------------------------

def result(size, seed, arm, final, best):
    run = Run(f'n{size}-seed{seed}-{arm}', f'/x/n{size}-seed{seed}-{arm}', ('python',), 1, size, seed, arm)
    return RunResult(run, final, best, 60.0)


def test_paired_stats_mean_std_range_and_t_interval_match_hand_computed_values():
    stats = paired_stats([1.0, 2.0, 6.0])
    # mean 3; squared deviations 4 + 1 + 9 = 14 over n - 1 = 2: std sqrt(7); half width t * sqrt(7) / sqrt(3)
    half = T_975_DF2 * math.sqrt(7.0) / math.sqrt(3.0)
    assert (stats.n, stats.mean, stats.min, stats.max) == (3, 3.0, 1.0, 6.0)
    assert stats.std == pytest.approx(math.sqrt(7.0))
    assert stats.ci_low == pytest.approx(3.0 - half, rel=1e-6) and stats.ci_high == pytest.approx(3.0 + half, rel=1e-6)


def test_paired_stats_of_one_seed_has_no_interval():
    stats = paired_stats([2.5])
    assert stats.mean == 2.5 and stats.ci_low is None and stats.ci_high is None


def test_pairs_subtract_baseline_from_drloc_per_size_and_seed():
    results = [result(100, 0, 'baseline', 40.0, 42.0), result(100, 0, 'drloc', 45.5, 46.0),
               result(100, 1, 'drloc', 39.0, 41.0), result(100, 1, 'baseline', 41.0, 41.0)]
    pairs = pair_up(results)
    assert [(p.size, p.seed) for p in pairs] == [(100, 0), (100, 1)]
    assert [p.delta_final for p in pairs] == [5.5, -2.0]
    assert [p.delta_best for p in pairs] == [4.0, 0.0]


def test_pair_without_its_baseline_is_an_error_naming_size_and_seed():
    with pytest.raises(ValueError, match='size 100, seed 2 has no baseline'):
        pair_up([result(100, 2, 'drloc', 50.0, 50.0)])


def test_markdown_report_has_each_pair_and_the_mean_and_range_of_the_deltas():
    pairs = [Pair(500, s, result(500, s, 'baseline', 50.0, 51.0), result(500, s, 'drloc', 50.0 + d, 52.0))
             for s, d in ((0, 1.0), (1, 2.0), (2, 6.0))]
    text = markdown_report(pairs, '# title')
    assert '| 500 | 2 | 50.00 | 56.00 | +6.00 |' in text
    half = T_975_DF2 * math.sqrt(7.0) / math.sqrt(3.0)
    assert f'**+3.00** | +1.00 .. +6.00 | {3 - half:+.2f} .. {3 + half:+.2f} |' in text


def test_finished_run_of_another_command_is_an_error_not_a_result(tmp_path):
    run = Run('n2-seed0-drloc', str(tmp_path), ('python', '-m', 'timm_drloc.cli', 'train', 'a'), 1, 2, 0, 'drloc')
    assert recorded_result(run) is None
    (tmp_path / 'paired_run.json').write_text(json.dumps(
        dict(command=['-m', 'timm_drloc.cli', 'train', 'b'], final=50.0, best=60.0, seconds=3.0)))
    with pytest.raises(ConfigError, match='finished run of another command'):
        recorded_result(run)


# ---------------------------------------------------------------------------------------------------------
# End to end, at toy size
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.skipif(importlib.util.find_spec('timm_drloc.train') is None, reason='train_drloc.py not in this checkout')
@pytest.mark.slow
def test_toy_study_trains_both_arms_on_the_same_subset_reports_them_and_skips_them_when_rerun(
        image_folder_factory, tmp_path, capsys):
    data = image_folder_factory(num_classes=2, size=16, images_per_class=6)
    out = tmp_path / 'study'
    argv = ['--data', str(data), '--eval-split', 'validation', '--sizes', '4', '--epochs', '1', '--seeds', '0',
            '--out', str(out), '--jobs', '2', '--threads', '1', '--drloc-lambda', '0.5',
            '--model', 'vit_tiny_patch16_224', '--model-kwargs', 'img_size=16', 'patch_size=4', 'embed_dim=32',
            'depth=1', 'num_heads=2', '--img-size', '16', '-b', '4', '--warmup-epochs', '0',
            '--drloc-hidden-dim', '16', '--workers', '0']
    assert study.main(argv) == 0

    subset = out / 'data' / 'n4-seed0' / 'train'
    assert {c: len(os.listdir(subset / c)) for c in os.listdir(subset)} == {'class_0': 4, 'class_1': 4}
    report = json.loads((out / 'results.json').read_text())
    [pair] = report['pairs']
    assert (pair['size'], pair['seed']) == (4, 0)
    for arm in ('baseline', 'drloc'):
        assert 0.0 <= pair[arm]['final'] <= 100.0
    assert pair['delta_final'] == pytest.approx(pair['drloc']['final'] - pair['baseline']['final'])
    assert report['sizes']['4']['delta_final']['mean'] == pytest.approx(pair['delta_final'])
    assert '| 4 | 0 |' in (out / 'results.md').read_text()
    assert (out / 'top1_by_size.png').read_bytes()[:8] == PNG_SIGNATURE
    runs = out / 'runs'
    assert read_experiment(str(runs / 'n4-seed0-drloc')).columns['drloc_lambda'] == [0.5]
    assert 'drloc_lambda' not in read_experiment(str(runs / 'n4-seed0-baseline')).columns
    for arm in ('baseline', 'drloc'):  # both arms trained on the same subset, with the same seed
        args = yaml.safe_load((runs / f'n4-seed0-{arm}' / 'args.yaml').read_text())
        assert (args['data'], args['seed']) == (str(out / 'data' / 'n4-seed0'), 0)

    logs = {arm: (runs / f'n4-seed0-{arm}.log').stat().st_mtime_ns for arm in ('baseline', 'drloc')}
    capsys.readouterr()
    assert study.main(argv) == 0
    assert capsys.readouterr().out.count('finished before') == 2
    assert logs == {arm: (runs / f'n4-seed0-{arm}.log').stat().st_mtime_ns for arm in ('baseline', 'drloc')}
