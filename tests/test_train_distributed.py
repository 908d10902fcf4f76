"""torchrun --nproc_per_node 2 on CPU (gloo): the run completes, ranks agree, drloc loss is the mean over ranks."""
import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow  # real torchrun processes: left out of mutation runs

REPO = Path(__file__).resolve().parents[1]

# Runs train_drloc in each rank and dumps, after every epoch, the rank's DRLoc model weights and the
# (local, reduced) values that went through the epoch-end mean over ranks.
RANK_DUMP = r'''
import os, sys
import torch
import timm_drloc.train as train
from timm_drloc import unwrap

dump_dir = os.environ['DUMP_DIR']
rank = int(os.environ['RANK'])
reduced = []
mean_over_ranks = train.loop._mean_over_ranks
def recording_mean(values, args, device):
    out = mean_over_ranks(values, args, device)
    reduced.append((list(values), list(out)))
    return out
train.loop._mean_over_ranks = recording_mean

train_one_epoch = train.loop.train_one_epoch
def dumping_train_one_epoch(run, epoch):
    metrics = train_one_epoch(run, epoch)
    drloc = run.task.get_trainable_module().module  # DDP -> DRLocModel
    state = {k: v.detach().clone() for k, v in drloc.state_dict().items()}
    torch.save({'state': state, 'epoch_end': reduced[-1], 'metrics': dict(metrics)},
               os.path.join(dump_dir, f'rank{rank}-epoch{epoch}.pt'))
    return metrics
train.loop.train_one_epoch = dumping_train_one_epoch

if 'BAD_RANK' in os.environ:  # the loss of one training forward becomes Inf on one rank only
    build_task = train.build_task
    def build(*args, **kwargs):
        task = build_task(*args, **kwargs)
        forward, calls = task.forward, []
        def poisoned(input, target):
            result = forward(input, target)
            calls.append(1)
            if rank == int(os.environ['BAD_RANK']) and len(calls) == int(os.environ['BAD_CALL']):
                result['loss'] = result['loss'] * float('inf')
            return result
        task.forward = poisoned
        return task
    train.build_task = build
train.run(sys.argv[1:])
'''


def _torchrun(tmp_path, image_folder, *extra, env=()):
    """Two CPU ranks (gloo) of RANK_DUMP training the tiny ViT with DRLoc; the finished process."""
    script = tmp_path / 'rank_dump.py'
    script.write_text(RANK_DUMP)
    env = dict(os.environ, DUMP_DIR=str(tmp_path), PYTHONPATH=str(REPO), OMP_NUM_THREADS='1', **dict(env))
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2', str(script),
           '--data-dir', str(image_folder), '--model', 'vit_tiny_patch16_224', '--model-kwargs', 'img_size=32',
           'patch_size=8', 'depth=2', 'embed_dim=32', 'num_heads=2', '--img-size', '32', '--device', 'cpu',
           '-j', '0', '-b', '4', '--opt', 'adamw', '--lr', '3e-3', '--warmup-epochs', '0',
           '--no-aug', '--drloc-lambda', '0.5', '--output', str(tmp_path), *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=540, env=env)


def _rank_states(tmp_path, epoch: int):
    return [torch.load(tmp_path / f'rank{r}-epoch{epoch}.pt', weights_only=False) for r in (0, 1)]


def test_torchrun_two_ranks_agree_and_log_the_mean_drloc_loss(tmp_path, image_folder):
    proc = _torchrun(tmp_path, image_folder, '--epochs', '2', '--experiment', 'ddp')
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert 'Distributed training: process 1 of 2' in proc.stderr + proc.stdout

    with (tmp_path / 'ddp' / 'summary.csv').open() as f:
        rows = list(csv.DictReader(f))
    assert [int(r['epoch']) for r in rows] == [0, 1]
    for epoch, row in enumerate(rows):
        ranks = _rank_states(tmp_path, epoch)
        # model and DRLoc heads identical on both ranks after the epoch's updates
        assert ranks[0]['state'].keys() == ranks[1]['state'].keys()
        assert any(k.startswith('heads.') for k in ranks[0]['state'])
        for key, value in ranks[0]['state'].items():
            assert torch.equal(value, ranks[1]['state'][key]), key
        # epoch-end values: [loss avg, drloc avg] local per rank, then the mean over ranks
        local = [rank['epoch_end'][0] for rank in ranks]
        assert local[0] != local[1], 'ranks saw the same data: the distributed sampler is not in use'
        mean = [(a + b) / 2 for a, b in zip(*local)]
        assert ranks[0]['epoch_end'][1] == pytest.approx(mean, rel=1e-6)
        assert float(row['train_loss']) == pytest.approx(mean[0], rel=1e-6)
        assert float(row['train_drloc_loss']) == pytest.approx(mean[1], rel=1e-6)


def test_torchrun_an_inf_loss_on_one_rank_under_fp16_amp_is_skipped_by_both(tmp_path, image_folder):
    # 24 images, 2 ranks, batch 4: 3 steps per epoch; rank 1's second forward (epoch 0, step 1) gives Inf
    proc = _torchrun(tmp_path, image_folder, '--epochs', '1', '--experiment', 'ddp16', '--amp', '--amp-dtype',
                     'float16', env={'BAD_RANK': '1', 'BAD_CALL': '2'})
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-6000:]
    # rank 0 logs, and names where the Inf came from: not its own loss
    assert 'non-finite loss on another rank at epoch 0, step 1 (loss=' in output
    assert 'step skipped, no update (1 in a row' in output
    assert 'Epoch 0: 1 of 3 steps skipped for a non-finite loss' in output
    ranks = _rank_states(tmp_path, 0)
    for key, value in ranks[0]['state'].items():
        assert torch.equal(value, ranks[1]['state'][key]), key
        assert torch.isfinite(value).all(), key


def test_torchrun_feature_distillation_plus_drloc_keeps_student_projection_and_heads_equal(tmp_path, image_folder):
    import timm
    from timm_drloc import hub
    teacher_kwargs = dict(img_size=32, patch_size=8, depth=1, embed_dim=64, num_heads=2)  # wider: a projection
    teacher = timm.create_model('vit_tiny_patch16_224', num_classes=3, **teacher_kwargs)
    folder = hub.export(teacher, tmp_path / 'teacher', model_kwargs=teacher_kwargs)
    proc = _torchrun(tmp_path, image_folder, '--epochs', '1', '--experiment', 'ddp_kd',
                     '--kd-model-name', f'local-dir:{folder}', '--kd-distill-type', 'feature')
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert 'DRLocTask over FeatureDistillationTask' in proc.stdout + proc.stderr

    ranks = _rank_states(tmp_path, 0)
    keys = ranks[0]['state'].keys()
    assert any(k.startswith('heads.') for k in keys) and any('projection' in k for k in keys)
    for key, value in ranks[0]['state'].items():  # student, projection and DRLoc heads, one model on both ranks
        assert torch.equal(value, ranks[1]['state'][key]), key
    local = [rank['epoch_end'][0] for rank in ranks]
    with (tmp_path / 'ddp_kd' / 'summary.csv').open() as f:
        row = next(csv.DictReader(f))
    assert float(row['train_drloc_loss']) == pytest.approx((local[0][1] + local[1][1]) / 2, rel=1e-6)
