"""Hugging Face Hub: export DRLoc-trained models to timm's Hub format, and upload them.

An export is a folder that plain timm loads, with no timm_drloc import:

    config.json         architecture, num_classes, label_names, model_args and the pretrained_cfg
                        (mean / std / input size / crop) the model was trained with
    model.safetensors   the backbone's state_dict only: the DRLoc heads are training state
    README.md           model card: library_name timm, tags, the DRLoc training recipe and results (card.py)

    >>> timm_drloc.export('output/train/run/model_best.pth.tar', 'export/run')
    >>> model = timm.create_model('local-dir:export/run', pretrained=True)

What is timm's here, and why the rest is not:
* timm's: the folder's files (`save_for_hf`), the card's text (`generate_readme`, see card.py), reading the
  checkpoint and rebuilding its model (`load_checkpoint_metadata`, `load_state_dict`, `resolve_model_input_args`,
  see checkpoint.py), the wrappers stripped (`unwrap_model`).
* `export` starts from a training checkpoint, which timm's exporters do not take, leaves the DRLoc heads out,
  and writes the run's recipe and results into the card.
* `push_to_hub` uploads a folder `export` wrote, not timm's `push_to_hf_hub`: that one writes into a temporary
  folder (a failed upload loses the export; here it is kept for a later `hf upload`), uploads a pickled copy
  of the weights beside the safetensors by default, and keeps a README already on the Hub (the card would not
  show the new run).
* `require_token` checks the token before any work (training, an export); timm's script finds a missing token
  at the upload, after the training. The token is read by huggingface_hub from HF_TOKEN or the `hf auth login`
  file; it is never passed through args, printed, or written anywhere.

Training runs publish with `--push-to-hub` (timm_drloc.train.publish); `timm-drloc export` is `export_main`.
"""
import argparse
import copy
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import torch.nn as nn

from .card import model_card, training_recipe
from .checkpoint import checkpoint_model
from .errors import ConfigError, ExitCode, SummaryError
from .summary import SUMMARY_FILE, read_summary

_logger = logging.getLogger(__name__)

EXPORT_FILES = ('config.json', 'model.safetensors', 'README.md')
DEFAULT_EXPORT_DIR = 'hub_export'  # the export folder --push-to-hub writes in the experiment folder
DATA_CONFIG_KEYS = ('input_size', 'img_size', 'mean', 'std', 'crop_pct', 'crop_mode', 'interpolation',
                    'test_input_size', 'test_crop_pct')  # what config.json records of the preprocessing


# ---------------------------------------------------------------------------------------------------------
# the run a checkpoint comes from

def training_data_config(model: nn.Module, args: Dict[str, Any]) -> Dict[str, Any]:
    """The preprocessing a run trained with (input_size, mean, std, crop_pct, interpolation, crop_mode),
    resolved from its saved arguments and the model the way timm's train.py resolves it, with mean and std
    fitted to the input channels as timm's loader fits them (a 3-value mean on a 1-channel model: their mean)."""
    from timm.data import resolve_data_config
    from timm.data.loader import adapt_to_chs
    keys = ('input_size', 'img_size', 'in_chans', 'mean', 'std', 'crop_pct', 'interpolation', 'crop_mode')
    config = resolve_data_config({k: args[k] for k in keys if args.get(k) is not None}, model=model)
    channels = config['input_size'][0]
    for key in ('mean', 'std'):
        config[key] = tuple(adapt_to_chs(config[key], channels))
    return config


def _summary_rows(folder: Path) -> List[Dict[str, str]]:
    """The summary.csv rows beside a checkpoint, for the card's results ([] without one)."""
    if not (folder / SUMMARY_FILE).is_file():
        return []
    try:
        return read_summary(str(folder))
    except SummaryError as e:
        _logger.warning(f"{e} The model card will have no results.")
        return []


# ---------------------------------------------------------------------------------------------------------
# export

def _plain_model(obj: nn.Module, use_ema: bool) -> nn.Module:
    """The timm backbone inside a DRLocTask / DRLocModel / EMA / DDP / compile wrapper."""
    from .model import unwrap
    from .task import DRLocTask
    if isinstance(obj, DRLocTask):
        obj = obj.get_eval_model(ema=use_ema)
        if obj is None:
            raise ValueError("The DRLocTask has no EMA model: call setup_ema() during training, or export with "
                             "use_ema=False.")
    model = unwrap(obj)
    if not hasattr(model, 'pretrained_cfg'):
        raise ValueError(f"export() needs a timm model (made by timm.create_model); got {type(model).__name__}. "
                         f"Wrap a timm model, or export one of its training checkpoints.")
    return model


