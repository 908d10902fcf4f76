"""The model card of an export: the README.md of a timm Hub folder trained with DRLoc.

The text is timm's `generate_readme` (front matter with library_name timm and tags, model details, usage,
citation); what this module decides is what goes in: the training recipe, read from the run's saved arguments
(named fields only, so no local path or private value reaches the card) and its summary.csv results.

    recipe = training_recipe(saved_args, summary_rows, epoch=checkpoint_epoch)
    text = model_card(model, recipe, data_config, repo_id='user/name')
"""
import math
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch.nn as nn

PAPER_CITATION = """@inproceedings{liu2021efficient,
  title={Efficient Training of Visual Transformers with Small Datasets},
  author={Liu, Yahui and Sangineto, Enver and Bi, Wei and Sebe, Nicu and Lepri, Bruno and De Nadai, Marco},
  booktitle={Advances in Neural Information Processing Systems (NeurIPS)},
  year={2021}
}"""

_DESCRIPTION = (
    "An image classification model trained with the Dense Relative Localization (DRLoc) auxiliary loss "
    "(Liu et al., \"Efficient Training of Visual Transformers with Small Datasets\", NeurIPS 2021) with "
    "timm-drloc. The DRLoc heads are used only during training: these weights are a plain timm model and "
    "load without timm-drloc.")


def _schedule_text(args: Dict[str, Any]) -> str:
    warmup = int(args.get('drloc_warmup_epochs') or 0)
    decay = bool(args.get('drloc_decay'))
    if not warmup and not decay:
        return 'constant'
    parts = [f'linear warm-up from 0 over {warmup} epochs'] if warmup else []
    if decay:
        parts.append('linear decay to 0 at the last epoch')
    return ', then '.join(parts)


def _dataset_name(args: Dict[str, Any]) -> Optional[str]:
    dataset = args.get('dataset') or ''
    if '/' in dataset:
        dataset = dataset.split('/', 1)[1]  # 'torch/cifar10' -> 'cifar10'
    if not dataset and args.get('data_dir'):
        dataset = Path(str(args['data_dir'])).name  # only the folder name: no local paths in the card
    return dataset or None


def _summary_results(rows: List[Dict[str, str]], epoch: Optional[int]) -> Dict[str, str]:
    """Top-1 / top-5 of the last epoch and of the exported checkpoint's epoch, from summary.csv rows."""
    results = {}
    rows = [r for r in rows if r.get('eval_top1') not in (None, '')]
    if not rows:
        return results

    def fmt(row, key):
        try:
            return f"{float(row[key]):.2f}"
        except (KeyError, TypeError, ValueError):
            return None

    last = rows[-1]
    for key, label in (('eval_top1', 'Top-1'), ('eval_top5', 'Top-5')):
        value = fmt(last, key)
        if value is not None:
            results[f"{label} (final epoch {last.get('epoch', '?')})"] = f'{value} %'
    if epoch is not None:
        match = [r for r in rows if str(r.get('epoch')) == str(epoch)]
        if match and match[-1] is not last:
            for key, label in (('eval_top1', 'Top-1'), ('eval_top5', 'Top-5')):
                value = fmt(match[-1], key)
                if value is not None:
                    results[f"{label} (exported checkpoint, epoch {epoch})"] = f'{value} %'
    return results


def _lambda_reached(rows: Sequence[Dict[str, str]]) -> Optional[float]:
    """The largest DRLoc lambda in summary.csv's drloc_lambda column (None without one)."""
    values = []
    for row in rows:
        try:
            value = float(row.get('drloc_lambda'))
        except (TypeError, ValueError):
            continue
        if math.isfinite(value):
            values.append(value)
    return max(values) if values else None


