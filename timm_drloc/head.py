"""DRLocHead: sample pairs of grid cells, predict their relative offset, return the DRLoc loss.

For each image, m pairs of cells (i, j), (p, h) are drawn uniformly with replacement on the grid's own
device. The two embeddings are gathered straight from the (B, H, W, C) view (no copy of the map, no
host round-trip, no loop over the batch), concatenated and fed to a small MLP that predicts the
offset (i - p, j - h): as two numbers (`l1`) or as one class per possible offset and axis (`ce`, `cbr`).

On a GPU the head's cost is its kernel launches more than its FLOPs, so the step is written in few,
whole-tensor operations: both axes at once, both cells of a pair in one gather, no per-step copy of
the weights. `compiled=True` compiles that step (the sampling stays eager: the same random draws).
"""
import functools
import logging
import os
import time
from typing import Callable, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import GridTooSmallError
from .losses import cbr_loss, ce_loss, l1_loss
from .settings import check_settings

_logger = logging.getLogger(__name__)
NARROW_OUTPUT = 16  # compiled, a last layer at most this wide is a fused multiply-and-sum (see last_layer)


def draw_cells(batch: int, num_cells: int, num_samples: int, device: torch.device) -> torch.Tensor:
    """Draw 2 * num_samples cells per image, uniformly with replacement, as flat indices row * W + col.

    Returns:
        (B, 2, M) long tensor: [:, 0] the first cell of each pair, [:, 1] the second.
    """
    return torch.randint(0, num_cells, (batch, 2, num_samples), device=device)


