"""Training checkpoints, read safely, and the timm model a run's arguments (and a checkpoint's weights) describe.

Both the training script (--resume, --initial-checkpoint) and the Hub export read checkpoints here: with timm's
own readers (`load_checkpoint_metadata`, `load_state_dict`), which load with `weights_only=True`, so a pickle
that would run code is refused, never run. What this module adds is the answer in types: a file that cannot be
read is a CheckpointError naming it and what is wrong (UnsafeCheckpointError for a refused pickle), decided by
asking torch which globals the pickle references, not by reading an error's text.
"""
import argparse
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn
from timm.models import (
    create_model, get_pretrained_cfg_value, is_model, load_state_dict, parse_model_name, resolve_model_input_args,
    split_model_name_tag)
from timm.utils import load_checkpoint_metadata

from .errors import CheckpointError, ConfigError, UnknownModelError, UnsafeCheckpointError

PathLike = Union[str, os.PathLike]
_ALLOWED_GLOBALS = {'argparse.Namespace'}  # what timm's readers allow besides tensors and plain values


def read_checkpoint(path: PathLike) -> Dict[str, Any]:
    """A checkpoint's entries ('epoch', 'args', 'state_dict', ..., tensors memory-mapped), or a bare state dict.

    A `.safetensors` file reads as {'state_dict': tensors}.

    Raises:
        UnsafeCheckpointError: its pickle references objects other than tensors and plain values (not loaded).
        CheckpointError: truncated, corrupt, or not a dict.
    """
    path = str(path)
    if path.endswith('.safetensors'):
        import safetensors.torch
        try:
            return {'state_dict': safetensors.torch.load_file(path, device='cpu')}
        except Exception as e:
            raise CheckpointError(path, f'{type(e).__name__}: {e}', _damaged(path, f'not a readable safetensors '
                                                                                 f'file, {e}')) from e
    try:
        checkpoint = load_checkpoint_metadata(path)
    except Exception as e:  # a truncated zip, a refused pickle, a legacy pickle that cannot be memory-mapped
        unsafe = _unsafe_globals(path)
        if unsafe:
            raise UnsafeCheckpointError(
                path, f"its pickle references {', '.join(unsafe)}",
                f"Refusing to load checkpoint '{path}': its pickle holds objects other than tensors and plain values "
                f"(it references {', '.join(unsafe)}), and loading them could run code. Only load checkpoints "
                f"written by timm / timm-drloc training, or a safetensors file.") from e
        problem = f'{type(e).__name__}: {e}'.splitlines()[0]
        raise CheckpointError(path, problem, _damaged(path, problem)) from e
    if not isinstance(checkpoint, dict):
        problem = f'holds a {type(checkpoint).__name__}, not a dict of tensors or a training checkpoint'
        raise CheckpointError(path, problem, f"checkpoint '{path}' {problem}; save the model's state_dict() instead "
                                             f"of the module")
    return checkpoint


def _damaged(path: str, problem: str) -> str:
    return (f"checkpoint '{path}' is truncated or corrupt and cannot be read ({problem}); use an intact checkpoint "
            f"(last.pth.tar, model_best.pth.tar or an older checkpoint-*.pth.tar)")


def _unsafe_globals(path: str) -> List[str]:
    """The globals a checkpoint's pickle references beyond what timm allows ([] when it cannot be read at all)."""
    try:
        found = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:
        return []
    return [name for name in found if name not in _ALLOWED_GLOBALS]


def is_weights_only(checkpoint: Any) -> bool:
    """A checkpoint without an epoch that timm reads as model weights: a bare state dict (name -> tensor), or one
    under 'state_dict' / 'model' (what timm's clean_checkpoint.py writes)."""
    if not isinstance(checkpoint, dict) or not checkpoint or 'epoch' in checkpoint:
        return False
    state_dict = checkpoint.get('state_dict', checkpoint.get('model', checkpoint))
    return isinstance(state_dict, dict) and bool(state_dict) and all(torch.is_tensor(v) for v in state_dict.values())


