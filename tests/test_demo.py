"""The digits demo: the ImageFolder it writes, and a tiny end-to-end run of both trainings."""
import importlib.util
import json
import os

import numpy as np
import pytest
import yaml
from PIL import Image

from timm_drloc.demo import MODEL_KWARGS, main as demo_main, parse_args, write_digits
from timm_drloc.plot import read_experiment

DIGITS = [str(d) for d in range(10)]


def test_digits_image_folder_has_ten_classes_with_the_requested_counts(tmp_path):
    counts = write_digits(str(tmp_path), train_per_class=7, val_per_class=3, img_size=24)
    for split, per_class in (('train', 7), ('validation', 3)):
        assert sorted(os.listdir(tmp_path / split)) == DIGITS
        for digit in DIGITS:
            files = os.listdir(tmp_path / split / digit)
            assert len(files) == per_class and all(f.endswith('.png') for f in files)
        assert counts[split] == {d: per_class for d in DIGITS}


def test_digits_are_real_rgb_images_of_the_requested_size(tmp_path):
    write_digits(str(tmp_path), train_per_class=2, val_per_class=1, img_size=32)
    folder = tmp_path / 'train' / '0'
    for name in os.listdir(folder):
        with Image.open(folder / name) as image:
            assert image.mode == 'RGB' and image.size == (32, 32)
            pixels = np.asarray(image)
        assert pixels.max() > 150 and pixels.min() < 30  # a bright stroke on a dark background
        assert (pixels[..., 0] == pixels[..., 1]).all()  # grayscale scan in three equal channels


def test_digits_split_is_fixed_by_the_seed_and_train_and_validation_do_not_overlap(tmp_path):
    write_digits(str(tmp_path / 'a'), train_per_class=5, val_per_class=5, seed=3)
    write_digits(str(tmp_path / 'b'), train_per_class=5, val_per_class=5, seed=3)
    for digit in DIGITS:
        train = set(os.listdir(tmp_path / 'a' / 'train' / digit))
        val = set(os.listdir(tmp_path / 'a' / 'validation' / digit))
        assert not train & val
        assert train == set(os.listdir(tmp_path / 'b' / 'train' / digit))


def test_digits_all_remaining_images_go_to_validation_when_val_per_class_is_none(tmp_path):
    counts = write_digits(str(tmp_path), train_per_class=40, val_per_class=None, img_size=8)
    assert sum(counts['train'].values()) == 400
    assert sum(counts['train'].values()) + sum(counts['validation'].values()) == 1797


def test_digits_split_larger_than_the_rarest_digit_is_refused(tmp_path):
    with pytest.raises(ValueError, match='rarest digit has 174'):
        write_digits(str(tmp_path), train_per_class=150, val_per_class=30)


@pytest.mark.skipif(importlib.util.find_spec('timm_drloc.train') is None,
                    reason='timm_drloc.train (train_drloc.py) is not in this checkout yet')
@pytest.mark.slow
def test_demo_trains_baseline_and_drloc_and_writes_table_and_curves(tmp_path):
    out = tmp_path / 'demo'
    args = ['--out', str(out), '--epochs', '1', '--seeds', '0', '--train-per-class', '4', '--val-per-class', '2',
            '--img-size', '16', '-b', '8', '--drloc-hidden-dim', '16',
            '--model-kwargs', 'patch_size=4', 'embed_dim=32', 'depth=1', 'num_heads=2',
            '--warmup-epochs', '0']  # the last one is passed on to train_drloc.py
    assert demo_main(args) == 0
    [pair] = json.loads((out / 'results.json').read_text())['pairs']
    assert pair['seed'] == 0
    for arm in ('baseline', 'drloc'):
        assert 0.0 <= pair[arm]['final'] <= 100.0 and 0.0 <= pair[arm]['best'] <= 100.0
    assert pair['delta_final'] == pytest.approx(pair['drloc']['final'] - pair['baseline']['final'])
    assert 'Paired delta' in (out / 'results.md').read_text()
    assert (out / 'curves.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    drloc = read_experiment(str(out / 'runs' / 'seed0-drloc')).columns
    baseline = read_experiment(str(out / 'runs' / 'seed0-baseline')).columns
    assert drloc['drloc_lambda'] == [0.5]
    for arm in ('baseline', 'drloc'):  # the model's input size follows --img-size: a 4x4 grid of 4-pixel patches
        args = yaml.safe_load((out / 'runs' / f'seed0-{arm}' / 'args.yaml').read_text())
        assert args['model_kwargs']['img_size'] == 16 and args['seed'] == 0
    assert drloc['train_drloc_loss'][0] > 0
    assert baseline.get('drloc_lambda', [0.0]) == [0.0]


def test_demo_model_kwargs_default_to_the_default_vits_and_another_model_gets_none():
    args, _ = parse_args(['--img-size', '24'])
    assert args.model_kwargs == ['img_size=24', *MODEL_KWARGS]
    args, _ = parse_args(['--model', 'resnet10t', '--img-size', '64'])  # ViT keywords would fail in a ResNet
    assert args.model_kwargs == []
    args, _ = parse_args(['--model', 'resnet10t', '--model-kwargs', 'stem_width=16'])
    assert args.model_kwargs == ['stem_width=16']


def test_demo_refuses_fewer_than_one_job_at_a_time(capsys):
    with pytest.raises(SystemExit) as exc:
        parse_args(['--jobs', '0'])
    assert exc.value.code == 2
    assert '--jobs 0: run at least 1 training at a time.' in capsys.readouterr().err