def cell_positions(cells: torch.Tensor, width: int) -> torch.Tensor:
    """(row, col) of flat cell indices on a grid `width` cells wide: (...) long -> (..., 2) long."""
    return torch.stack((cells // width, cells % width), dim=-1)


def sample_positions(batch: int, height: int, width: int, num_samples: int, device: torch.device) -> torch.Tensor:
    """Draw 2 * num_samples cells per image, uniformly with replacement.

    Returns:
        (B, 2, M, 2) long tensor: [:, 0] the first cell of each pair, [:, 1] the second; last dim (row, col).
    """
    return cell_positions(draw_cells(batch, height * width, num_samples, device), width)


def per_axis(rows: int, cols: int, device: torch.device, dtype: torch.dtype) -> Union[int, torch.Tensor]:
    """A constant with one value per axis, to combine with (..., 2) tensors (rows, cols).

    The number itself when both axes share it (no operator); else a (2,) tensor made on `device` by one
    operator, with no host-to-device copy (linspace's two points are exactly its two ends).
    """
    if rows == cols:
        return rows
    return torch.linspace(rows, cols, 2, device=device, dtype=dtype)


def offset_classes(pos_a: torch.Tensor, pos_b: torch.Tensor, grid_size: Tuple[int, int], use_abs: bool) -> torch.Tensor:
    """Offsets of cell pairs as class indices: |a - b| in [0, k - 1], or signed a - b + k - 1 in [0, 2k - 2].

    Args:
        pos_a, pos_b: (..., 2) long (row, col) of the first and second cells.
        grid_size: (H, W); k is H for rows, W for columns.

    Returns:
        (..., 2) long offsets (rows, cols).
    """
    delta = pos_a - pos_b
    if use_abs:
        return delta.abs()
    return delta + per_axis(grid_size[0] - 1, grid_size[1] - 1, delta.device, delta.dtype)


def offsets_to_targets(classes: torch.Tensor, grid_size: Tuple[int, int], normalize: bool) -> torch.Tensor:
    """(..., 2) long offset classes -> (..., 2) regression targets: divided by (H, W) with `normalize`
    (float32), else the classes themselves (no operator: the losses subtract them from float32).

    The cast comes first: a long tensor divided by a number is in torch's default dtype, not float32."""
    if not normalize:
        return classes
    return classes.float() / per_axis(grid_size[0], grid_size[1], classes.device, torch.float32)


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
    return offsets_to_targets(offset_classes(pos_a, pos_b, grid_size, use_abs), grid_size, normalize).float()


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
        compiled: torch.compile the head's step (targets, MLP, loss, and their backward) into few
            kernels, for GPUs where launches cost more than the head's FLOPs. True for torch.compile's
            default mode, or a mode name ('reduce-overhead' adds CUDA graphs). Pair sampling stays
            eager, so a seed gives the same pairs. Inside a model compiled as a whole it does nothing.

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
            compiled: Union[bool, str] = False,
    ):
        super().__init__()
        check_settings(mode=mode, num_samples=num_samples, hidden_dim=hidden_dim, normalize=normalize,
                       compile_head=compiled)
        check_grid_size(grid_size)
        num_samples, hidden_dim = int(num_samples), int(hidden_dim)  # numpy integers too
        self.mode = mode
        self.num_samples = num_samples
        self.use_abs = use_abs
        self.normalize = normalize
        self.grid_size = tuple(grid_size)
        self.compiled = compiled
        self._compile_reported = False
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
        cells = draw_cells(batch, height * width, self.num_samples, grid.device)  # B, 2, M
        if not self.compiled or torch.compiler.is_compiling():
            return self.pair_loss(grid, cells)
        return self._compiled_pair_loss(grid, cells)

    def pair_loss(self, grid: torch.Tensor, cells: torch.Tensor) -> torch.Tensor:
        """DRLoc loss of the sampled pairs: targets, first layer, MLP and loss (what `compiled` compiles).

        Args:
            grid: (B, H, W, C) features.
            cells: (B, 2, M) flat indices (row * W + col) of the first and second cell of each pair.

        Returns:
            float32 scalar loss.
        """
        grid_size = (grid.shape[1], grid.shape[2])
        pos = cell_positions(cells, grid_size[1])  # B, 2, M, 2
        classes = offset_classes(pos[:, 0], pos[:, 1], grid_size, self.use_abs)  # B, M, 2
        out = self.last_layer(self.mlp[1:4](self.pair_preactivations(grid, cells)))  # B, M, 2 | B, M, hidden
        with torch.autocast(device_type=grid.device.type, enabled=False):
            return self.loss(out, classes, grid_size)

    def pair_preactivations(self, grid: torch.Tensor, cells: torch.Tensor) -> torch.Tensor:
        """First MLP layer on the concatenated pairs [e_a; e_b], the cheaper way round for this grid.

        Args:
            grid: (B, H, W, C) features.
            cells: (B, 2, M) flat indices of the first and second cell of each pair.

        Returns:
            (B, M, hidden) pre-activations.
        """
        if self.projects_cells_first(grid, cells.shape[-1]):
            return self.project_then_gather(grid, cells)
        return self.gather_then_project(grid, cells)

    def projects_cells_first(self, grid: torch.Tensor, num_samples: int, device_type: Optional[str] = None) -> bool:
        """Whether `pair_preactivations` projects every cell before gathering (else it gathers the pairs first).

        Only where projecting every cell is cheaper on both counts: fewer multiply-adds (fewer cells than
        pairs: 7 x 7 < m = 64) and no more values gathered (hidden width at most the channels C: the gather
        then moves hidden instead of C values per pair end). A small grid of few channels (4 x 4 x 64) passes
        the first test and fails the second: there, gathering (B, M, hidden, 2) projections costs the CPU more
        than the multiply-adds save (`benchmarks/first_layer.py`). And only on the CPU, whose time goes to
        arithmetic, or under torch.compile, which fuses the extra sum and bias add: an eager GPU step is
        bound by its launches, and gathering first dispatches 1-3 operators fewer.

        Args:
            grid: (B, H, W, C) features.
            num_samples: pairs per image (M).
            device_type: the device whose rule applies (default: the grid's); 'cuda' lets a CPU count the
                operators a GPU head dispatches (benchmarks/opcount.py).
        """
        height, width, channels = grid.shape[1:]
        cheaper = height * width < num_samples and self.mlp[0].out_features <= channels
        return cheaper and ((device_type or grid.device.type) == 'cpu' or torch.compiler.is_compiling())

    def gather_then_project(self, grid: torch.Tensor, cells: torch.Tensor) -> torch.Tensor:
        """Gather both cells of every pair in one op, then W [e_a; e_b] + b. Shapes as `pair_preactivations`."""
        channels = grid.shape[-1]
        both = grid.flatten(1, 2).unsqueeze(2).expand(-1, -1, 2, -1)  # B, H*W, 2, C (a view)
        index = cells.transpose(1, 2).unsqueeze(-1).expand(-1, -1, -1, channels)  # B, M, 2, C
        pairs = torch.gather(both, 1, index)  # B, M, 2, C: [e_a, e_b] of each pair
        return self.mlp[0](pairs.flatten(2))  # B, M, hidden

    def project_then_gather(self, grid: torch.Tensor, cells: torch.Tensor) -> torch.Tensor:
        """W [e_a; e_b] + b = W_a e_a + W_b e_b + b: project every cell with both halves of W, then gather.

        W (hidden, 2C) read as (2 hidden, C) holds row W_a[u] at 2u and W_b[u] at 2u + 1: one matrix
        product projects each cell with both halves, without copying W. Shapes as `pair_preactivations`.
        """
        batch, height, width, channels = grid.shape
        linear = self.mlp[0]
        hidden = linear.out_features
        proj = F.linear(grid.flatten(1, 2), linear.weight.reshape(2 * hidden, channels))  # B, H*W, 2 hidden
        proj = proj.view(batch, height * width, hidden, 2)  # [..., u, s]: half s of unit u
        index = cells.transpose(1, 2).unsqueeze(2).expand(-1, -1, hidden, -1)  # B, M, hidden, 2
        return torch.gather(proj, 1, index).sum(-1) + linear.bias  # B, M, hidden

    def last_layer(self, hidden: torch.Tensor) -> torch.Tensor:
        """The MLP's last Linear, (B, M, hidden) -> (B, M, out).

        Under torch.compile, an output as narrow as l1's two offsets is written as a multiply-and-sum,
        which inductor fuses with the ReLU before it and the loss after it; as a Linear it would take
        three matrix-product launches (forward, and both products of the backward) for two columns.
        """
        linear = self.mlp[4]
        if torch.compiler.is_compiling() and linear.out_features <= NARROW_OUTPUT:
            return (hidden.unsqueeze(-2) * linear.weight).sum(-1) + linear.bias  # B, M, out
        return linear(hidden)

    def loss(self, out: torch.Tensor, classes: torch.Tensor, grid_size: Tuple[int, int]) -> torch.Tensor:
        """Loss of the MLP output `out` (B, M, 2 | B, M, hidden) for offset classes (B, M, 2), in float32."""
        if self.mode == 'ce':
            return ce_loss(self.axis_logits(out, grid_size), classes)
        target = offsets_to_targets(classes, grid_size, self.normalize)  # B, M, 2
        if self.mode == 'l1':
            return l1_loss(out, target)
        logits = self.axis_logits(out, grid_size)  # B, M, 2, n
        return cbr_loss(logits, target, self.offset_values(logits.shape[-1], grid_size, out.device))

    def axis_logits(self, out: torch.Tensor, grid_size: Tuple[int, int]) -> torch.Tensor:
        """Both axes' offset scores, (B, M, hidden) -> (B, M, 2, n) with n the larger class count.

        Each axis keeps the classes of the runtime grid (it may be smaller than the one the head was
        built for); an axis with fewer classes is padded with -inf, a score no softmax gives weight to.
        """
        counts = [num_offsets(size, self.use_abs) for size in grid_size]
        width = max(counts)
        out = out.to(self.axis_heads[0].weight.dtype)  # fp16 under AMP; bf16 heads of a bf16 model stay bf16
        scores = []
        for head, count in zip(self.axis_heads, counts):  # two Linear modules: the parameters are per axis
            axis = head(out)[..., :count]  # B, M, count
            scores.append(axis if count == width else F.pad(axis, (0, width - count), value=float('-inf')))
        return torch.stack(scores, dim=-2)

    def offset_values(self, count: int, grid_size: Tuple[int, int], device: torch.device) -> torch.Tensor:
        """The offset each class stands for, on the targets' scale: (count,), or (2, count) per axis."""
        values = torch.arange(count, device=device, dtype=torch.float32)
        if not self.normalize:
            return values
        scale = per_axis(grid_size[0], grid_size[1], device, torch.float32)
        return values / (scale.unsqueeze(-1) if torch.is_tensor(scale) else scale)

    def _compiled_pair_loss(self, grid: torch.Tensor, cells: torch.Tensor) -> torch.Tensor:
        """`pair_loss` through torch.compile; reports the first call's time (the forward's compilation)."""
        compiled = compiled_pair_loss(None if self.compiled is True else self.compiled)
        if self._compile_reported:
            return compiled(self, grid, cells)
        start = time.perf_counter()
        loss = compiled(self, grid, cells)
        self._compile_reported = True
        _logger.info(f"DRLoc head {grid.shape[1]}x{grid.shape[2]}x{grid.shape[3]}: first compiled call took "
                     f"{time.perf_counter() - start:.1f} s (the forward's compilation, unless a head of the same "
                     f"shapes compiled it already; the backward compiles in the first backward)")
        return loss

    def _check_runtime_grid(self, height: int, width: int) -> None:
        check_grid_size((height, width))
        if self.axis_heads is not None and (height > self.grid_size[0] or width > self.grid_size[1]):
            raise ValueError(
                f"A {height}x{width} grid is larger than the {self.grid_size[0]}x{self.grid_size[1]} grid this "
                f"'{self.mode}' head has offset classes for. Wrap the model with the largest input size "
                f"(input_size=...) or use mode='l1'.")

    def extra_repr(self) -> str:
        return (f"mode={self.mode}, num_samples={self.num_samples}, use_abs={self.use_abs}, "
                f"normalize={self.normalize}, grid_size={self.grid_size}"
                + (f", compiled={self.compiled}" if self.compiled else ''))


@functools.lru_cache(maxsize=None)
def compiled_pair_loss(mode: Optional[str]) -> Callable[..., torch.Tensor]:
    """DRLocHead.pair_loss compiled with torch.compile `mode`, once per process and mode, for all heads.

    Compiled as a plain function taking the head, so that a deep copy of a head (EMA) holds no
    reference to a compiled function bound to the original. Dynamo compiles on the first call and
    again when shapes change (a second compile makes them dynamic), not per step.
    """
    return torch.compile(DRLocHead.pair_loss, mode=mode)


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
    """Bytes as a short human figure: '512 MiB', '1.9 TiB', '1007 GiB' (four digits: 1000 to 1023 of a
    unit are written out, not as '1.01e+03')."""
    for unit in ('B', 'KiB', 'MiB', 'GiB', 'TiB'):
        if size < 1024:
            return f'{size:.4g} {unit}'
        size /= 1024
    return f'{size:.4g} PiB'


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