def saved_args(checkpoint: Dict[str, Any]) -> Dict[str, Any]:
    """The training arguments a checkpoint holds ('args': timm's saver stores the argparse.Namespace), as a dict."""
    args = checkpoint.get('args')
    if isinstance(args, argparse.Namespace):
        return dict(vars(args))
    return dict(args) if isinstance(args, dict) else {}


def backbone_state_dict(path: PathLike, checkpoint: Dict[str, Any], use_ema: bool = False) -> Dict[str, torch.Tensor]:
    """The backbone weights of a checkpoint read by `read_checkpoint`: timm's `load_state_dict` ('state_dict',
    'state_dict_ema' with `use_ema`, or a bare state dict); the DRLoc heads of a saved DRLocModel are left out.

    Raises:
        CheckpointError: `use_ema` and the run kept no EMA weights.
    """
    if use_ema and checkpoint.get('state_dict_ema') is None:  # timm would fall back to the plain weights
        raise CheckpointError(path, 'no EMA weights', f"checkpoint '{path}' has no EMA weights ('state_dict_ema'): "
                                                      f"the run was trained without --model-ema; export without --ema")
    state_dict = load_state_dict(str(path), use_ema=use_ema)
    if any(k.startswith('heads.') for k in state_dict) and all(k.startswith(('model.', 'heads.')) for k in state_dict):
        state_dict = {k[len('model.'):]: v for k, v in state_dict.items() if k.startswith('model.')}  # DRLocModel's
    return state_dict


def classifier_size(model_name: str, state_dict: Dict[str, torch.Tensor]) -> Optional[int]:
    """The number of classes the classifier weight in `state_dict` has (None when it cannot be found).

    timm has the classifier's name (its pretrained config) but no function that reads the class count back from
    weights; a bare state dict records nothing else.
    """
    try:
        classifier = get_pretrained_cfg_value(model_name, 'classifier')
    except Exception:  # not a registered model: there is nothing to look up
        return None
    names = classifier if isinstance(classifier, (list, tuple)) else [classifier]
    weight = state_dict.get(f'{names[0]}.weight') if names and names[0] else None
    return int(weight.shape[0]) if weight is not None else None


def check_model_name(model_name: str, flag: str = '--model') -> None:
    """Ask timm whether it can build `model_name` (a registered name, or an hf-hub: / local-dir: source).

    Raises:
        UnknownModelError: naming the model and the `flag` that gave it.
    """
    try:
        source, name = parse_model_name(model_name)
    except ValueError as e:  # a path or repo id without its source prefix, an unknown prefix
        raise UnknownModelError(f"{flag} {model_name}: {e}") from e
    if source is None and not is_model(split_model_name_tag(name)[0]):
        raise UnknownModelError(f"{flag} {model_name}: unknown model '{model_name}', timm has no architecture of "
                                f"that name; timm.list_models('*pattern*') lists them")


def create_model_args(model_name: str, run_args: Dict[str, Any], **model_kwargs: Any) -> Dict[str, Any]:
    """`timm.create_model`'s arguments for the model a run's arguments describe, as timm's train.py resolves them
    (timm's `resolve_model_input_args`: --in-chans / --input-size / --img-size into the model's input, the
    pretrained config with its overlay).

    Args:
        model_name: the timm model name.
        run_args: the run's arguments (`vars(args)`, or a checkpoint's saved ones).
        model_kwargs: create_model arguments (num_classes, global_pool, the --model-kwargs...).

    Raises:
        UnknownModelError: no such model.
        ConfigError: input sizes that disagree with the model's arguments.
    """
    check_model_name(model_name)
    try:
        return resolve_model_input_args(model_name, run_args, **model_kwargs)
    except ValueError as e:  # the name is known: the input requests disagree with each other
        raise ConfigError(f'--model {model_name}: {e}; make --in-chans / --input-size / --img-size agree with '
                          f'--model-kwargs') from e