def training_recipe(
        args: Dict[str, Any],
        summary_rows: Sequence[Dict[str, str]] = (),
        epoch: Optional[int] = None,
        metric: Optional[float] = None,
) -> Dict[str, Any]:
    """The training recipe shown in the model card, from a run's saved arguments and summary.csv.

    Only named fields are read (never the whole args), so nothing private reaches the card.
    """
    recipe: Dict[str, Any] = {}
    dataset = _dataset_name(args)
    if dataset:
        recipe['Dataset'] = dataset
    if args.get('epochs') is not None:
        recipe['Epochs'] = args['epochs']
    if args.get('drloc_lambda') is not None:
        recipe['DRLoc lambda'] = args['drloc_lambda']
    for key, label in (('drloc_mode', 'DRLoc mode'), ('drloc_samples', 'DRLoc samples per image')):
        if args.get(key) is not None:
            recipe[label] = args[key]
    if args.get('drloc_lambda') is not None:
        recipe['DRLoc lambda schedule'] = _schedule_text(args) if args['drloc_lambda'] else 'DRLoc off (lambda 0)'
        reached = _lambda_reached(summary_rows)
        if reached is not None and reached < args['drloc_lambda']:  # a warm-up as long as the run
            recipe['DRLoc lambda reached'] = f"{reached:g} (the warm-up never reached {args['drloc_lambda']:g})"
    if args.get('drloc_signed') is not None:
        recipe['DRLoc offsets'] = 'signed' if args['drloc_signed'] else 'absolute (reference code)'
    if args.get('drloc_normalize') is not None:
        recipe['DRLoc targets'] = 'divided by the grid size' if args['drloc_normalize'] else 'grid offsets (reference code)'
    if args.get('drloc_multiscale'):
        recipe['DRLoc multi-scale'] = True
    for key, label in (('opt', 'Optimizer'), ('lr', 'Learning rate'), ('sched', 'LR schedule'),
                       ('batch_size', 'Batch size'), ('weight_decay', 'Weight decay')):
        if args.get(key) is not None:
            recipe[label] = args[key]
    recipe.update(_summary_results(list(summary_rows), epoch))
    if metric is not None and not any(k.startswith('Top-1') for k in recipe):
        recipe['Eval metric of the exported checkpoint'] = metric
    return recipe


def model_card(
        model: nn.Module,
        recipe: Dict[str, Any],
        data_config: Dict[str, Any],
        repo_id: Optional[str] = None,
        license: str = 'apache-2.0',
) -> str:
    """README.md text for an export: front matter (library_name timm, tags, license, dataset), model
    details, the DRLoc training recipe, usage and the DRLoc paper citation. Built by timm's generate_readme."""
    from timm.models._hub import generate_readme
    architecture = model.pretrained_cfg.get('architecture', type(model).__name__)
    source = f"hf-hub:{repo_id}" if repo_id else 'local-dir:/path/to/this/folder'
    details = {
        'Model Type': 'Image classification',
        'Architecture': architecture,
        'Params (M)': round(sum(p.numel() for p in model.parameters()) / 1e6, 3),
        'Image size': 'x'.join(str(s) for s in data_config.get('input_size', ())[-2:]),
        'Training': 'DRLoc auxiliary loss (dense relative localization) + classification',
        'Papers': {'DRLoc': 'https://arxiv.org/abs/2106.03746'},
    }
    if recipe.get('Dataset'):
        details['Dataset'] = recipe['Dataset']
    if recipe:
        details['Training recipe'] = {k: v for k, v in recipe.items() if k != 'Dataset'}
    usage = (
        "```python\n"
        "import timm\n"
        "import torch\n\n"
        f"model = timm.create_model('{source}', pretrained=True).eval()\n"
        "data_config = timm.data.resolve_data_config({}, model=model)\n"
        "transform = timm.data.create_transform(**data_config, is_training=False)\n"
        "with torch.no_grad():\n"
        "    probabilities = model(transform(image).unsqueeze(0)).softmax(-1)\n"
        "```\n")
    card = {
        'tags': ['image-classification', 'timm', 'drloc'],
        'library_name': 'timm',
        'license': license,
        'description': _DESCRIPTION,
        'details': details,
        'usage': usage,
        'citation': PAPER_CITATION,
    }
    return generate_readme(card, repo_id.split('/')[-1] if repo_id else architecture)
