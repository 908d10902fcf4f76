"""DRLoc losses: L1 regression (the paper), per-axis cross-entropy, and cycle-back regression.

Every loss takes the head's predictions and the relative-offset targets of the sampled pairs and
returns a float32 scalar averaged over pairs and the batch, as the reference code does.
"""
import torch
import torch.nn.functional as F

MODES = ('l1', 'ce', 'cbr')


def l1_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean absolute error over pairs, both axes and the batch.

    Args:
        pred: (B, M, 2) predicted offsets (rows, cols).
        target: (B, M, 2) target offsets, float or integer (promoted to float32 by the subtraction).
    """
    return F.l1_loss(pred.float(), target)


def ce_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of each axis' offset classifier, summed over the two axes.

    Both axes in one op: the mean over pairs, batch and the two axes, times two, is the sum of the
    two axes' means.

    Args:
        logits: (B, M, 2, n) scores over the possible offsets of each axis (rows, cols); classes an
            axis lacks are -inf.
        target: (B, M, 2) integer offset classes (rows, cols).
    """
    return 2 * F.cross_entropy(logits.float().flatten(0, 2), target.long().flatten())


def cbr_loss(
        logits: torch.Tensor,
        target: torch.Tensor,
        offsets: torch.Tensor,
        var_weight: float = 1e-3,
        eps: float = 1e-8,
) -> torch.Tensor:
    """Cycle-back regression (variance-aware, after TCC): regress the softmax-expected offset.

    Per axis: beta = softmax(logits), mu = sum(beta * offsets), var = sum(beta * (offsets - mu)^2) + eps,
    loss = mean((mu - t)^2 / var + var_weight * log(var)); the two axes are summed (computed together:
    twice the mean over both).

    Args:
        logits: (B, M, 2, n) scores over the possible offsets of each axis (rows, cols); classes an
            axis lacks are -inf (zero weight).
        target: (B, M, 2) target offsets (rows, cols), on the scale of `offsets`, float or integer.
        offsets: (n,) the offset value of each class, or (2, n) one row per axis.
    """
    beta = logits.float().softmax(dim=-1)  # B, M, 2, n
    mu = (beta * offsets).sum(-1)  # B, M, 2
    var = (beta * (offsets - mu.unsqueeze(-1)) ** 2).sum(-1) + eps
    log_var = var.log()
    return 2 * (torch.exp(-log_var) * (mu - target) ** 2 + var_weight * log_var).mean()
