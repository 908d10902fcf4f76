"""summary.csv's train_drloc_loss is the DRLoc loss the training steps computed: their mean over the epoch."""
import csv

import pytest

import timm_drloc.train as train
from timm_drloc import DRLocTask

pytestmark = pytest.mark.training_run  # trains: left out of the core modules' mutation run


def test_logged_drloc_loss_is_the_mean_of_the_drloc_losses_of_the_epochs_steps(monkeypatch, tmp_path,
                                                                                image_folder_factory):
    data = image_folder_factory(images_per_class=8)  # 24 images, batch 8: 3 steps
    steps = []
    forward = DRLocTask.forward

    def recording_forward(self, input, target):
        result = forward(self, input, target)
        steps.append((result['drloc_loss'].item(), input.shape[0]))
        return result
    monkeypatch.setattr(DRLocTask, 'forward', recording_forward)
    monkeypatch.setattr('sys.argv', [
        'train_drloc.py', '--data-dir', str(data), '--model', 'vit_tiny_patch16_224', '--model-kwargs', 'img_size=32',
        'patch_size=8', 'depth=1', 'embed_dim=32', 'num_heads=2', '--img-size', '32', '--num-classes', '3',
        '--device', 'cpu', '-j', '0', '-b', '8', '--epochs', '1', '--drloc-lambda', '0.5', '--drloc-hidden-dim', '16',
        '--output', str(tmp_path), '--experiment', 'run'])
    train.main()

    with (tmp_path / 'run' / 'summary.csv').open() as f:
        row, = csv.DictReader(f)
    assert len(steps) == 3 and len({loss for loss, _ in steps}) == 3
    mean = sum(loss * n for loss, n in steps) / sum(n for _, n in steps)
    assert float(row['train_drloc_loss']) == pytest.approx(mean, rel=1e-6)
    assert float(row['train_loss']) != pytest.approx(mean, rel=1e-3)  # the total loss is logged on its own