def checkpoint_model(
        path: Path,
        model_name: Optional[str],
        num_classes: Optional[int],
        model_kwargs: Optional[Dict[str, Any]],
        use_ema: bool,
) -> Tuple[nn.Module, Dict[str, Any], Dict[str, Any]]:
    """The timm model a training checkpoint holds, built as the run built it (its saved --model, --num-classes,
    --model-kwargs and input size, unless given here) with the backbone weights loaded (the EMA's with `use_ema`).

    Returns:
        (the model in eval mode, the run's saved args, the checkpoint's entries).

    Raises:
        FileNotFoundError: no such file. CheckpointError: an unreadable file. ValueError: a model that the
        weights do not fit, or that cannot be built with the run's arguments.
    """
    if not path.is_file():
        raise FileNotFoundError(f"Checkpoint '{path}' does not exist (or is not a file). Pass the path of a "
                                f"checkpoint written by training, e.g. output/train/<run>/model_best.pth.tar.")
    checkpoint = read_checkpoint(path)
    args = saved_args(checkpoint)
    state_dict = backbone_state_dict(path, checkpoint, use_ema)
    model_name = model_name or args.get('model') or checkpoint.get('arch')
    if not model_name or not isinstance(model_name, str):
        raise ValueError(f"Checkpoint '{path}' does not record its model: pass the timm architecture with "
                         f"--model NAME (model_name=...).")
    if num_classes is None:
        num_classes = args.get('num_classes') or classifier_size(model_name, state_dict)
    kwargs = dict(args.get('model_kwargs') or {}, **(model_kwargs or {}))
    flags = dict(num_classes=num_classes, global_pool=args.get('gp'))
    create_args = create_model_args(model_name, args, **{**flags, **kwargs})  # model_kwargs named them: they win
    return _load_weights(create_args, kwargs, state_dict, path), args, checkpoint


def _load_weights(create_args: Dict[str, Any], requested: Dict[str, Any], state_dict: Dict[str, Any],
                  source: Path) -> nn.Module:
    """The model of `create_args` with `state_dict` loaded (strict), in eval mode.

    timm's resolution gives a fixed-size model (ViT, Swin) the run's input size as `img_size`. A model the run
    built at its default size and ran at another (dynamic_img_size) saved weights of its default size: when
    they do not fit, the model is built again without the added img_size.
    """
    candidates = [create_args]
    if 'img_size' in create_args and 'img_size' not in requested:
        candidates.append({k: v for k, v in create_args.items() if k != 'img_size'})
    errors = []
    for candidate in candidates:
        model = _create(candidate, source)
        try:
            model.load_state_dict(state_dict, strict=True)
            return model.eval()
        except RuntimeError as e:
            errors.append(e)
    first_lines = '\n'.join(str(errors[0]).splitlines()[:4])
    raise ValueError(f"The weights in '{source}' do not fit {create_args['model_name']} built with "
                     f"{_shown_kwargs(create_args)}: "
                     f"{first_lines}\nPass the --model, --num-classes and --model-kwargs (model_name, num_classes, "
                     f"model_kwargs) the run was trained with.")


def _create(create_args: Dict[str, Any], source: Path) -> nn.Module:
    """timm.create_model, with arguments the architecture does not take as a ValueError naming the flags."""
    try:
        return create_model(**create_args)
    except TypeError as e:
        raise ValueError(f"timm.create_model('{create_args['model_name']}', **{_shown_kwargs(create_args)}) failed: "
                         f"{e}. Pass the --model and --model-kwargs (model_name, model_kwargs) the run in '{source}' "
                         f"was trained with.") from e


def _shown_kwargs(create_args: Dict[str, Any]) -> Dict[str, Any]:
    """The model arguments worth showing in a message (the name and the resolved pretrained config left out)."""
    return {k: v for k, v in create_args.items() if k not in ('model_name', 'pretrained_cfg')}
