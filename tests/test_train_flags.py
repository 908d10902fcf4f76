"""Flag parity with timm's train.py, YAML configs, and bad input failing before any training step."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import timm_drloc.train as train

REPO = Path(__file__).resolve().parents[1]

# Every flag of timm's train.py (huggingface/pytorch-image-models, main, Aug 2026), as
# (option strings, dest, default, nargs, type name). Regenerate from upstream when timm adds flags.
UPSTREAM_FLAGS = [
    ((), 'data', None, '?', None),
    (('--data-dir',), 'data_dir', None, None, None),
    (('--dataset',), 'dataset', '', None, None),
    (('--train-split',), 'train_split', 'train', None, None),
    (('--val-split',), 'val_split', 'validation', None, None),
    (('--train-num-samples',), 'train_num_samples', None, None, 'int'),
    (('--val-num-samples',), 'val_num_samples', None, None, 'int'),
    (('--dataset-download',), 'dataset_download', False, 0, None),
    (('--class-map',), 'class_map', '', None, 'str'),
    (('--input-img-mode',), 'input_img_mode', None, None, 'str'),
    (('--input-key',), 'input_key', None, None, 'str'),
    (('--target-key',), 'target_key', None, None, 'str'),
    (('--dataset-trust-remote-code',), 'dataset_trust_remote_code', False, 0, None),
    (('--model',), 'model', 'resnet50', None, 'str'),
    (('--pretrained',), 'pretrained', False, 0, None),
    (('--pretrained-path',), 'pretrained_path', None, None, 'str'),
    (('--initial-checkpoint',), 'initial_checkpoint', '', None, 'str'),
    (('--resume',), 'resume', '', None, 'str'),
    (('--no-resume-opt',), 'no_resume_opt', False, 0, None),
    (('--num-classes',), 'num_classes', None, None, 'int'),
    (('--gp',), 'gp', None, None, 'str'),
    (('--img-size',), 'img_size', None, None, 'int'),
    (('--in-chans',), 'in_chans', None, None, 'int'),
    (('--input-size',), 'input_size', None, 3, 'int'),
    (('--crop-pct',), 'crop_pct', None, None, 'float'),
    (('--mean',), 'mean', None, '+', 'float'),
    (('--std',), 'std', None, '+', 'float'),
    (('--interpolation',), 'interpolation', '', None, 'str'),
    (('-b', '--batch-size'), 'batch_size', 128, None, 'int'),
    (('-vb', '--validation-batch-size'), 'validation_batch_size', None, None, 'int'),
    (('--channels-last',), 'channels_last', False, 0, None),
    (('--fuser',), 'fuser', '', None, 'str'),
    (('--grad-accum-steps',), 'grad_accum_steps', 1, None, 'int'),
    (('--grad-checkpointing',), 'grad_checkpointing', False, 0, None),
    (('--fast-norm',), 'fast_norm', False, 0, None),
    (('--model-kwargs',), 'model_kwargs', {}, '*', None),
    (('--head-init-scale',), 'head_init_scale', None, None, 'float'),
    (('--head-init-bias',), 'head_init_bias', None, None, 'float'),
    (('--torchcompile-mode',), 'torchcompile_mode', None, None, 'str'),
    (('--torchscript',), 'torchscript', False, 0, None),
    (('--torchcompile',), 'torchcompile', None, '?', 'str'),
    (('--device',), 'device', 'cuda', None, 'str'),
    (('--amp',), 'amp', False, 0, None),
    (('--amp-dtype',), 'amp_dtype', 'float16', None, 'str'),
    (('--model-dtype',), 'model_dtype', None, None, 'str'),
    (('--no-ddp-bb',), 'no_ddp_bb', False, 0, None),
    (('--synchronize-step',), 'synchronize_step', False, 0, None),
    (('--local_rank',), 'local_rank', 0, None, 'int'),
    (('--device-modules',), 'device_modules', None, '+', 'str'),
    (('--opt',), 'opt', 'sgd', None, 'str'),
    (('--opt-eps',), 'opt_eps', None, None, 'float'),
    (('--opt-betas',), 'opt_betas', None, '+', 'float'),
    (('--momentum',), 'momentum', 0.9, None, 'float'),
    (('--weight-decay',), 'weight_decay', 2e-05, None, 'float'),
    (('--clip-grad',), 'clip_grad', None, None, 'float'),
    (('--clip-mode',), 'clip_mode', 'norm', None, 'str'),
    (('--layer-decay',), 'layer_decay', None, None, 'float'),
    (('--layer-decay-min-scale',), 'layer_decay_min_scale', 0, None, 'float'),
    (('--layer-decay-no-opt-scale',), 'layer_decay_no_opt_scale', None, None, 'float'),
    (('--opt-kwargs',), 'opt_kwargs', {}, '*', None),
    (('--sched',), 'sched', 'cosine', None, 'str'),
    (('--sched-on-updates',), 'sched_on_updates', False, 0, None),
    (('--lr',), 'lr', None, None, 'float'),
    (('--lr-base',), 'lr_base', 0.1, None, 'float'),
    (('--lr-base-size',), 'lr_base_size', 256, None, 'int'),
    (('--lr-base-scale',), 'lr_base_scale', '', None, 'str'),
    (('--lr-noise',), 'lr_noise', None, '+', 'float'),
    (('--lr-noise-pct',), 'lr_noise_pct', 0.67, None, 'float'),
    (('--lr-noise-std',), 'lr_noise_std', 1.0, None, 'float'),
    (('--lr-cycle-mul',), 'lr_cycle_mul', 1.0, None, 'float'),
    (('--lr-cycle-decay',), 'lr_cycle_decay', 0.5, None, 'float'),
    (('--lr-cycle-limit',), 'lr_cycle_limit', 1, None, 'int'),
    (('--lr-k-decay',), 'lr_k_decay', 1.0, None, 'float'),
    (('--warmup-lr',), 'warmup_lr', 1e-05, None, 'float'),
    (('--min-lr',), 'min_lr', 0, None, 'float'),
    (('--epochs',), 'epochs', 300, None, 'int'),
    (('--epoch-repeats',), 'epoch_repeats', 0.0, None, 'float'),
    (('--start-epoch',), 'start_epoch', None, None, 'int'),
    (('--decay-milestones',), 'decay_milestones', [90, 180, 270], '+', 'int'),
    (('--decay-epochs',), 'decay_epochs', 90, None, 'float'),
    (('--warmup-epochs',), 'warmup_epochs', 5, None, 'int'),
    (('--warmup-prefix',), 'warmup_prefix', False, 0, None),
    (('--cooldown-epochs',), 'cooldown_epochs', 0, None, 'int'),
    (('--patience-epochs',), 'patience_epochs', 10, None, 'int'),
    (('--decay-rate', '--dr'), 'decay_rate', 0.1, None, 'float'),
    (('--no-aug',), 'no_aug', False, 0, None),
    (('--train-crop-mode',), 'train_crop_mode', None, None, 'str'),
    (('--scale',), 'scale', [0.08, 1.0], '+', 'float'),
    (('--ratio',), 'ratio', [0.75, 1.3333333333333333], '+', 'float'),
    (('--hflip',), 'hflip', 0.5, None, 'float'),
    (('--vflip',), 'vflip', 0.0, None, 'float'),
    (('--color-jitter',), 'color_jitter', 0.4, None, 'float'),
    (('--color-jitter-prob',), 'color_jitter_prob', None, None, 'float'),
    (('--grayscale-prob',), 'grayscale_prob', None, None, 'float'),
    (('--gaussian-blur-prob',), 'gaussian_blur_prob', None, None, 'float'),
    (('--aa',), 'aa', None, None, 'str'),
    (('--aug-repeats',), 'aug_repeats', 0, None, 'float'),
    (('--aug-splits',), 'aug_splits', 0, None, 'int'),
    (('--jsd-loss',), 'jsd_loss', False, 0, None),
    (('--bce-loss',), 'bce_loss', False, 0, None),
    (('--bce-sum',), 'bce_sum', False, 0, None),
    (('--bce-target-thresh',), 'bce_target_thresh', None, None, 'float'),
    (('--bce-pos-weight',), 'bce_pos_weight', None, None, 'float'),
    (('--reprob',), 'reprob', 0.0, None, 'float'),
    (('--remode',), 'remode', 'pixel', None, 'str'),
    (('--recount',), 'recount', 1, None, 'int'),
    (('--resplit',), 'resplit', False, 0, None),
    (('--mixup',), 'mixup', 0.0, None, 'float'),
    (('--cutmix',), 'cutmix', 0.0, None, 'float'),
    (('--cutmix-minmax',), 'cutmix_minmax', None, '+', 'float'),
    (('--mixup-prob',), 'mixup_prob', 1.0, None, 'float'),
    (('--mixup-switch-prob',), 'mixup_switch_prob', 0.5, None, 'float'),
    (('--mixup-mode',), 'mixup_mode', 'batch', None, 'str'),
    (('--mixup-off-epoch',), 'mixup_off_epoch', 0, None, 'int'),
    (('--smoothing',), 'smoothing', 0.1, None, 'float'),
    (('--train-interpolation',), 'train_interpolation', 'random', None, 'str'),
    (('--drop',), 'drop', 0.0, None, 'float'),
    (('--drop-connect',), 'drop_connect', None, None, 'float'),
    (('--drop-path',), 'drop_path', None, None, 'float'),
    (('--drop-block',), 'drop_block', None, None, 'float'),
    (('--bn-momentum',), 'bn_momentum', None, None, 'float'),
    (('--bn-eps',), 'bn_eps', None, None, 'float'),
    (('--sync-bn',), 'sync_bn', False, 0, None),
    (('--dist-bn',), 'dist_bn', 'reduce', None, 'str'),
    (('--split-bn',), 'split_bn', False, 0, None),
    (('--model-ema',), 'model_ema', False, 0, None),
    (('--model-ema-force-cpu',), 'model_ema_force_cpu', False, 0, None),
    (('--model-ema-decay',), 'model_ema_decay', 0.9998, None, 'float'),
    (('--model-ema-warmup',), 'model_ema_warmup', False, 0, None),
    (('--seed',), 'seed', 42, None, 'int'),
    (('--worker-seeding',), 'worker_seeding', 'all', None, 'str'),
    (('--log-interval',), 'log_interval', 50, None, 'int'),
    (('--val-interval',), 'val_interval', 1, None, 'int'),
    (('--recovery-interval',), 'recovery_interval', 0, None, 'int'),
    (('--checkpoint-hist',), 'checkpoint_hist', 10, None, 'int'),
    (('-j', '--workers'), 'workers', 4, None, 'int'),
    (('--save-images',), 'save_images', False, 0, None),
    (('--pin-mem',), 'pin_mem', False, 0, None),
    (('--no-prefetcher',), 'no_prefetcher', False, 0, None),
    (('--output',), 'output', '', None, 'str'),
    (('--experiment',), 'experiment', '', None, 'str'),
    (('--eval-metric',), 'eval_metric', None, None, 'str'),  # 1.0.31: None = the evaluator's default (top1, map)
    (('--tta',), 'tta', 0, None, 'int'),
    (('--use-multi-epochs-loader',), 'use_multi_epochs_loader', False, 0, None),
    (('--log-wandb',), 'log_wandb', False, 0, None),
    (('--wandb-project',), 'wandb_project', None, None, 'str'),
    (('--wandb-tags',), 'wandb_tags', [], '+', 'str'),
    (('--wandb-resume-id',), 'wandb_resume_id', '', None, 'str'),
    (('--train-img-sizes',), 'train_img_sizes', None, '+', 'int'),
    (('--train-batch-sizes',), 'train_batch_sizes', None, '+', 'int'),
    (('--train-size-probs',), 'train_size_probs', None, '+', 'float'),
    (('--train-size-schedule',), 'train_size_schedule', 'constant', None, 'str'),
    (('--train-size-schedule-spread',), 'train_size_schedule_spread', 0.65, None, 'float'),
    (('--train-size-random-mix',), 'train_size_random_mix', 0.1, None, 'float'),
    (('--train-batches-per-epoch', '--train-steps-per-epoch'), 'train_batches_per_epoch', None, None, 'int'),
    (('--variable-batch-loss-scale',), 'variable_batch_loss_scale', 'none', None, 'str'),
    (('--naflex-loader',), 'naflex_loader', False, 0, None),
    (('--naflex-train-seq-lens',), 'naflex_train_seq_lens', [128, 256, 576, 784, 1024], '+', 'int'),
    (('--naflex-max-seq-len',), 'naflex_max_seq_len', 576, None, 'int'),
    (('--naflex-patch-sizes',), 'naflex_patch_sizes', None, '+', 'int'),
    (('--naflex-patch-size-probs',), 'naflex_patch_size_probs', None, '+', 'float'),
    (('--naflex-loss-scale',), 'naflex_loss_scale', 'linear', None, 'str'),
    (('--naflex-patchify-channels-first',), 'naflex_patchify_channels_first', False, 0, None),
    (('--kd-model-name',), 'kd_model_name', None, None, 'str'),
    (('--kd-distill-type',), 'kd_distill_type', 'logit', None, 'str'),
    (('--kd-loss-type',), 'kd_loss_type', 'kl', None, 'str'),
    (('--distill-loss-weight',), 'distill_loss_weight', None, None, 'float'),
    (('--task-loss-weight',), 'task_loss_weight', None, None, 'float'),
    (('--kd-temperature',), 'kd_temperature', 4.0, None, 'float'),
    (('--kd-student-feature-dim',), 'kd_student_feature_dim', None, None, 'int'),
    (('--kd-teacher-feature-dim',), 'kd_teacher_feature_dim', None, None, 'int'),
    (('--kd-token-distill-type',), 'kd_token_distill_type', 'soft', None, 'str'),
]
UPSTREAM_CHOICES = {
    'train_size_schedule': ('constant', 'progressive'),
    'variable_batch_loss_scale': ('none', 'sqrt', 'linear'),
    'naflex_loss_scale': ('none', 'sqrt', 'linear'),
    'kd_distill_type': ('logit', 'feature', 'token'),
    'kd_token_distill_type': ('soft', 'hard'),
}
# timm 1.0.31 additions (release tests: stop / milestone / in-place resume, pretrained config overlay)
RELEASE_FLAGS = {'--stop-epoch': ('stop_epoch', None), '--save-epochs': ('save_epochs', None),
                 '--pretrained-cfg-overlay': ('pretrained_cfg_overlay', {}),
                 # multi-label task and the loss factory's flags (names as timm 1.0.31's tests use them)
                 '--task': ('task', 'classification'), '--target-format': ('target_format', None),
                 '--loss': ('loss', None), '--loss-pos-weight': ('loss_pos_weight', None),
                 '--loss-class-weight': ('loss_class_weight', None), '--loss-weight-power': ('loss_weight_power', 1.0),
                 '--class-stats': ('class_stats', None), '--poly-epsilon': ('poly_epsilon', 2.0),
                 '--poly-gamma': ('poly_gamma', 0.0)}
RELEASE_CHOICES = {'--task': ('classification', 'multilabel'), '--target-format': ('indices', 'multihot'),
                   '--loss': ('ce', 'bce', 'asl', 'poly', 'jsd', 'twoway', 'zlpr', 'db')}
DRLOC_FLAGS = {
    '--drloc-lambda': 0.0, '--drloc-mode': 'l1', '--drloc-samples': 64, '--drloc-signed': False,
    '--drloc-normalize': False, '--drloc-multiscale': False, '--drloc-hidden-dim': 512, '--drloc-layers': None,
    '--drloc-warmup-epochs': 0, '--drloc-decay': False,
}


def _actions():
    return {a.dest: a for a in train.parser._actions if a.dest != 'help'}


@pytest.mark.parametrize('options, dest, default, nargs, type_name', UPSTREAM_FLAGS,
                         ids=[f[0][-1] if f[0] else f[1] for f in UPSTREAM_FLAGS])
def test_every_timm_train_flag_is_accepted_with_the_same_default(options, dest, default, nargs, type_name):
    action = _actions().get(dest)
    assert action is not None, f'timm train.py flag {options or dest} is missing'
    assert tuple(action.option_strings) == tuple(options)
    assert action.default == default
    assert action.nargs == nargs
    assert (getattr(action.type, '__name__', None) if action.type else None) == type_name
    if dest in UPSTREAM_CHOICES:
        assert tuple(action.choices) == UPSTREAM_CHOICES[dest]


def test_release_and_drloc_flags_have_their_defaults():
    by_option = {o: a for a in train.parser._actions for o in a.option_strings}
    for option, (dest, default) in RELEASE_FLAGS.items():
        assert by_option[option].dest == dest and by_option[option].default == default, option
    for option, choices in RELEASE_CHOICES.items():
        assert tuple(by_option[option].choices) == choices, option
    for option, default in DRLOC_FLAGS.items():
        assert by_option[option].default == default, option
    assert tuple(by_option['--drloc-mode'].choices) == ('l1', 'ce', 'cbr')


def test_module_keeps_train_py_names():
    for name in ('parser', 'config_parser', '_parse_args', 'main', 'create_model', 'train_one_epoch', 'validate'):
        assert hasattr(train, name), name


def test_train_drloc_script_import_is_the_training_module():
    sys.path.insert(0, str(REPO))
    try:
        import train_drloc
    finally:
        sys.path.remove(str(REPO))
    assert train_drloc is train


def _parse(monkeypatch, *argv):
    monkeypatch.setattr('sys.argv', ['train_drloc.py', *argv])
    return train._parse_args()[0]


def _parse_config(monkeypatch, tmp_path, cfg):
    path = tmp_path / 'config.yaml'
    path.write_text(yaml.safe_dump(cfg))
    return _parse(monkeypatch, '-c', str(path), '--data-dir', str(tmp_path))


def test_config_converts_strings_and_command_line_wins(monkeypatch, tmp_path):
    path = tmp_path / 'config.yaml'
    path.write_text('lr: 3e-4\ndrloc_lambda: "0.25"\ndrloc-mode: ce\nepochs: 7\nmean: ["0.5", 0.4, 0.3]\n')
    args = _parse(monkeypatch, '-c', str(path), '--epochs', '3')
    assert args.lr == 3e-4 and args.drloc_lambda == 0.25 and args.drloc_mode == 'ce'
    assert args.epochs == 3 and args.mean == [0.5, 0.4, 0.3]


def test_config_unknown_key_warns_and_is_ignored(monkeypatch, tmp_path, caplog):
    args = _parse_config(monkeypatch, tmp_path, dict(drloc_lamda=0.5, drloc_samples=16))
    assert 'drloc_lamda' in caplog.text and 'ignored' in caplog.text
    assert args.drloc_samples == 16 and args.drloc_lambda == 0.0 and not hasattr(args, 'drloc_lamda')


def test_a_runs_args_yaml_is_a_config_that_reproduces_the_run(monkeypatch, tmp_path):
    # timm users re-run an experiment with -c output/train/EXP/args.yaml
    monkeypatch.setattr('sys.argv', ['train_drloc.py', '--data-dir', str(tmp_path), '--drloc-lambda', '0.5',
                                     '--drloc-layers', 'blocks.1', '--lr', '3e-4', '--epochs', '7'])
    args, args_text = train._parse_args()
    path = tmp_path / 'args.yaml'
    path.write_text(args_text)
    again = _parse(monkeypatch, '-c', str(path))
    assert vars(again) == vars(args)
    assert again.wandb_tags == [] and again.drloc_layers == ['blocks.1'] and again.lr == 3e-4


@pytest.mark.parametrize('cfg, message', [
    (dict(drloc_mode='l2'), "drloc_mode='l2' is not one of"),
    (dict(drloc_samples='many'), "drloc_samples='many' is not a valid int"),
    (dict(drloc_samples=2.5), 'whole number'),
    (dict(drloc_multiscale='yes'), 'must be true or false'),
    (dict(drloc_layers='blocks.11'), 'must be a list'),
    (dict(input_size=[3, 32]), 'needs 3 values'),
    (dict(lr=[0.1]), 'must be a single value'),
    (dict(model_kwargs=['img_size=32']), 'mapping'),
])
def test_config_wrong_type_is_rejected_with_the_key(monkeypatch, tmp_path, capsys, cfg, message):
    with pytest.raises(SystemExit) as exc:
        _parse_config(monkeypatch, tmp_path, cfg)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize('argv, message', [
    (['--drloc-lambda', '-1'], '--drloc-lambda must be a finite number >= 0, got -1.0'),
    (['--drloc-lambda', 'nan'], '--drloc-lambda must be a finite number >= 0, got nan'),
    (['--drloc-samples', '0'], '--drloc-samples must be an integer >= 1 (pairs per image), got 0'),
    (['--drloc-samples', '-4'], '--drloc-samples must be an integer >= 1 (pairs per image), got -4'),
    (['--drloc-mode', 'l2'], "invalid choice: 'l2'"),
    (['--drloc-hidden-dim', '0'], '--drloc-hidden-dim must be an integer >= 1, got 0'),
])
def test_bad_drloc_flags_exit_at_parse_time(monkeypatch, capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        _parse(monkeypatch, '--data-dir', '/data', *argv)
    assert exc.value.code == 2
    assert message.lower() in capsys.readouterr().err.lower()


@pytest.mark.parametrize('argv, flag, fix', [
    (['--naflex-loader'], '--naflex-loader', 'DRLoc needs a square token grid. Drop --naflex-loader'),
    (['--torchscript'], '--torchscript', 'DRLoc reads grids with forward hooks. Use --torchcompile instead'),
])
def test_drloc_refuses_the_flags_it_cannot_run_with_naming_the_flag_and_the_fix(monkeypatch, capsys, argv, flag,
                                                                                 fix):
    with pytest.raises(SystemExit) as exc:
        _parse(monkeypatch, '--data-dir', '/data', '--drloc-lambda', '0.5', *argv)
    assert exc.value.code == 2
    assert f'--drloc-lambda > 0 cannot be combined with {flag}: {fix}' in capsys.readouterr().err


@pytest.mark.parametrize('mode', ['ce', 'cbr'])
def test_train_img_sizes_is_refused_with_a_drloc_mode_whose_classes_are_grid_offsets(monkeypatch, capsys, mode):
    with pytest.raises(SystemExit) as exc:
        _parse(monkeypatch, '--data-dir', '/data', '--drloc-lambda', '0.5', '--drloc-mode', mode,
               '--train-img-sizes', '32', '64')
    assert exc.value.code == 2
    assert (f'--drloc-mode {mode} has one class per grid offset, so its grid size must not change; with '
            '--train-img-sizes use --drloc-mode l1') in capsys.readouterr().err


def test_train_img_sizes_trains_with_drloc_mode_l1(monkeypatch):
    args = _parse(monkeypatch, '--data-dir', '/data', '--drloc-lambda', '0.5', '--drloc-mode', 'l1',
                  '--train-img-sizes', '32', '64')
    assert (args.drloc_mode, args.train_img_sizes) == ('l1', [32, 64])


def test_old_loss_switches_become_loss_and_pos_weight(monkeypatch):
    args = _parse(monkeypatch, '--data-dir', '/data', '--task', 'multilabel', '--bce-loss', '--bce-pos-weight', '2')
    assert (args.loss, args.loss_pos_weight) == ('bce', '2.0')
    assert _parse(monkeypatch, '--data-dir', '/data', '--jsd-loss', '--aug-splits', '3').loss == 'jsd'


def test_criterion_follows_task_and_loss_flags(monkeypatch):
    from timm.loss import BinaryCrossEntropy, LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
    single = train.build.train_loss(_parse(monkeypatch, '--data-dir', '/data'))
    assert isinstance(single, LabelSmoothingCrossEntropy) and single.smoothing == 0.1
    assert isinstance(train.build.train_loss(_parse(monkeypatch, '--data-dir', '/data', '--mixup', '0.2')),
                      SoftTargetCrossEntropy)
    multi = train.build.train_loss(_parse(monkeypatch, '--data-dir', '/data', '--task', 'multilabel',
                                     '--loss-pos-weight', '1,2,3'), num_classes=3)
    assert isinstance(multi, BinaryCrossEntropy)
    assert multi.pos_weight.tolist() == [1.0, 2.0, 3.0]


@pytest.mark.parametrize('argv, message', [
    (['--target-format', 'multihot'], 'add --task multilabel'),
    (['--task', 'multilabel', '--bce-loss', '--loss', 'asl'], '--bce-loss means --loss bce, but --loss asl'),
    (['--loss', 'zlpr'], 'requires multi-label targets'),
    (['--jsd-loss'], 'jsd_splits > 1'),
    (['--task', 'multilabel', '--loss', 'twoway', '--mixup', '0.5'], 'does not support Mixup'),
    (['--task', 'multilabel', '--loss-pos-weight', 'neg_pos'], 'requires class stats'),
    (['--task', 'multilabel', '--kd-model-name', 'resnet18'], 'cannot be combined with --task multilabel'),
    (['--kd-model-name', 'not_a_model'], "--kd-model-name not_a_model: unknown model 'not_a_model', timm has no "
                                         "architecture of that name"),
])
def test_bad_task_and_loss_flags_exit_at_parse_time(monkeypatch, capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        _parse(monkeypatch, '--data-dir', '/data', *argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_drloc_flags_without_lambda_warn_they_do_nothing(monkeypatch, caplog):
    args = _parse(monkeypatch, '--data-dir', '/data', '--drloc-multiscale', '--drloc-decay')
    assert args.drloc_lambda == 0.0
    assert '--drloc-multiscale, --drloc-decay given but --drloc-lambda is 0' in caplog.text


# ---- bad input through main(): fails before any epoch, with the value and the fix ----------------------

def _no_training(*args, **kwargs):
    raise AssertionError('training started although the input was bad')


def _vit_args(data, *extra, model_kwargs=('img_size=32', 'patch_size=8', 'depth=1', 'embed_dim=32', 'num_heads=2')):
    return ['--data-dir', str(data), '--model', 'vit_tiny_patch16_224', '--model-kwargs', *model_kwargs,
            '--img-size', str(dict(k.split('=') for k in model_kwargs).get('img_size', 32)),
            '--device', 'cpu', '-j', '0', '-b', '8', '--epochs', '1', *extra]


def _crafted_checkpoint(path: Path, marker: Path) -> Path:
    class Payload:
        def __reduce__(self):
            return (marker.write_text, ('code ran',))
    torch.save({'epoch': 0, 'state_dict': {}, 'payload': Payload()}, path)
    return path


BAD_INPUT = {
    'missing data dir': (lambda d, t: _vit_args(t / 'nowhere', '--drloc-lambda', '0.5'),
                         'does not exist; pass the dataset root with --data-dir'),
    'drloc multiscale on a ViT': (lambda d, t: _vit_args(d, '--drloc-lambda', '0.5', '--drloc-multiscale'),
                                  'drop --drloc-multiscale'),
    'drloc layers naming no module': (lambda d, t: _vit_args(d, '--drloc-lambda', '0.5', '--drloc-layers',
                                                             'blocks.99'), "no module named 'blocks.99'"),
    'image too small for a grid': (lambda d, t: _vit_args(d, '--drloc-lambda', '0.5', model_kwargs=(
        'img_size=8', 'patch_size=8', 'depth=1', 'embed_dim=32', 'num_heads=2')), 'feature grid is 1x1'),
    'img size disagrees with model kwargs': (lambda d, t: _vit_args(d, '--img-size', '48'),
                                             'Conflicting input image sizes'),
    'unknown model': (lambda d, t: ['--data-dir', str(d), '--model', 'not_a_model', '--device', 'cpu'],
                      '--model not_a_model'),
    'resume missing file': (lambda d, t: _vit_args(d, '--resume', str(t / 'gone.pth.tar')),
                            'gone.pth.tar: no such file'),
    'resume corrupt file': (lambda d, t: _vit_args(d, '--resume', str(_write(t / 'bad.pth.tar', b'PK\x03\x04 cut'))),
                            'bad.pth.tar: cannot read this checkpoint'),
    'resume pickled code': (lambda d, t: _vit_args(d, '--resume', str(_crafted_checkpoint(
        t / 'evil.pth.tar', t / 'marker.txt'))), 'evil.pth.tar: cannot read this checkpoint'),
    'empty data dir': (lambda d, t: _vit_args(_mkdirs(t / 'empty', 'train', 'validation')), 'Found 0 images'),
    'resume from a non-DRLoc run': (lambda d, t: _vit_args(d, '--drloc-lambda', '0.5', '--num-classes', '3',
                                                           '--resume', str(_plain_checkpoint(t))),
                                    'plain.pth.tar does not fit this run (The checkpoint has no DRLoc head state'),
    'push to hub without a token': (lambda d, t: _vit_args(d, '--push-to-hub', 'user/drloc-vit'),
                                    '--push-to-hub user/drloc-vit needs a Hugging Face token'),
    'num classes disagree with data': (lambda d, t: _vit_args(d, '--num-classes', '2'),
                                       'the data has 3 classes but the model has 2 outputs'),
    'stop epoch out of range': (lambda d, t: _vit_args(d, '--stop-epoch', '5'), '--stop-epoch 5 is out of range'),
    'mean for other input channels': (lambda d, t: _vit_args(d, '--in-chans', '1', '--mean', '0.2', '0.4', '0.6'),
                                      '--mean has 3 values but the model takes 1 input channel(s); give one value '
                                      'per channel (1), or one value for all of them'),
    'std for other input channels': (lambda d, t: _vit_args(d, '--std', '0.2', '0.3'),
                                     '--std has 2 values but the model takes 3 input channel(s)'),
    'image mode with other channels than the model': (lambda d, t: _vit_args(d, '--input-img-mode', 'L'),
                                                      '--input-img-mode L reads images with 1 channel(s), but the '
                                                      'model takes 3; pass --input-img-mode RGB'),
    "timm's default image mode for a 4-channel model": (lambda d, t: _vit_args(d, '--in-chans', '4'),
                                                        "timm's default mode for a 4-channel model, L, reads images "
                                                        "with 1 channel(s), but the model takes 4; pass "
                                                        "--input-img-mode RGBA"),
    'unknown image mode': (lambda d, t: _vit_args(d, '--input-img-mode', 'XYZ'),
                           '--input-img-mode XYZ is not a PIL image mode'),
    'a flag the model does not take': (lambda d, t: _vit_args(d, '--drop-block', '0.1'),
                                       "--model vit_tiny_patch16_224 cannot be built with the arguments given "
                                       "(VisionTransformer.__init__() got an unexpected keyword argument "
                                       "'drop_block_rate'); drop that keyword from --model-kwargs, or the flag that "
                                       "sets it (--gp sets global_pool, --drop-path sets drop_path_rate, --drop-block "
                                       "sets drop_block_rate, --bn-momentum sets bn_momentum, --bn-eps sets bn_eps)"),
    'a model keyword the model does not take': (lambda d, t: _vit_args(d, model_kwargs=(
        'img_size=32', 'patch_size=8', 'depth=1', 'embed_dim=32', 'num_heads=2', 'window_size=4')),
        "got an unexpected keyword argument 'window_size'); drop that keyword from --model-kwargs"),
    'a teacher folder that does not exist': (lambda d, t: _vit_args(d, '--kd-model-name', f'local-dir:{t}/gone'),
                                             '--kd-model-name local-dir:{t}/gone: cannot load the teacher (Config file '
                                             'not found: {t}/gone/config.json); give a model whose pretrained weights '
                                             'can be downloaded or are in the Hugging Face cache, or local-dir:FOLDER'),
    'pretrained weights file missing': (lambda d, t: _vit_args(d, '--pretrained', '--pretrained-path',
                                                               str(t / 'gone.safetensors')),
                                        '--pretrained-path {t}/gone.safetensors: no such file'),
    'pretrained weights file damaged': (lambda d, t: _vit_args(d, '--pretrained', '--pretrained-path', str(
        _write(t / 'bad.safetensors', b'not safetensors'))), '--pretrained-path {t}/bad.safetensors: cannot read this'),
    'pretrained weights of another size': (lambda d, t: _vit_args(d, '--pretrained', '--pretrained-path', str(
        _vit_weights(t / 'wide.safetensors', embed_dim=48))),
        '--model vit_tiny_patch16_224 --pretrained: --pretrained-path {t}/wide.safetensors do not fit the model '
        '(Error(s) in loading state_dict for VisionTransformer: size mismatch for'),
    'class map file missing': (lambda d, t: _vit_args(d, '--class-map', str(t / 'classes.txt')),
                               '--class-map {t}/classes.txt: no such file; give a text file with one class folder '
                               'name per line'),
    'a torchvision dataset not downloaded': (lambda d, t: _vit_args(d, '--dataset', 'torch/cifar10'),
                                             '--dataset torch/cifar10 --data-dir {d}: Dataset not found or corrupted. '
                                             'You can use download=True to download it; --dataset-download fetches a '
                                             'dataset that can be downloaded'),
    'a data dir that is a file of no images': (lambda d, t: _vit_args(_write(t / 'notes.txt', b'x')),
                                               '--dataset (image folder) --data-dir {t}/notes.txt: Found 0 images'),
    'an optimizer timm does not have': (lambda d, t: _vit_args(d, '--opt', 'adamq'),
                                        '--opt adamq: Optimizer adamq not found in registry; '
                                        'timm.optim.list_optimizers() names the optimizers timm has'),
    'an optimizer keyword it does not take': (lambda d, t: _vit_args(d, '--opt', 'adamw', '--opt-kwargs', 'foo=1'),
                                              "--opt adamw --opt-kwargs {{'foo': 1}}: AdamW.__init__() got an "
                                              "unexpected keyword argument 'foo'; drop what it does not take"),
    'a schedule timm does not have': (lambda d, t: _vit_args(d, '--sched', 'cosin'),
                                      "--sched cosin: Unknown scheduler 'cosin'."),
    'eval metric the task does not report': (lambda d, t: _vit_args(d, '--task', 'multilabel', '--eval-metric', 'top1'),
                                             '--eval-metric top1 is not reported by multilabel evaluation; use one of '
                                             'loss, map'),
    'repeated augmentation in one process': (lambda d, t: _vit_args(d, '--drloc-lambda', '0.5', '--aug-repeats', '3'),
                                             '--aug-repeats 3 shares repeats of each image among the processes of a '
                                             'distributed run, and this run is one process; launch it with torchrun'),
    'per-class weights for other classes': (lambda d, t: _vit_args(d, '--task', 'multilabel', '--num-classes', '3',
                                                                   '--loss-class-weight', '1,2'),
                                            '--loss-class-weight 1,2 has 2 entries but the model has 3 classes'),
    'cuda asked on a CPU machine': (lambda d, t: _vit_args(d, '--device', 'cuda'),
                                    'pass --device cpu'),
    # --initial-checkpoint is read with --resume's checks and messages
    'initial checkpoint missing': (lambda d, t: _vit_args(d, '--initial-checkpoint', str(t / 'gone.pth.tar')),
                                   '--initial-checkpoint ' + '{t}/gone.pth.tar: no such file'),
    'initial checkpoint is a folder': (lambda d, t: _vit_args(d, '--initial-checkpoint', str(t)),
                                       '--initial-checkpoint {t} is a folder; give a checkpoint file in it'),
    'initial checkpoint empty': (lambda d, t: _vit_args(d, '--initial-checkpoint', str(_write(t / 'empty.pth', b''))),
                                 '--initial-checkpoint {t}/empty.pth: cannot read this checkpoint'),
    'initial checkpoint pickled code': (lambda d, t: _vit_args(d, '--initial-checkpoint', str(_crafted_checkpoint(
        t / 'evil.pth.tar', t / 'marker.txt'))), '--initial-checkpoint {t}/evil.pth.tar: cannot read this checkpoint'),
    'initial checkpoint of another architecture': (
        lambda d, t: _vit_args(d, '--initial-checkpoint', str(_plain_checkpoint(t)), model_kwargs=(
            'img_size=32', 'patch_size=8', 'depth=1', 'embed_dim=48', 'num_heads=2')),
        '--initial-checkpoint {t}/plain.pth.tar does not fit this run (Error(s) in loading state_dict'),
    # the 1x1 grid's hint is the one the README gives: a larger --img-size
    'image too small for a grid names --img-size': (lambda d, t: _vit_args(d, '--drloc-lambda', '0.5', model_kwargs=(
        'img_size=8', 'patch_size=8', 'depth=1', 'embed_dim=32', 'num_heads=2')), 'a larger --img-size with'),
}


class _Created(Exception):
    """Raised by a stand-in create_model, carrying the keyword arguments it was called with."""


def _create_model_kwargs(monkeypatch, *argv) -> dict:
    """The keyword arguments main() gives create_model for these flags (nothing after it runs)."""
    def create_model(*args, **kwargs):
        raise _Created(kwargs)
    monkeypatch.setattr(train, 'create_model', create_model)
    monkeypatch.setattr('sys.argv', ['train_drloc.py', '--device', 'cpu', *argv])
    with pytest.raises(_Created) as exc:
        train.main()
    return exc.value.args[0]


def test_pretrained_cfg_overlay_reaches_create_model_over_pretrained_path(monkeypatch, tmp_path):
    weights = tmp_path / 'w.pth'
    torch.save({'fc.bias': torch.zeros(10)}, weights)  # a weights file: --pretrained reads it
    # no data dir: as in timm 1.0.31 the model is created before the data dir is checked
    kwargs = _create_model_kwargs(monkeypatch, '--model', 'resnet18', '--pretrained', '--pretrained-path', str(weights),
                                  '--pretrained-cfg-overlay', 'num_classes=10', 'custom_load=True')
    cfg = kwargs['pretrained_cfg']
    assert (cfg['file'], cfg['num_classes'], cfg['custom_load']) == (str(weights), 10, True)
    assert cfg['architecture'] == 'resnet18' and kwargs['pretrained'] is True


def test_pretrained_weights_that_the_hub_cannot_give_offline_exit_2_naming_the_fix(monkeypatch, tmp_path, image_folder,
                                                                                   caplog):
    from huggingface_hub.errors import LocalEntryNotFoundError

    def create_model(*args, **kwargs):  # what timm raises for --pretrained with no network and no cached weights
        raise LocalEntryNotFoundError('Cannot find the requested files in the local cache.')
    monkeypatch.setattr(train, 'create_model', create_model)
    with pytest.raises(SystemExit) as exc:
        train.run([*_vit_args(image_folder, '--pretrained'), '--output', str(tmp_path)])
    assert exc.value.code == 2
    assert ("--model vit_tiny_patch16_224 --pretrained: cannot load its pretrained weights (Cannot find the requested "
            "files in the local cache.); give --pretrained-path a weights file, or run where the weights can be "
            "downloaded or are in the Hugging Face cache") in caplog.text

def test_a_dataset_whose_reader_package_is_missing_names_the_package(monkeypatch, tmp_path, image_folder):
    monkeypatch.setitem(sys.modules, 'datasets', None)  # as where the Hugging Face datasets package is not installed
    monkeypatch.setattr(train.loop, 'train_one_epoch', _no_training)
    with pytest.raises(ValueError) as error:
        train.main([*_vit_args(image_folder, '--dataset', 'hfds/some/repo'), '--output', str(tmp_path)])
    assert str(error.value) == '--dataset hfds/some/repo needs the datasets package: pip install datasets'


def test_pretrained_path_alone_adapts_the_classifier(monkeypatch):
    cfg = _create_model_kwargs(monkeypatch, '--model', 'resnet18', '--pretrained-path', 'w.pth')['pretrained_cfg']
    assert (cfg['file'], cfg['num_classes']) == ('w.pth', -1)


def test_img_size_builds_a_fixed_size_model_at_that_size(monkeypatch):
    kwargs = _create_model_kwargs(monkeypatch, '--model', 'vit_tiny_patch16_224', '--img-size', '64',
                                  '--in-chans', '1')
    assert kwargs['img_size'] == (64, 64) and kwargs['in_chans'] == 1


def test_missing_data_dir_is_reported_after_the_model_is_built(monkeypatch, tmp_path):
    monkeypatch.setattr(train.loop, 'train_one_epoch', _no_training)
    monkeypatch.setattr('sys.argv', ['train_drloc.py', *_vit_args(tmp_path / 'nowhere')[2:]])
    with pytest.raises(ValueError, match='no dataset given: pass the dataset root folder'):
        train.main()


def _mkdirs(root: Path, *names: str) -> Path:
    for name in names:
        (root / name).mkdir(parents=True)
    return root


def _plain_checkpoint(tmp_path: Path) -> Path:
    """A training checkpoint of the tiny ViT without DRLoc heads (timm's own layout)."""
    import timm
    model = timm.create_model('vit_tiny_patch16_224', num_classes=3, img_size=32, patch_size=8, depth=1,
                              embed_dim=32, num_heads=2)
    path = tmp_path / 'plain.pth.tar'
    torch.save({'epoch': 0, 'version': 2, 'state_dict': model.state_dict()}, path)
    return path


def _vit_weights(path: Path, embed_dim: int) -> Path:
    """A safetensors file of the tiny ViT's weights at another width."""
    import safetensors.torch
    import timm
    model = timm.create_model('vit_tiny_patch16_224', num_classes=3, img_size=32, patch_size=8, depth=1,
                              embed_dim=embed_dim, num_heads=2)
    safetensors.torch.save_file(model.state_dict(), str(path))
    return path


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.mark.parametrize('case', list(BAD_INPUT))
def test_bad_input_fails_before_training_with_a_clear_message(monkeypatch, tmp_path, image_folder, case):
    if case == 'cuda asked on a CPU machine' and torch.cuda.is_available():
        pytest.skip('this machine has CUDA')
    make_argv, message = BAD_INPUT[case]
    monkeypatch.delenv('HF_TOKEN', raising=False)
    monkeypatch.setattr('huggingface_hub.get_token', lambda: None)  # as on a machine never logged in
    monkeypatch.setattr(train.loop, 'train_one_epoch', _no_training)
    monkeypatch.setattr('sys.argv', ['train_drloc.py', *make_argv(image_folder, tmp_path),
                                     '--output', str(tmp_path / 'out'), '--experiment', 'bad'])
    with pytest.raises(ValueError) as exc:
        train.main()
    assert message.format(t=tmp_path, d=image_folder) in str(exc.value)
    assert not (tmp_path / 'out' / 'bad' / 'summary.csv').exists()
    assert not (tmp_path / 'marker.txt').exists(), 'a pickled object in a checkpoint ran code'


def test_one_class_data_dir_is_rejected(monkeypatch, tmp_path, image_folder_factory):
    data = image_folder_factory(num_classes=1)
    monkeypatch.setattr(train.loop, 'train_one_epoch', _no_training)
    monkeypatch.setattr('sys.argv', ['train_drloc.py', *_vit_args(data), '--output', str(tmp_path / 'out')])
    with pytest.raises(ValueError, match=r"has 1 class in train/ \('class_0': timm names a class after the folder"):
        train.main()


def test_class_folders_whose_images_sit_in_same_named_subfolders_are_one_class_and_the_error_says_why(
        monkeypatch, tmp_path, image_folder_factory):
    data = image_folder_factory()
    for split in ('train', 'validation'):
        for folder in (data / split).iterdir():  # class_i/<n>.png -> class_i/images/<n>.png
            (folder / 'images').mkdir()
            for image in folder.glob('*.png'):
                image.rename(folder / 'images' / image.name)
    monkeypatch.setattr(train.loop, 'train_one_epoch', _no_training)
    monkeypatch.setattr('sys.argv', ['train_drloc.py', *_vit_args(data), '--output', str(tmp_path / 'out')])
    with pytest.raises(ValueError) as error:
        train.main()
    assert str(error.value) == (f"{data} has 1 class in train/ ('images': timm names a class after the folder that "
                                f"holds its images, nested folders of the same name are one class); classification "
                                f"needs at least 2")


def test_resume_auto_needs_an_experiment(monkeypatch, tmp_path, image_folder, capsys):
    monkeypatch.setattr('sys.argv', ['train_drloc.py', *_vit_args(image_folder, '--resume', 'auto')])
    with pytest.raises(SystemExit):
        train.main()
    assert '--resume auto continues in place in the experiment folder' in capsys.readouterr().err


@pytest.mark.slow
def test_command_line_error_is_one_line_and_exit_code_2(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(REPO / 'train_drloc.py'), '--data-dir', str(tmp_path / 'nowhere'), '--device', 'cpu',
         '--drloc-lambda', '0.5'], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert f"data dir '{tmp_path / 'nowhere'}' does not exist" in proc.stderr
    assert 'Traceback' not in proc.stderr


@pytest.mark.parametrize('argv, metric', [([], 'top1'), (['--task', 'multilabel'], 'map'),
                                          (['--eval-metric', 'loss'], 'loss')])
def test_args_yaml_names_the_metric_checkpoints_are_ranked_by(monkeypatch, argv, metric):
    # timm's own train.py, given this args.yaml with -c, reads eval_metric as the metric's name: null breaks it
    monkeypatch.setattr('sys.argv', ['train_drloc.py', '--data-dir', '/data', *argv])
    _, args_text = train._parse_args()
    assert yaml.safe_load(args_text)['eval_metric'] == metric


def test_max_nonfinite_steps_below_1_is_refused(monkeypatch, capsys):
    with pytest.raises(SystemExit) as exc:
        _parse(monkeypatch, '--data-dir', '/data', '--max-nonfinite-steps', '0')
    assert exc.value.code == 2
    assert '--max-nonfinite-steps must be >= 1, got 0' in capsys.readouterr().err


def test_a_config_file_leaves_the_module_parser_as_it_was(monkeypatch, tmp_path):
    defaults = {a.dest: a.default for a in train.parser._actions}
    args = _parse_config(monkeypatch, tmp_path, dict(lr=0.25, drloc_samples=16))
    assert (args.lr, args.drloc_samples) == (0.25, 16)
    assert {a.dest: a.default for a in train.parser._actions} == defaults and train.parser._defaults == {}
    assert _parse(monkeypatch, '--data-dir', str(tmp_path)).lr is None  # the next run is not given the config's


def test_main_reads_its_flags_from_argv_not_sys_argv(monkeypatch, tmp_path, image_folder):
    monkeypatch.setattr(train, 'create_model', lambda *a, **k: (_ for _ in ()).throw(_ModelBuilt(k)))
    monkeypatch.setattr('sys.argv', ['train_drloc.py', '--model', 'sys_argv_model'])
    with pytest.raises(_ModelBuilt) as built:
        train.main(['--data-dir', str(image_folder), '--device', 'cpu', '--model', 'resnet18',
                    '--output', str(tmp_path)])
    assert built.value.args[0]['model_name'] == 'resnet18'


def test_the_cli_train_command_passes_its_arguments_without_touching_sys_argv(monkeypatch, tmp_path):
    from timm_drloc import cli
    monkeypatch.setattr('sys.argv', ['timm-drloc', 'train', '--lr', '0'])
    with pytest.raises(SystemExit) as exc:
        cli.main(['train', '--data-dir', str(tmp_path), '--epochs', '0'])
    assert exc.value.code == 2 and sys.argv == ['timm-drloc', 'train', '--lr', '0']


def test_loss_entries_of_args_yaml_parse_again(monkeypatch, tmp_path):
    first = _parse(monkeypatch, '--data-dir', str(tmp_path), '--bce-loss', '--bce-pos-weight', '2')
    loss_keys = ('bce_loss', 'bce_pos_weight', 'loss', 'loss_pos_weight')
    again = _parse_config(monkeypatch, tmp_path, {k: getattr(first, k) for k in loss_keys})
    assert (again.loss, again.loss_pos_weight, again.bce_pos_weight) == ('bce', '2.0', 2.0)


# ---- timm's own number flags, the output folder and configs: refused before anything is built ---------------

class _ModelBuilt(Exception):
    """Raised by a stand-in create_model: the run got as far as building the model."""


def _main_before_the_model(monkeypatch, *argv):
    """main() with these flags, stopped with _ModelBuilt if it ever reaches create_model."""
    monkeypatch.setattr(train, 'create_model', lambda *a, **k: (_ for _ in ()).throw(_ModelBuilt()))
    monkeypatch.setattr('sys.argv', ['train_drloc.py', '--device', 'cpu', *argv])
    train.main()


@pytest.mark.parametrize('argv, message', [
    (['--lr', 'nan'], '--lr must be a finite number > 0, got nan'),
    (['--lr', '0'], '--lr must be a finite number > 0, got 0.0'),
    (['--epochs', '0'], '--epochs must be >= 1 (epochs to train), got 0'),
    (['-b', '0'], '-b/--batch-size must be >= 1 (images per step and process), got 0'),
    (['-vb', '0'], '-vb/--validation-batch-size must be >= 1'),
    (['--log-interval', '0'], '--log-interval must be >= 1 (updates between log lines), got 0'),
    (['--checkpoint-hist', '0'], '--checkpoint-hist must be >= 1'),
    (['-j', '-1'], '-j/--workers must be >= 0'),
    (['--smoothing', '1'], '--smoothing is the share of the target spread over the other classes, so it must be in '
                           '[0, 1), got 1.0'),
    (['--smoothing', '-0.1'], 'must be in [0, 1), got -0.1'),
    (['--std', '0.2', '0', '0.2'], '--std divides each channel, so every value must be a finite number > 0'),
    (['--img-size', '0'], '--img-size must be >= 1 (input size in pixels), got 0'),
    (['--start-epoch', '-1'], '--start-epoch must be >= 0'),
    (['--interpolation', 'random'], '--interpolation random is not a mode timm resizes with (for training and '
                                    'evaluation); use bilinear, bicubic, nearest, box, hamming or lanczos'),
    (['--aug-repeats', '-1'], '--aug-repeats must be a finite number >= 0 (times each image is repeated across the '
                              'processes), got -1.0'),
    (['--mixup', '0.8', '-b', '7'], 'mixup / cutmix mix each image of a batch with another one, so batch sizes must '
                                    'be even, got 7; use 8'),
    (['--cutmix', '1.0', '-b', '8', '--train-img-sizes', '32', '64', '--train-batch-sizes', '8', '5'],
     'batch sizes must be even, got 5'),
])
def test_timm_number_flags_out_of_range_exit_2_before_the_model_is_built(monkeypatch, tmp_path, capsys, argv,
                                                                        message):
    _assert_refused_before_the_model(monkeypatch, tmp_path, capsys, argv, message)


def _assert_refused_before_the_model(monkeypatch, tmp_path, capsys, argv, message):
    """These flags exit 2 with `message` on stderr, before a model is built."""
    with pytest.raises(SystemExit) as exc:
        _main_before_the_model(monkeypatch, '--data-dir', str(tmp_path), *argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize('argv, message', [
    (['--naflex-loader', '--train-img-sizes', '32', '64'],
     '--naflex-loader and --train-img-sizes are two different loaders; choose one'),
    (['--naflex-loader', '--use-multi-epochs-loader'], '--use-multi-epochs-loader does not work with --naflex-loader'),
    (['--naflex-loader', '--aug-splits', '2'], '--aug-splits does not work with --naflex-loader'),
    (['--naflex-loader', '--aug-repeats', '3'], '--aug-repeats does not work with --naflex-loader'),
    (['--naflex-loader', '--naflex-patch-sizes', '8', '16', '--naflex-patch-size-probs', '1'],
     '--naflex-patch-size-probs needs one value per --naflex-patch-sizes entry'),
    (['--resume', 'auto'], '--resume auto continues in place in the experiment folder: give it with --experiment'),
    (['--aug-splits', '1'], '--aug-splits 1 makes no split; use 0 (off) or 2 and more'),
    (['--split-bn'], '--split-bn needs --aug-splits 2 or more'),
    (['--mixup', '0.8', '--aug-splits', '2'], 'mixup/cutmix with --aug-splits needs --no-prefetcher'),
    (['--torchscript', '--sync-bn'], '--torchscript cannot script SyncBatchNorm; drop --sync-bn'),
    (['--model-dtype', 'float64'], '--model-dtype float64 is not float32, float16 or bfloat16'),
    (['--amp', '--amp-dtype', 'float32'], '--amp-dtype float32 is not float16 or bfloat16'),
    (['--amp', '--model-dtype', 'bfloat16'], '--amp needs a float32 model, got --model-dtype bfloat16'),
    (['--log-wandb', '--wandb-resume-id', 'abc'], '--wandb-resume-id continues a wandb run, which needs --resume'),
    (['--model-kwargs', 'depth=2', 'global_pool=avg'], '--model-kwargs global_pool=avg sets what --gp sets (the run '
                                                       'passes global_pool to create_model from --gp); drop it from '
                                                       '--model-kwargs and use --gp'),
    (['--model-kwargs', 'drop_path_rate=0.1'], '--model-kwargs drop_path_rate=0.1 sets what --drop-path sets'),
    (['--model-kwargs', 'num_classes=3'], 'drop it from --model-kwargs and use --num-classes'),
])
def test_timm_flags_that_cannot_work_together_exit_2_before_the_model_is_built(monkeypatch, tmp_path, capsys, argv,
                                                                               message):
    _assert_refused_before_the_model(monkeypatch, tmp_path, capsys, argv, message)


def test_repeated_augmentation_passes_the_checks_in_a_distributed_environment(monkeypatch, tmp_path, image_folder):
    monkeypatch.setenv('WORLD_SIZE', '2')  # as torchrun sets it; the check reads no process group
    args, _ = train._parse_args(['--data-dir', str(image_folder), '--aug-repeats', '3', '--output', str(tmp_path),
                                 '--device', 'cpu'], None)
    assert train.check_inputs(args) == (str(image_folder / 'train'), str(image_folder / 'validation'))


def test_output_that_is_a_file_is_refused_before_the_model_is_built(monkeypatch, tmp_path, image_folder):
    output = tmp_path / 'out'
    output.write_text('not a folder')
    with pytest.raises(ValueError, match=rf'--output {output}: {output} is a file, not a folder'):
        _main_before_the_model(monkeypatch, '--data-dir', str(image_folder), '--output', str(output))


@pytest.mark.skipif(os.geteuid() == 0, reason='root writes in any folder: permissions cannot be tested as root')
def test_output_folder_without_write_permission_is_refused_before_the_model_is_built(monkeypatch, tmp_path,
                                                                                     image_folder):
    output = tmp_path / 'locked'
    output.mkdir(mode=0o555)
    with pytest.raises(ValueError, match=rf'--output {output}: cannot write in {output} \(permission denied\)'):
        _main_before_the_model(monkeypatch, '--data-dir', str(image_folder), '--output', str(output))


def test_binary_config_file_exits_2_naming_the_file(monkeypatch, tmp_path, capsys):
    path = tmp_path / 'weights.bin'
    path.write_bytes(b'\x89PNG\r\n\x1a\n' + bytes(range(256)))
    with pytest.raises(SystemExit) as exc:
        _parse(monkeypatch, '-c', str(path), '--data-dir', str(tmp_path))
    assert exc.value.code == 2
    assert f'config {path} is not valid YAML' in capsys.readouterr().err


# 9 aliases of 9 aliases ... 6 levels deep: 1 KB of YAML that writes out as 531441 strings
ALIAS_BOMB = 'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n' + ''.join(
    f'{n}: &{n} [*{p},*{p},*{p},*{p},*{p},*{p},*{p},*{p},*{p}]\n' for p, n in zip('abcde', 'bcdef'))


def test_yaml_alias_bomb_is_refused_in_a_short_message(monkeypatch, tmp_path, capsys):
    path = tmp_path / 'bomb.yaml'
    path.write_text(ALIAS_BOMB + 'lr: *f\n')  # and a type error: lr takes one number
    assert len(path.read_bytes()) < 1100
    with pytest.raises(SystemExit) as exc:
        _parse(monkeypatch, '-c', str(path), '--data-dir', str(tmp_path))
    assert exc.value.code == 2
    err = capsys.readouterr().err  # argparse's usage, then the error line
    assert f'config {path} expands to more than 10000 values' in err
    assert len(err) < len(train.flags.build_parser().format_usage()) + 500


def test_a_long_config_value_is_cut_in_the_error_message(monkeypatch, tmp_path, capsys):
    with pytest.raises(SystemExit):
        _parse_config(monkeypatch, tmp_path, dict(lr=list(range(5000))))
    err = capsys.readouterr().err  # argparse's usage, then the error line
    assert 'lr=[0, 1, 2, 3, ...] must be a single value, not a list' in err
    assert len(err) < len(train.flags.build_parser().format_usage()) + 500


# ---- data splits: named before the model is built; a missing split or other classes are refused ----------

def test_missing_validation_folder_is_refused_naming_the_folder_and_the_flag(monkeypatch, image_folder_factory):
    data = image_folder_factory(splits=('train', 'test'))  # the common train/ + test/ layout
    with pytest.raises(ValueError) as exc:
        _main_before_the_model(monkeypatch, '--data-dir', str(data))
    assert str(exc.value) == (
        f"--val-split validation: there is no validation/ folder in {data} (it holds test/, train/), and timm "
        f"would read all of {data} in its place; pass --val-split test to read test/, or --val-split . to read "
        f"{data} itself, or --val-split '' to train without validation")


def test_missing_train_folder_is_refused_naming_the_flag(monkeypatch, image_folder_factory):
    data = image_folder_factory(splits=('validation',))
    with pytest.raises(ValueError, match=rf'--train-split train: there is no train/ folder in {data} \(it holds '
                                         rf'validation/\)'):
        _main_before_the_model(monkeypatch, '--data-dir', str(data))


def test_split_folders_are_named_in_the_log_before_the_model_is_built(monkeypatch, image_folder_factory, caplog):
    data = image_folder_factory(splits=('train', 'test'))
    caplog.set_level('INFO')
    with pytest.raises(_ModelBuilt):
        _main_before_the_model(monkeypatch, '--data-dir', str(data), '--val-split', 'test')
    assert f'Data: training on {data / "train"}, validating on {data / "test"}.' in caplog.text


def test_dataset_root_is_read_when_asked_for_explicitly(monkeypatch, tmp_path, image_folder_factory, caplog):
    data = image_folder_factory(splits=('train',))
    root_classes = tmp_path / 'flat'  # class folders straight in the root: read it with --train-split .
    (data / 'train').rename(root_classes)
    monkeypatch.setattr(train.loop, 'train_one_epoch', _no_training)
    monkeypatch.setattr('sys.argv', ['train_drloc.py', *_vit_args(root_classes, '--train-split', '.',
                                                                   '--val-split', ''), '--output', str(tmp_path)])
    caplog.set_level('INFO')
    with pytest.raises(AssertionError, match='training started'):
        train.main()
    assert f"Data: training on {root_classes}/., validating on nothing (--val-split is empty)." in caplog.text


def test_splits_with_other_class_folders_are_refused_naming_the_classes(monkeypatch, tmp_path, image_folder_factory):
    data = image_folder_factory(num_classes=3, splits=('train', 'validation'))
    (data / 'validation' / 'class_2').rename(data / 'validation' / 'class_9')
    monkeypatch.setattr(train.loop, 'train_one_epoch', _no_training)
    monkeypatch.setattr('sys.argv', ['train_drloc.py', *_vit_args(data), '--output', str(tmp_path / 'out')])
    with pytest.raises(ValueError, match=rf'the splits hold different classes \(only in {data}/train: class_2; '
                                         rf'only in {data}/validation: class_9\)'):
        train.main()
    assert not (tmp_path / 'out').exists()


# ---- DRLoc heads too large, lambda warm-up longer than the run ---------------------------------------------

@pytest.mark.parametrize('flag', ['--drloc-samples', '--drloc-hidden-dim'])
def test_head_sizes_that_cannot_fit_are_refused_with_the_numbers_before_the_run_folder(monkeypatch, tmp_path,
                                                                                     image_folder, flag):
    monkeypatch.setattr(train.loop, 'train_one_epoch', _no_training)
    monkeypatch.setattr('sys.argv', ['train_drloc.py', *_vit_args(image_folder, '--drloc-lambda', '0.5', flag,
                                                                  '1000000000'),
                                     '--output', str(tmp_path / 'out'), '--experiment', 'big'])
    with pytest.raises(ValueError) as exc:
        train.main()
    message = str(exc.value)
    assert f'{flag} 1000000000' in message and 'the DRLoc heads would need about' in message
    assert 'TiB' in message or 'PiB' in message
    assert 'of the cpu device; lower them (the reference uses --drloc-hidden-dim 512 --drloc-samples 64)' in message
    assert not (tmp_path / 'out' / 'big').exists()


class _TrainingStarted(Exception):
    pass


def test_warmup_as_long_as_the_run_is_warned_at_start_with_the_lambda_reached(monkeypatch, tmp_path, image_folder,
                                                                             caplog):
    def started(*args, **kwargs):
        raise _TrainingStarted()
    monkeypatch.setattr(train.loop, 'train_one_epoch', started)
    monkeypatch.setattr('sys.argv', ['train_drloc.py', *_vit_args(image_folder, '--drloc-lambda', '0.5',
                                                                  '--drloc-warmup-epochs', '4', '--epochs', '2'),
                                     '--warmup-epochs', '0', '--output', str(tmp_path)])
    with pytest.raises(_TrainingStarted):
        train.main()
    assert ('--drloc-warmup-epochs 4 is not shorter than the 2-epoch schedule: lambda only ramps up to 0.125, never '
            'the asked --drloc-lambda 0.5') in caplog.text
