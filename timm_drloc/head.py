"""DRLocHead: sample pairs of grid cells, predict their relative offset, return the DRLoc loss.

For each image, m pairs of cells (i, j), (p, h) are drawn uniformly with replacement on the grid's own
device. The two embeddings are gathered straight from the (B, H, W, C) view (no copy of the map, no
host round-trip, no loop over the batch), concatenated and fed to a small MLP that predicts the
offset (i - p, j - h): as two numbers (`l1`) or as one class per possible offset and axis (`ce`, `cbr`).
"""
import os
from typing import NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import GridTooSmallError
from .losses import cbr_loss, ce_loss, l1_loss
from .settings import check_settings


def sample_positions(batch: int, height: int, width: int, num_samples: int, device: torch.device) -> torch.Tensor:
    """Draw 2 * num_samples cells per image, uniformly with replacement.

    Returns:
        (B, 2, M, 2) long tensor: [:, 0] the first cell of each pair, [:, 1] the second; last dim (row, col).
    """
    flat = torch.randint(0, height * width, (batch, 2, num_samples), device=device)
    return torch.stack((flat // width, flat % width), dim=-1)


def relative_targets(
        pos_a: torch.Tensor,
        pos_b: torch.Tensor,
        grid_size: Tuple[int, int],
        use_abs: bool = True,
        normalize: bool = False,
) -> torch.Tensor:
    """Relative-offset targets of cell pairs on an H x W grid.

    With `use_abs` the target of an axis of size k is |a - b| in [0, k - 1]; signed, it is a - b + k - 1
    in [0, 2k - 2] (shifted so that it is also a class index). With `normalize` it is divided by k (the
    paper's written formula, t = |a - b| / k); by default it stays in grid cells (the reference code's
    scale, which the paper's lambda values were tuned for).

    Args:
        pos_a: (..., 2) long (row, col) of the first cells.
        pos_b: (..., 2) long (row, col) of the second cells.
        grid_size: (H, W).

    Returns:
        (..., 2) float32 targets (rows, cols).
    """
    axes = []
    for axis, size in enumerate(grid_size):  # Python sizes: no host-to-device copy in the step
        delta = (pos_a[..., axis] - pos_b[..., axis]).float()
        target = delta.abs() if use_abs else delta + (size - 1)
        axes.append(target / size if normalize else target)
    return torch.stack(axes, dim=-1)


def num_offsets(size: int, use_abs: bool) -> int:
    """How many distinct offsets an axis of `size` cells has: k absolute, 2k - 1 signed."""
    return size if use_abs else 2 * size - 1


class DRLocHead(nn.Module):
    """The DRLoc auxiliary head for one grid: pair sampling, offset MLP and loss.

    Args:
        in_dim: channels C of the grid.
        grid_size: (H, W) of the largest grid the head will see; sets the classes of `ce` / `cbr`.
        mode: 'l1' (regress the offset), 'ce' (classify it per axis), 'cbr' (cycle-back regression).
        num_samples: pairs per image (m).
        use_abs: absolute offsets (default, as the reference training) or signed ones.
        normalize: divide offsets by the grid size (paper text) instead of raw cells (reference code).
        hidden_dim: width of the MLP (reference: 512).

    Example:
        >>> head = DRLocHead(in_dim=192, grid_size=(7, 7))
        >>> loss = head(torch.randn(8, 7, 7, 192))  # B, H, W, C
    """

    def __init__(
            self,
            in_dim: int,
            grid_size: Tuple[int, int],
            mode: str = 'l1',
            num_samples: int = 64,
            use_abs: bool = True,
            normalize: bool = False,
            hidden_dim: int = 512,
    ):
        super().__init__()
        check_settings(mode=mode, num_samples=num_samples, hidden_dim=hidden_dim, normalize=normalize)
        check_grid_size(grid_size)
        num_samples, hidden_dim = int(num_samples), int(hidden_dim)  # numpy integers too
        self.mode = mode
        self.num_samples = num_samples
        self.use_abs = use_abs
        self.normalize = normalize
        self.grid_size = tuple(grid_size)
        out_dim = 2 if mode == 'l1' else hidden_dim
        self.mlp = nn.Sequential(
            nn.Linear(2 * in_dim, hidden_dim),
            nn.ReLU(),
            nn.Linear(hidden_dim, hidden_dim),
            nn.ReLU(),
            nn.Linear(hidden_dim, out_dim),
        )
        if mode == 'l1':
            self.axis_heads = None
        else:
            self.axis_heads = nn.ModuleList([
                nn.Linear(hidden_dim, num_offsets(size, use_abs)) for size in self.grid_size])

    def forward(self, grid: torch.Tensor) -> torch.Tensor:
        """DRLoc loss of one grid.

        Args:
            grid: (B, H, W, C) features, any strides (a permuted NCHW map is fine).

        Returns:
            float32 scalar loss, averaged over pairs and batch.
        """
        batch, height, width, _ = grid.shape
        self._check_runtime_grid(height, width)
        pos = sample_positions(batch, height, width, self.num_samples, grid.device)  # B, 2, M, 2
        target = relative_targets(pos[:, 0], pos[:, 1], (height, width), self.use_abs, self.normalize)
        out = self.mlp[1:](self.first_layer(grid, pos))  # B, M, 2 | B, M, hidden
        with torch.autocast(device_type=grid.device.type, enabled=False):
            return self.loss(out, target, (height, width))

    def first_layer(self, grid: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """First MLP layer on the concatenated pairs, W [e_a; e_b] + b = W_a e_a + W_b e_b + b.

        With more sampled pairs than grid cells (m = 64 on a 7 x 7 grid), projecting every cell once with
        both halves of W and gathering the projections is the same sum at fewer multiply-adds than
        projecting the 2m gathered cells.

        Args:
            grid: (B, H, W, C) features.
            pos: (B, 2, M, 2) sampled (row, col) of the first and second cell of each pair.

        Returns:
            (B, M, hidden) pre-activations.
        """
        batch, height, width, channels = grid.shape
        linear = self.mlp[0]
        batch_idx = torch.arange(batch, device=grid.device).view(batch, 1, 1)
        if height * width < self.num_samples:
            both = torch.cat((linear.weight[:, :channels], linear.weight[:, channels:]))  # 2 hidden, C
            proj = F.linear(grid, both).unflatten(-1, (2, -1))  # B, H, W, 2, hidden
            first = proj[batch_idx[..., 0], pos[:, 0, :, 0], pos[:, 0, :, 1], 0]  # B, M, hidden
            second = proj[batch_idx[..., 0], pos[:, 1, :, 0], pos[:, 1, :, 1], 1]
            return first + second + linear.bias
        cells = grid[batch_idx, pos[..., 0], pos[..., 1]]  # B, 2, M, C
        return linear(torch.cat((cells[:, 0], cells[:, 1]), dim=-1))  # B, M, hidden

    def loss(self, out: torch.Tensor, target: torch.Tensor, grid_size: Tuple[int, int]) -> torch.Tensor:
        """Loss of the MLP output `out` (B, M, 2 | B, M, hidden) against targets (B, M, 2), in float32."""
        if self.mode == 'l1':
            return l1_loss(out, target)
        out = out.to(self.axis_heads[0].weight.dtype)  # fp16 under AMP; bf16 heads of a bf16 model stay bf16
        logits = tuple(
            head(out)[..., :num_offsets(size, self.use_abs)]  # the grid may be smaller than the largest one
            for head, size in zip(self.axis_heads, grid_size))
        if self.mode == 'ce':
            return ce_loss(logits, target)
        offsets = tuple(
            torch.arange(num_offsets(size, self.use_abs), device=out.device, dtype=torch.float32)
            / (size if self.normalize else 1)
            for size in grid_size)
        return cbr_loss(logits, target, offsets)

    def _check_runtime_grid(self, height: int, width: int) -> None:
        check_grid_size((height, width))
        if self.axis_heads is not None and (height > self.grid_size[0] or width > self.grid_size[1]):
            raise ValueError(
                f"A {height}x{width} grid is larger than the {self.grid_size[0]}x{self.grid_size[1]} grid this "
                f"'{self.mode}' head has offset classes for. Wrap the model with the largest input size "
                f"(input_size=...) or use mode='l1'.")

    def extra_repr(self) -> str:
        return (f"mode={self.mode}, num_samples={self.num_samples}, use_abs={self.use_abs}, "
                f"normalize={self.normalize}, grid_size={self.grid_size}")


def check_grid_size(grid_size: Tuple[int, int]) -> None:
    """A grid needs at least two cells to have relative positions to learn."""
    height, width = grid_size
    if height * width < 2:
        raise GridTooSmallError(
            f"The feature grid is {height}x{width}: a single cell has no relative position to localize. "
            f"Use a larger input size (more cells at the final stride) or read an earlier stage with layers=[...].")


class HeadMemory(NamedTuple):
    """Bytes a training step's DRLoc heads hold: weights with their gradients and Adam state, and activations."""
    weights: int
    activations: int

    @property
    def total(self) -> int:
        return self.weights + self.activations


def head_memory(
        grids: Sequence[Tuple[int, Tuple[int, int]]],
        hidden_dim: int,
        num_samples: int,
        mode: str = 'l1',
        use_abs: bool = True,
        batch_size: int = 1,
) -> HeadMemory:
    """An estimate (within a small factor) of the memory of one DRLoc head per grid in float32 training.

    Args:
        grids: (channels C, (H, W)) of each grid.
        hidden_dim, num_samples, mode, use_abs: the head settings.
        batch_size: images per step.

    Returns:
        HeadMemory: weights x 4 (weights, gradients, two Adam moments); activations of the B x M pairs (the
        gathered cells, the MLP's pre- and post-activations, the outputs) and the sampled positions.
    """
    weights = activations = 0
    pairs = batch_size * num_samples
    for channels, grid_size in grids:
        out_dim = 2 if mode == 'l1' else hidden_dim
        params = (2 * channels + 1) * hidden_dim + (hidden_dim + 1) * hidden_dim + (hidden_dim + 1) * out_dim
        if mode != 'l1':
            params += sum((hidden_dim + 1) * num_offsets(size, use_abs) for size in grid_size)
        weights += 4 * 4 * params
        activations += 4 * pairs * (2 * channels + 4 * hidden_dim + out_dim) + 8 * 4 * pairs
    return HeadMemory(weights, activations)


def device_memory(device: torch.device) -> Optional[int]:
    """Total memory in bytes of a CUDA device, or of the host for the CPU; None for other devices."""
    if device.type == 'cuda':
        return torch.cuda.get_device_properties(device).total_memory
    if device.type == 'cpu':
        return os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')
    return None


def memory_text(size: float) -> str:
    """Bytes as a short human figure: '512 MiB', '1.9 TiB'."""
    for unit in ('B', 'KiB', 'MiB', 'GiB', 'TiB'):
        if size < 1024:
            return f'{size:.3g} {unit}'
        size /= 1024
    return f'{size:.3g} PiB'


class HeadTooLargeError(ValueError):
    """The DRLoc heads' estimated memory exceeds the whole memory of their device.

    Attributes:
        memory: the estimate (HeadMemory); available: the device's bytes; device: the device; batch_size: the
        images per step the estimate is for.
    """

    def __init__(self, memory: HeadMemory, available: int, device: torch.device, hidden_dim: int, num_samples: int,
                 batch_size: int):
        self.memory, self.available, self.device, self.batch_size = memory, available, device, batch_size
        super().__init__(
            f"The DRLoc heads would need about {memory_text(memory.total)} ({memory_text(memory.weights)} for the "
            f"weights with hidden_dim={hidden_dim}, {memory_text(memory.activations)} of activations for "
            f"num_samples={num_samples} pairs x {batch_size} image(s)), more than the {memory_text(available)} "
            f"of {device.type}. Lower hidden_dim or num_samples (the reference uses 512 and 64).")


def check_head_memory(
        grids: Sequence[Tuple[int, Tuple[int, int]]],
        hidden_dim: int,
        num_samples: int,
        mode: str,
        use_abs: bool,
        device: torch.device,
        batch_size: int = 1,
) -> HeadMemory:
    """Refuse heads that cannot fit their device before any of their memory is allocated.

    Returns:
        The estimate (see head_memory).

    Raises:
        HeadTooLargeError: the estimate exceeds the device's total memory.
    """
    memory = head_memory(grids, hidden_dim, num_samples, mode, use_abs, batch_size)
    available = device_memory(device)
    if available is not None and memory.total > available:
        raise HeadTooLargeError(memory, available, device, hidden_dim, num_samples, batch_size)
    return memory