def _untied(model: nn.Module) -> nn.Module:
    """`model`, or where it uses a module, parameter or buffer in several places (CoaT's positional convolutions,
    shared by the blocks of a stage), a copy in which each place holds its own clone. safetensors refuses tensors
    that share memory; timm's loader fills each place from its own key, which gives the shared one its value."""
    pointers = [t.data_ptr() for t in model.state_dict(keep_vars=True).values() if t.numel()]
    if len(pointers) == len(set(pointers)):
        return model
    copy_ = copy.deepcopy(model)
    _untie(copy_, set(), set())
    return copy_


def _untie(module: nn.Module, seen_modules: set, seen_tensors: set) -> None:
    """Give every second and later use of a submodule, parameter or buffer inside `module` its own copy."""
    for store in (module._parameters, module._buffers):
        for name, tensor in store.items():
            if tensor is not None and id(tensor) in seen_tensors:
                clone = tensor.detach().clone()
                store[name] = nn.Parameter(clone, tensor.requires_grad) if isinstance(tensor, nn.Parameter) else clone
            seen_tensors.add(id(store[name]))
    for name, child in module._modules.items():
        if child is None:
            continue
        if id(child) in seen_modules:
            child = module._modules[name] = copy.deepcopy(child)
        seen_modules.add(id(child))
        _untie(child, seen_modules, seen_tensors)


def _check_out_dir(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"Export folder '{out_dir}' is a file. Pass a folder path.")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(
            f"Export folder '{out_dir}' is not empty. Pass overwrite=True (--overwrite) to replace its "
            f"{', '.join(EXPORT_FILES)}, or choose an empty folder.")


