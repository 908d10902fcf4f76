"""--push-to-hub: a training run published on the Hugging Face Hub at its end, in timm's Hub format.

The flags (`add_push_args`), their check before training starts (`check_push_args`: a run must not find a
missing token after hours of training) and the export and upload at the end (`push_after_training`, on the
primary process only); the export and upload themselves are timm_drloc.hub's.
"""
import argparse
import logging
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Union

from timm.utils import is_primary

from timm_drloc.errors import ConfigError, ExitCode
from timm_drloc.hub import DEFAULT_EXPORT_DIR, export, push_to_hub, require_token

_logger = logging.getLogger('train_drloc')

HUB_MODEL_CHOICES = ('best', 'last', 'ema')


def add_push_args(parser: Union[argparse.ArgumentParser, Any]) -> None:
    """Add `--push-to-hub REPO_ID`, `--hub-private` and `--hub-model {best,last,ema}` to a parser or group.

    There is deliberately no token flag: the token stays where huggingface_hub keeps it, out of args.yaml.
    """
    parser.add_argument('--push-to-hub', default=None, metavar='REPO_ID',
                        help='at the end of training, export the model to timm\'s Hub format and upload it to this '
                             'Hub repo (token: HF_TOKEN or `hf auth login`; checked before training starts)')
    parser.add_argument('--hub-private', action='store_true', default=False,
                        help='create the --push-to-hub repo private')
    parser.add_argument('--hub-model', default='best', choices=HUB_MODEL_CHOICES,
                        help='which weights --push-to-hub uploads: model_best, last, or the EMA weights of last '
                             '(default: best)')


def check_push_args(args: argparse.Namespace) -> None:
    """Check `--push-to-hub` settings before training starts, so a run does not fail after hours.

    Reads `args.push_to_hub` (repo id or None/''), `args.hub_model` ('best' | 'last' | 'ema', default
    'best') and `args.model_ema` (needed for 'ema'). Does nothing when `push_to_hub` is empty. The token
    is looked up (HF_TOKEN, `hf auth login`) but not kept, printed or stored in `args`.

    Raises:
        ConfigError: bad repo id, bad `hub_model`, 'ema' without `model_ema`, or no Hub token available.
    """
    repo_id = getattr(args, 'push_to_hub', None)
    if not repo_id:
        return
    from huggingface_hub.utils import HFValidationError, validate_repo_id
    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise ConfigError(f"--push-to-hub '{repo_id}' is not a Hub repo id ({e}). Use 'user/name'.") from e
    hub_model = getattr(args, 'hub_model', None) or 'best'
    if hub_model not in HUB_MODEL_CHOICES:
        raise ConfigError(f"--hub-model '{hub_model}' is not one of {', '.join(HUB_MODEL_CHOICES)}.")
    if hub_model == 'ema' and not getattr(args, 'model_ema', False):
        raise ConfigError("--hub-model ema needs EMA weights: add --model-ema, or use --hub-model best/last.")
    require_token(repo_id, 'Training was not started.')


def hub_checkpoint(output_dir: Union[str, Path], hub_model: str = 'best') -> Path:
    """The checkpoint `--hub-model` names in an experiment folder: model_best.pth.tar for 'best' (last.pth.tar
    when the run saved no best), last.pth.tar for 'last' and 'ema' (whose EMA weights are exported)."""
    output_dir = Path(output_dir)
    best, last = output_dir / 'model_best.pth.tar', output_dir / 'last.pth.tar'
    if hub_model == 'best' and best.is_file():
        return best
    return last


def push_after_training(
        args: argparse.Namespace,
        output_dir: Union[str, Path],
        checkpoint_path: Optional[Union[str, Path]] = None,
        data_config: Optional[Dict[str, Any]] = None,
        class_names: Optional[Sequence[str]] = None,
) -> int:
    """At the end of training (all ranks may call; only rank 0 works): export, then upload.

    Reads from `args`: `push_to_hub` (repo id; nothing happens when empty), `hub_private`, `hub_model`
    ('best' | 'last' | 'ema'), and, through the checkpoint's saved args, `model`, `num_classes`,
    `model_kwargs`, `img_size` / `input_size`, `dataset`, `epochs` and the `drloc_*` settings for the card.
    `rank` decides the primary process (timm's `is_primary`).

    Args:
        args: the training arguments.
        output_dir: the experiment folder (summary.csv, last.pth.tar, model_best.pth.tar).
        checkpoint_path: the checkpoint to export; default: picked by `args.hub_model` (see hub_checkpoint).
        data_config: the training preprocessing (timm's resolved data_config); default: from the checkpoint.
        class_names: class names in index order (e.g. the train dataset's classes), for config.json.

    Returns:
        ExitCode.OK on success (or nothing to do), EXPORT_FAILED or UPLOAD_FAILED. The
        checkpoints are only read; on failure the export folder, when written, is kept and logged.
    """
    repo_id = getattr(args, 'push_to_hub', None)
    if not repo_id or not is_primary(args):
        return ExitCode.OK
    hub_model = getattr(args, 'hub_model', None) or 'best'
    output_dir = Path(output_dir)
    checkpoint = Path(checkpoint_path) if checkpoint_path else hub_checkpoint(output_dir, hub_model)
    if hub_model == 'best' and checkpoint.name == 'last.pth.tar':
        _logger.info(f"No model_best.pth.tar in '{output_dir}' (no eval metric): uploading last.pth.tar.")
    folder = output_dir / DEFAULT_EXPORT_DIR
    try:
        export(checkpoint, folder, data_config=data_config, label_names=class_names, overwrite=True,
               use_ema=hub_model == 'ema', repo_id=repo_id)
    except Exception as e:
        _logger.error(f"Export of '{checkpoint}' for the Hub failed: {e}. The checkpoints are unchanged; "
                      f"export them later with `timm-drloc export {checkpoint} OUT_DIR --push-to-hub {repo_id}`.")
        return ExitCode.EXPORT_FAILED
    try:
        url = push_to_hub(folder, repo_id, private=bool(getattr(args, 'hub_private', False)))
    except Exception as e:
        _logger.error(
            f"Upload to the Hub repo '{repo_id}' failed ({type(e).__name__}: {e}). The export is kept in "
            f"'{folder}' and the checkpoints are unchanged; upload it later with "
            f"`hf upload {repo_id} {folder}` or timm_drloc.push_to_hub('{folder}', '{repo_id}').")
        return ExitCode.UPLOAD_FAILED
    _logger.info(f"Uploaded the {hub_model} model to {url} (export kept in '{folder}').")
    return ExitCode.OK
