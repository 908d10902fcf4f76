"""`timm-drloc plot`: a valid PNG from summary.csv files, clear failure on folders without one."""
import os

import pytest

from timm_drloc import cli
from timm_drloc.plot import (
    GAIN_COLUMN, GAIN_PANEL, PANELS, paired_gain, plot_experiments, plot_top1_by_size, read_experiment)

PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'

DRLOC_CSV = """epoch,train_loss,train_drloc_loss,drloc_lambda,eval_loss,eval_top1,eval_top5,lr
0,2.40,3.10,0.0,2.20,18.5,60.0,0.0005
1,2.10,2.60,0.25,1.90,35.0,80.0,0.001
2,1.80,2.20,0.5,1.60,52.25,90.0,0.0008
"""

TIMM_CSV = """epoch,train_loss,eval_loss,eval_top1,eval_top5,lr
0,2.30,2.25,15.0,55.0,0.0005
1,2.00,1.95,30.0,75.0,0.001
2,1.75,1.70,45.5,88.0,0.0008
"""


def write_experiment(root, name, text):
    folder = root / name
    folder.mkdir()
    (folder / 'summary.csv').write_text(text)
    return str(folder)


def png_size(path):
    """(width, height) from the IHDR chunk, after checking the signature."""
    with open(path, 'rb') as f:
        head = f.read(24)
    assert head[:8] == PNG_SIGNATURE, f'{path} is not a PNG'
    return int.from_bytes(head[16:20], 'big'), int.from_bytes(head[20:24], 'big')


def test_plot_writes_a_valid_png_for_drloc_and_plain_runs(tmp_path):
    drloc = write_experiment(tmp_path, 'drloc', DRLOC_CSV)
    plain = write_experiment(tmp_path, 'plain', TIMM_CSV)
    out = tmp_path / 'curves.png'
    assert cli.main(['plot', drloc, plain, '-o', str(out)]) == 0
    width, height = png_size(out)
    assert 800 <= width <= 2000 and 500 <= height <= 1500
    from PIL import Image
    with Image.open(out) as image:
        image.verify()  # decodes the chunks: a truncated or corrupt file raises


def test_read_experiment_parses_drloc_columns(tmp_path):
    exp = read_experiment(write_experiment(tmp_path, 'run-a', DRLOC_CSV))
    assert exp.name == 'run-a'
    assert exp.epochs == [0.0, 1.0, 2.0]
    assert exp.columns['eval_top1'] == [18.5, 35.0, 52.25]
    assert exp.columns['drloc_lambda'] == [0.0, 0.25, 0.5]
    assert exp.uses_drloc


def test_plain_timm_summary_has_no_drloc_column_and_still_plots(tmp_path):
    exp = read_experiment(write_experiment(tmp_path, 'plain', TIMM_CSV))
    assert 'train_drloc_loss' not in exp.columns
    assert not exp.uses_drloc
    out = plot_experiments([exp], str(tmp_path / 'plain.png'))
    assert png_size(out)[0] > 0


def test_folder_without_summary_fails_naming_the_folder(tmp_path, capsys):
    empty = tmp_path / 'not-a-run'
    empty.mkdir()
    with pytest.raises(ValueError, match='not-a-run.*has no summary.csv'):
        read_experiment(str(empty))
    assert cli.main(['plot', str(empty), '-o', str(tmp_path / 'x.png')]) != 0
    assert 'not-a-run' in capsys.readouterr().err
    assert not os.path.exists(tmp_path / 'x.png')


def test_summary_with_header_only_says_to_wait_for_an_epoch(tmp_path):
    folder = write_experiment(tmp_path, 'fresh', 'epoch,train_loss,eval_top1\n')
    with pytest.raises(ValueError, match='no epoch rows'):
        read_experiment(folder)


def test_output_name_without_extension_gets_png_and_the_message_names_the_file(tmp_path, capsys):
    drloc = write_experiment(tmp_path, 'drloc', DRLOC_CSV)
    assert cli.main(['plot', drloc, '-o', str(tmp_path / 'curves')]) == 0
    assert capsys.readouterr().out.strip() == f'wrote {tmp_path / "curves.png"}'
    assert png_size(tmp_path / 'curves.png')[0] > 0


def test_output_folder_gets_the_default_file_inside_it(tmp_path, capsys):
    drloc = write_experiment(tmp_path, 'drloc', DRLOC_CSV)
    folder = tmp_path / 'plots'
    folder.mkdir()
    assert cli.main(['plot', drloc, '-o', str(folder)]) == 0
    assert capsys.readouterr().out.strip() == f'wrote {folder / "drloc_curves.png"}'
    assert png_size(folder / 'drloc_curves.png')[0] > 0 and not (tmp_path / 'plots.png').exists()


def test_binary_summary_is_refused_naming_the_file(tmp_path, capsys):
    folder = tmp_path / 'broken'
    folder.mkdir()
    (folder / 'summary.csv').write_bytes(b'\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe\x00')
    assert cli.main(['plot', str(folder), '-o', str(tmp_path / 'x.png')]) == 2
    err = capsys.readouterr().err
    assert f"'{folder / 'summary.csv'}' is not a readable summary.csv" in err and 'Traceback' not in err


def test_paired_gain_is_drloc_top1_minus_baseline_top1_at_each_epoch_both_evaluated(tmp_path):
    drloc = read_experiment(write_experiment(tmp_path, 'drloc', DRLOC_CSV))
    plain = read_experiment(write_experiment(tmp_path, 'plain', TIMM_CSV.replace('1,2.00,1.95,30.0,75.0,0.001\n', '')))
    gain = paired_gain(plain, drloc, 'seed 0')
    assert gain.epochs == [0.0, 2.0]
    assert gain.columns[GAIN_COLUMN] == [18.5 - 15.0, 52.25 - 45.5]
    out = plot_experiments([plain, drloc, gain], str(tmp_path / 'gain.png'), panels=(*PANELS[:3], GAIN_PANEL))
    assert png_size(out)[0] > 0


def test_top1_by_size_plot_is_a_png(tmp_path):
    points = [(100, 0, 'baseline', 30.0), (100, 0, 'drloc', 33.0), (500, 0, 'baseline', 50.0),
              (500, 0, 'drloc', 51.5), (500, 1, 'baseline', 49.0), (500, 1, 'drloc', 52.0)]
    width, height = png_size(plot_top1_by_size(points, str(tmp_path / 'by_size.png')))
    assert 400 <= width <= 1200 and 300 <= height <= 900