def export(
        model_or_checkpoint: Union[nn.Module, str, Path],
        out_dir: Union[str, Path],
        *,
        model_name: Optional[str] = None,
        num_classes: Optional[int] = None,
        label_names: Optional[Sequence[str]] = None,
        data_config: Optional[Dict[str, Any]] = None,
        recipe: Optional[Dict[str, Any]] = None,
        overwrite: bool = False,
        use_ema: bool = False,
        model_kwargs: Optional[Dict[str, Any]] = None,
        repo_id: Optional[str] = None,
) -> Path:
    """Write a model or a training checkpoint as a folder in timm's Hub format, without DRLoc heads.

    Args:
        model_or_checkpoint: a timm model, DRLocModel or DRLocTask, or the path of a training checkpoint.
        out_dir: the folder to write (created; must be empty unless `overwrite`).
        model_name: timm architecture of a checkpoint (default: the checkpoint's saved `args.model`).
        num_classes: classes of a checkpoint (default: `args.num_classes`, else taken from the weights' shapes).
        label_names: class names, index order (written to config.json `label_names`).
        data_config: preprocessing used in training (input_size, mean, std, crop_pct, interpolation, ...);
            default: resolved from the checkpoint's args, or from the model (its current input size, and
            its pretrained_cfg's mean / std).
        recipe: model card recipe entries, added to (and overriding) those read from the checkpoint.
        overwrite: replace config.json / model.safetensors / README.md in a non-empty `out_dir`.
        use_ema: export the EMA weights ('state_dict_ema', or the task's EMA model).
        model_kwargs: extra `timm.create_model` arguments for a checkpoint (default: `args.model_kwargs`).
        repo_id: Hub repo the folder is meant for (only used in the model card's usage snippet).

    Returns:
        `out_dir` as a Path, holding config.json, model.safetensors and README.md.

    Example:
        >>> out = timm_drloc.export('output/train/run/model_best.pth.tar', 'export/run')
        >>> model = timm.create_model(f'local-dir:{out}', pretrained=True)
    """
    from timm.models import save_for_hf
    out_dir = Path(out_dir)
    _check_out_dir(out_dir, overwrite)
    args: Dict[str, Any] = {}
    card_recipe: Dict[str, Any] = {}
    if isinstance(model_or_checkpoint, nn.Module):
        model = _plain_model(model_or_checkpoint, use_ema)
        if model_name is not None and model_name != model.pretrained_cfg.get('architecture'):
            raise ValueError(f"model_name='{model_name}' but the model is a "
                             f"'{model.pretrained_cfg.get('architecture')}'; leave model_name out for a model.")
        if num_classes is not None and num_classes != model.num_classes:
            raise ValueError(f"num_classes={num_classes} but the model has {model.num_classes} classes.")
    else:
        path = Path(model_or_checkpoint)
        model, args, checkpoint = checkpoint_model(path, model_name, num_classes, model_kwargs, use_ema)
        card_recipe = training_recipe(args, _summary_rows(path.parent), checkpoint.get('epoch'),
                                      checkpoint.get('metric'))
    model = model.eval()
    if data_config is None:
        data_config = training_data_config(model, args) if args else {}  # {}: timm uses the model's own
    data_config = {k: v for k, v in data_config.items() if k in DATA_CONFIG_KEYS and v is not None}
    model_config: Dict[str, Any] = {}
    if label_names is not None:
        label_names = [str(n) for n in label_names]
        if len(label_names) != model.num_classes:
            raise ValueError(f"{len(label_names)} label names for a model with {model.num_classes} classes; pass "
                             f"one name per class, in class-index order.")
        model_config['label_names'] = label_names
    card_recipe.update(recipe or {})

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f'.{out_dir.name}.', dir=out_dir.parent))
    try:
        save_for_hf(_untied(model), str(staging), model_config=model_config, safe_serialization=True,
                    data_config=data_config)
        resolved = {'input_size': tuple(_read_pretrained_cfg(staging).get('input_size', ()))}
        (staging / 'README.md').write_text(
            model_card(model, card_recipe, resolved, repo_id=repo_id), encoding='utf-8')
        out_dir.mkdir(parents=True, exist_ok=True)
        for name in EXPORT_FILES:  # whole files into place: never a half-written export
            os.replace(staging / name, out_dir / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    _logger.info(f"Exported {model.pretrained_cfg.get('architecture')} to '{out_dir}'.")
    return out_dir


def _read_pretrained_cfg(folder: Path) -> Dict[str, Any]:
    import json
    return json.loads((folder / 'config.json').read_text()).get('pretrained_cfg', {})


# ---------------------------------------------------------------------------------------------------------
# upload

def push_to_hub(
        folder_or_model: Union[str, Path, nn.Module],
        repo_id: str,
        *,
        private: bool = False,
        token: Optional[str] = None,
        commit_message: str = 'Add timm model trained with DRLoc',
        revision: Optional[str] = None,
) -> str:
    """Upload an exported folder (or a model, exported first to a temporary folder) to the Hub.

    Args:
        folder_or_model: a folder written by `export()`, or anything `export()` takes.
        repo_id: 'user/name' (created when missing).
        private: create the repo private.
        token: a Hub token; default: huggingface_hub's own lookup (HF_TOKEN, then `hf auth login`).
        commit_message: the Hub commit message.
        revision: branch to push to (default: main).

    Returns:
        The repo URL.
    """
    from huggingface_hub import HfApi
    from timm import __version__ as timm_version
    if isinstance(folder_or_model, (str, Path)) and Path(folder_or_model).is_dir():
        folder = Path(folder_or_model)
        missing = [n for n in EXPORT_FILES if not (folder / n).is_file()]
        if missing:
            raise ValueError(f"'{folder}' is not an export folder: {', '.join(missing)} missing. Make it with "
                             f"timm_drloc.export() (timm-drloc export).")
        api = HfApi(token=token, library_name='timm', library_version=timm_version)
        repo_url = api.create_repo(repo_id, private=private, exist_ok=True)
        api.upload_folder(
            repo_id=getattr(repo_url, 'repo_id', repo_id), folder_path=str(folder),
            allow_patterns=list(EXPORT_FILES), commit_message=commit_message, revision=revision)
        return str(repo_url)
    with tempfile.TemporaryDirectory() as tmp:
        folder = export(folder_or_model, Path(tmp) / 'export', repo_id=repo_id)
        return push_to_hub(folder, repo_id, private=private, token=token, commit_message=commit_message,
                           revision=revision)


# ---------------------------------------------------------------------------------------------------------
# the token

def require_token(repo_id: str, consequence: str = '') -> None:
    """Raise a ConfigError when huggingface_hub finds no token (HF_TOKEN, `hf auth login`) or the Hub rejects it
    (checked with whoami); warn when it cannot be checked (no network). The token is not kept or shown."""
    from huggingface_hub import HfApi, get_token
    from huggingface_hub.errors import HfHubHTTPError
    if not get_token():
        raise ConfigError(
            f"--push-to-hub {repo_id} needs a Hugging Face token and none was found. Set the HF_TOKEN "
            f"environment variable or run `hf auth login` (huggingface-cli login) first, or drop --push-to-hub "
            f"and upload later. {consequence}".rstrip())
    try:
        HfApi().whoami()
    except HfHubHTTPError as e:
        if getattr(e.response, 'status_code', None) == 401:
            raise ConfigError(
                f"--push-to-hub {repo_id}: the Hub rejects the Hugging Face token (401 Unauthorized: invalid or "
                f"expired). Set a valid HF_TOKEN (it wins over `hf auth login`) or log in again with "
                f"`hf auth login --force`. {consequence}".rstrip()) from None
        _token_unverified(repo_id, e)
    except Exception as e:  # no network, offline mode, a Hub outage: the upload at the end will tell
        _token_unverified(repo_id, e)


def _token_unverified(repo_id: str, error: Exception) -> None:
    _logger.warning(f"--push-to-hub {repo_id}: the Hugging Face token could not be verified now "
                    f"({type(error).__name__}: the Hub did not answer); going on, but the upload at the end may "
                    f"fail (the export would then be kept for a later upload).")


# ---------------------------------------------------------------------------------------------------------
# command line

def _parser() -> argparse.ArgumentParser:
    from timm.utils import ParseKwargs
    parser = argparse.ArgumentParser(
        prog='timm-drloc export',
        description="Export a training checkpoint to a folder in timm's Hub format (config.json, "
                    "model.safetensors, README.md) that plain timm loads; optionally upload it.")
    parser.add_argument('checkpoint', help='training checkpoint (.pth.tar / .pth / .safetensors)')
    parser.add_argument('out_dir', help='folder to write (must be empty unless --overwrite)')
    parser.add_argument('--model', default=None,
                        help="timm architecture (default: the checkpoint's saved args.model)")
    parser.add_argument('--num-classes', type=int, default=None,
                        help="classifier size (default: the checkpoint's saved args.num_classes)")
    parser.add_argument('--model-kwargs', nargs='*', default={}, action=ParseKwargs,
                        help='extra timm.create_model arguments, k=v ...')
    parser.add_argument('--label-names', nargs='+', default=None, help='class names, in class-index order')
    parser.add_argument('--ema', action='store_true', help="export the EMA weights ('state_dict_ema')")
    parser.add_argument('--overwrite', action='store_true', help='replace the export files in a non-empty OUT_DIR')
    parser.add_argument('--push-to-hub', default=None, metavar='REPO_ID',
                        help='upload the folder to this Hub repo (token: HF_TOKEN or `hf auth login`)')
    parser.add_argument('--hub-private', action='store_true', help='create the Hub repo private')
    return parser


def export_main(argv: Optional[List[str]] = None) -> int:
    """`timm-drloc export CHECKPOINT OUT_DIR [--model NAME] ...`; returns the ExitCode."""
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format='%(message)s')
    try:
        if args.push_to_hub:
            require_token(args.push_to_hub, 'Nothing was exported.')
        folder = export(
            args.checkpoint, args.out_dir, model_name=args.model, num_classes=args.num_classes,
            label_names=args.label_names, overwrite=args.overwrite, use_ema=args.ema,
            model_kwargs=args.model_kwargs, repo_id=args.push_to_hub)
    except (ValueError, OSError) as e:
        print(f"timm-drloc export: error: {e}", file=sys.stderr)
        return ExitCode.BAD_INPUT
    print(f"Exported to {folder}: load it with timm.create_model('local-dir:{folder}', pretrained=True)")
    if args.push_to_hub:
        try:
            url = push_to_hub(folder, args.push_to_hub, private=args.hub_private)
        except Exception as e:
            print(f"timm-drloc export: upload to '{args.push_to_hub}' failed ({type(e).__name__}: {e}). "
                  f"The export is kept in '{folder}'.", file=sys.stderr)
            return ExitCode.UPLOAD_FAILED
        print(f"Uploaded to {url}")
    return ExitCode.OK
