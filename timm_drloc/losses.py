"""DRLoc losses: L1 regression (the paper), per-axis cross-entropy, and cycle-back regression.

Every loss takes the head's predictions and the relative-offset targets of the sampled pairs and
returns a float32 scalar averaged over pairs and the batch, as the reference code does.
"""
from typing import Tuple

import torch
import torch.nn.functional as F

MODES = ('l1', 'ce', 'cbr')


def l1_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean absolute error over pairs, both axes and the batch.

    Args:
        pred: (B, M, 2) predicted offsets (rows, cols).
        target: (B, M, 2) target offsets.
    """
    return F.l1_loss(pred.float(), target.float())


def ce_loss(logits: Tuple[torch.Tensor, torch.Tensor], target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of each axis' offset classifier, summed over the two axes.

    Args:
        logits: ((B, M, n_rows), (B, M, n_cols)) scores over the possible offsets of each axis.
        target: (B, M, 2) integer offset classes (rows, cols).
    """
    target = target.long()
    return sum(
        F.cross_entropy(axis_logits.float().flatten(0, 1), target[..., axis].flatten())
        for axis, axis_logits in enumerate(logits))


def cbr_loss(
        logits: Tuple[torch.Tensor, torch.Tensor],
        target: torch.Tensor,
        offsets: Tuple[torch.Tensor, torch.Tensor],
        var_weight: float = 1e-3,
        eps: float = 1e-8,
) -> torch.Tensor:
    """Cycle-back regression (variance-aware, after TCC): regress the softmax-expected offset.

    Per axis: beta = softmax(logits), mu = sum(beta * offsets), var = sum(beta * (offsets - mu)^2) + eps,
    loss = mean((mu - t)^2 / var + var_weight * log(var)); the two axes are summed.

    Args:
        logits: ((B, M, n_rows), (B, M, n_cols)) scores over the possible offsets of each axis.
        target: (B, M, 2) target offsets (rows, cols), on the scale of `offsets`.
        offsets: ((n_rows,), (n_cols,)) the offset value of each class.
    """
    total = 0.
    for axis, (axis_logits, values) in enumerate(zip(logits, offsets)):
        beta = axis_logits.float().softmax(dim=-1)  # B, M, n
        mu = (beta * values).sum(-1)  # B, M
        var = (beta * (values - mu.unsqueeze(-1)) ** 2).sum(-1) + eps
        log_var = var.log()
        total = total + (torch.exp(-log_var) * (mu - target[..., axis].float()) ** 2 + var_weight * log_var).mean()
    return total
