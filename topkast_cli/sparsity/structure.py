"""The grain of a layer's masks: single weights (the default), r x c blocks, or N:M groups.

Top-KAST's rule holds at every grain (DESIGN.md §1, "Structured variants"). A weight is seen
as the matrix θ.reshape(out, -1), as the masked backend sees it: a Linear layer's (out, in), a
convolution's out channels x (in channels x kernel positions, in PyTorch's order), and the
transpose of a weight stored (in, out) (`transposed`: transformers' Conv1D, see `layer_types`).

- `Blocks(r, c)`: A and B are the top k_A and k_B of the matrix's r x c blocks by the block's
  L2 norm of θ, exact k in blocks (k = round(D x blocks)); the densities count blocks (ERK
  too). `Blocks(1, 1)` is unstructured Top-KAST, through the very same top-k as without blocks.
  The sparse backend computes with square blocks in BSR (`sparse_linear`).
- `NM(n, m, n_backward)`: in every group of m consecutive entries of a row (m consecutive
  inputs), A keeps the n largest |θ| and B the n_backward largest (B ⊇ A); the forward
  density is n/m.

A structure only chooses masks; they are expanded to θ's shape, so the masked backend, the
regulariser (D = |A| / numel counts blocks alike), refreshes, checkpoints and the DDP mask
digests work on them unchanged. A layer the structure does not divide is refused (one line):
padding would leave partial blocks at the edges, whose weights would not all exist.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ..errors import UserError
from .distribution import backward_counts, layer_counts
from .layer_types import matrix_shape
from .topk import CHUNK, topk_mask, topk_masks, topk_masks_every_row, topk_masks_in_groups

PATTERNS = ("block", "nm")


def in_stored_layout(masks_of, theta: torch.Tensor, transposed: bool):
    """`masks_of(matrix)` -> (A, B) chosen on the out x in matrix of θ, returned in θ's own
    layout. A weight stored (in, out) is transposed for the choice (a copy of θ, once per
    refresh) and its masks back."""
    if not transposed:
        return masks_of(theta)
    forward, backward = masks_of(theta.t().contiguous())
    back = forward.t().contiguous()
    return back, back if backward is forward else backward.t().contiguous()


def _two_ints(key: str, value, what: str) -> tuple[int, int]:
    ok = isinstance(value, Sequence) and not isinstance(value, str) and len(value) == 2
    ok = ok and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value)
    if not ok:
        raise UserError(f"{key}={_show(value)} must be two integers >= 1 ({what})")
    return int(value[0]), int(value[1])


def _show(value) -> str:
    return str(list(value)) if isinstance(value, Sequence) and not isinstance(value, str) else repr(value)


class Blocks:
    """A and B as sets of r x c blocks (see the module docstring)."""

    def __init__(self, rows: int = 1, cols: int = 1):
        self.rows, self.cols = rows, cols

    @property
    def size(self) -> int:
        """Weights per block: the unit the layer counts are given in."""
        return self.rows * self.cols

    @property
    def unstructured(self) -> bool:
        return self.size == 1

    @property
    def blocksize(self) -> tuple[int, int]:
        return self.rows, self.cols

    def __str__(self) -> str:
        return f"sparsity.block=[{self.rows}, {self.cols}]"

    def sparse_reason(self) -> str | None:
        """Why the sparse backend cannot compute with these blocks (None: it can; single
        weights in CSR, square blocks in BSR)."""
        if self.rows != self.cols:
            return f"{self}: its BSR kernels take square blocks only"
        return None

    def check(self, name: str, shape: tuple, transposed: bool = False) -> None:
        """A UserError if the blocks do not tile layer `name`'s matrix."""
        out, cols = matrix_shape(shape, transposed)
        if out % self.rows or cols % self.cols:
            raise UserError(
                f"{self} does not divide layer {name}: its weight {tuple(shape)} is a {out} x {cols} matrix; "
                "choose a block that divides every sparse layer, or keep this one dense (sparsity.dense_layers)"
            )

    def counts(self, shapes: dict, density: float, backward_density: float, distribution: str):
        """(k_forward, k_backward) per layer in weights: whole blocks, counted in blocks."""
        units = {n: math.prod(s) // self.size for n, s in shapes.items()}
        forward = layer_counts(shapes, density, distribution, units)
        backward = backward_counts(shapes, forward, density, backward_density, distribution, units)
        return ({n: k * self.size for n, k in forward.items()}, {n: k * self.size for n, k in backward.items()})

    def scores(self, theta: torch.Tensor) -> torch.Tensor:
        """Each block's squared L2 norm (the order of the norms, without a root), as a
        (rows / r) x (columns / c) matrix; a row block at a time, so no temporary of the
        layer's size (a refresh's memory peak; 8x faster than `vector_norm` over the two dims)."""
        matrix = theta.reshape(theta.shape[0], -1)
        grid = (matrix.shape[0] // self.rows, matrix.shape[1] // self.cols)
        out = matrix.new_empty(grid)
        step = max(1, CHUNK // (self.rows * matrix.shape[1]))  # rows of blocks per piece
        for i in range(0, grid[0], step):
            piece = matrix[i * self.rows : (i + step) * self.rows].square()
            torch.sum(piece.view(-1, self.rows, grid[1], self.cols).sum(3), 1, out=out[i : i + step])
        return out

    def expand(self, mask: torch.Tensor, shape: tuple) -> torch.Tensor:
        """A mask of blocks as a bool tensor of θ's `shape` (every weight of a chosen block)."""
        grid_rows, grid_cols = mask.shape
        whole = mask[:, None, :, None].expand(grid_rows, self.rows, grid_cols, self.cols)
        return whole.reshape(shape)

    def masks(self, theta: torch.Tensor, k_forward: int, k_backward: int, every_row: bool = False):
        """(A, B) of θ's shape with k_forward and k_backward weights (whole blocks): the top
        blocks by norm, B ⊇ A (equal counts: mostly one shared tensor). `every_row`:
        every row of blocks keeps its best block in A (`topk_masks_every_row`)."""
        if self.unstructured:  # by |θ|, without a |θ| of the layer's size (a refresh's memory peak)
            scores, magnitude, kf, kb = theta, True, k_forward, k_backward
        else:
            scores, magnitude, kf, kb = self.scores(theta), False, k_forward // self.size, k_backward // self.size
        if every_row:
            forward, backward = topk_masks_every_row(scores.abs() if magnitude else scores, kf, kb)
        elif kf == kb:
            forward = backward = topk_mask(scores, kf, magnitude=magnitude)
        else:
            forward, backward = topk_masks(scores, kf, kb, magnitude=magnitude)
        if self.unstructured:
            return forward, backward
        expanded = self.expand(forward, theta.shape)
        return expanded, expanded if backward is forward else self.expand(backward, theta.shape)


class NM:
    """N:M groups along the input dimension (see the module docstring)."""

    def __init__(self, n: int, m: int, n_backward: int):
        self.n, self.m, self.n_backward = n, m, n_backward

    size = 1  # counts are in weights
    unstructured = False
    blocksize = None  # no blocks

    def __str__(self) -> str:
        return f"sparsity.nm=[{self.n}, {self.m}]"

    def sparse_reason(self) -> str | None:
        return f"{self}: N:M has no sparse kernel here"

    def check(self, name: str, shape: tuple, transposed: bool = False) -> None:
        out, cols = matrix_shape(shape, transposed)
        if cols % self.m:
            raise UserError(
                f"{self} does not fit layer {name}: its weight {tuple(shape)} has {cols} inputs per output "
                f"(a {out} x {cols} matrix), not a multiple of m={self.m}; keep it dense (sparsity.dense_layers)"
            )

    def counts(self, shapes: dict, density: float, backward_density: float, distribution: str):
        """n and n_backward of every group of m, in weights (uniform by construction)."""
        groups = {name: math.prod(s) // self.m for name, s in shapes.items()}
        return ({k: g * self.n for k, g in groups.items()}, {k: g * self.n_backward for k, g in groups.items()})

    def masks(self, theta: torch.Tensor, k_forward: int, k_backward: int, every_row: bool = False):
        """(A, B): the top n (A) and the top n_backward (B; n when k_backward = k_forward, after
        the lock) |θ| of every m consecutive inputs. Every row keeps weights in any case."""
        groups = theta.numel() // self.m
        n_forward, n_backward = k_forward // groups, k_backward // groups
        forward, backward = topk_masks_in_groups(theta.detach().abs(), self.m, n_forward, n_backward)
        return forward, forward if n_backward == n_forward else backward


def structure_from_config(pattern: str, block, nm, forward, backward, distribution: str):
    """The structure the `sparsity.pattern` / `block` / `nm` keys ask for, and the forward and
    backward sparsity it runs at. With `pattern=nm` the forward sparsity is 1 - n/m
    (`sparsity.forward` must say so, or be null) and B keeps the top n_B of each group: 2n
    (capped at m) when `sparsity.backward` is null, else (1 - backward)·m, which must then be
    a whole number."""
    if pattern not in PATTERNS:
        raise UserError(f"sparsity.pattern={pattern!r} is not known; allowed: {', '.join(PATTERNS)}")
    rows, cols = _two_ints("sparsity.block", block, "[rows, columns] of a block; [1, 1]: single weights")
    if pattern == "block":
        if nm is not None:
            raise UserError(f"sparsity.nm={_show(nm)} needs sparsity.pattern=nm (the pattern is block)")
        if forward is None:
            raise UserError("sparsity.forward=null needs sparsity.pattern=nm (the forward sparsity is then 1 - n/m)")
        return Blocks(rows, cols), forward, backward
    if nm is None:
        raise UserError("sparsity.pattern=nm needs sparsity.nm=[n, m], e.g. [2, 4]")
    n, m = _two_ints("sparsity.nm", nm, "n of every m consecutive inputs, n < m")
    if n >= m:
        raise UserError(f"sparsity.nm={_show(nm)}: n must be below m (n of every m inputs are kept)")
    if (rows, cols) != (1, 1):
        raise UserError(f"sparsity.block={_show(block)} and sparsity.pattern=nm: choose one structure (block [1, 1] with nm)")
    if distribution != "uniform":
        raise UserError(f"sparsity.distribution={distribution} and sparsity.pattern=nm: N:M gives every layer density n/m; use uniform")
    derived = 1.0 - n / m
    if forward is not None and (isinstance(forward, bool) or not isinstance(forward, (int, float)) or abs(forward - derived) > 1e-6):
        raise UserError(
            f"sparsity.forward={forward} conflicts with sparsity.nm={_show(nm)} (forward sparsity 1 - {n}/{m} = {derived:g}); "
            f"set sparsity.forward={derived:g} or null"
        )
    if backward is None:
        n_backward = min(m, 2 * n)
    else:
        if isinstance(backward, bool) or not isinstance(backward, (int, float)) or not 0 <= backward <= derived + 1e-9:
            raise UserError(f"sparsity.backward={backward!r} must be a number in [0, {derived:g}] with sparsity.nm={_show(nm)}")
        n_backward = round((1.0 - backward) * m)
        if abs(n_backward - (1.0 - backward) * m) > 1e-6:
            allowed = ", ".join(f"{1 - j / m:g}" for j in range(n, m + 1))
            raise UserError(
                f"sparsity.backward={backward} with sparsity.nm={_show(nm)}: B keeps a whole number of every {m} "
                f"inputs; allowed: {allowed} (or null: {min(m, 2 * n)} of {m})"
            )
    return NM(n, m, n_backward), derived, 1.0 - n_backward / m
