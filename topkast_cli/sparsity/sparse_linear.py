"""The `sparse` compute side of a Linear layer (or a 1x1 convolution, which is a Linear layer
over channels at every position, or transformers' Conv1D, a Linear layer with its weight
stored (in, out)): α held compressed, the weight gradient only on B, and the optimizer
training only B's values.

The tensor the optimizer trains is `values`: the |B| values of B, those of A first and then
those of B \\ A, each part in row-major order (the order of a CSR tensor's values and of
boolean indexing). The layer's forward is replaced by `_SparseLinear`:

- forward: y = x α^T with α in CSR (A's pattern, values[:|A|], a view);
- input gradient: through α^T in CSR (A^T's pattern, A's values permuted);
- weight gradient: `torch.sparse.sampled_addmm` on A's and on B \\ A's pattern, so it costs
  O(batch x |B|) and its entries are ∂L/∂α on B (also where α is 0).

A weight stored (in, out) keeps its own layout everywhere (masks, B's value order, the
patterns): y = x α computes with the pattern of α^T where a Linear layer uses α's and the
other way round, and its weight gradient samples x^T gy instead of gy^T x.

With r x r blocks (`sparsity.block`) α and α^T are BSR tensors instead (A's blocks; the
values gathered into block order for each product, `BlockPattern`); everything else is the
code above on the masks' single weights, which whole blocks make exact: B's values keep
their order, and the weight gradient stays `sampled_addmm` on B's weights. torch has no
`sampled_addmm` for BSR; a batched product over B's blocks (gather each block's r rows of
gy^T and r columns of x, `bmm`) measured 1.7-2.7x slower than it at 8x8 and 4x4 blocks
on this CPU (4096x4096, batch 256, 20% of blocks: copying the gathered operands costs more
than the product) and faster only from 16x16 on (0.6-0.85x). The BSR products take square
blocks only (MKL on the CPU; "non-square blocks" is its error), so other blocks and N:M stay
on the masked backend.

Convolutions with larger kernels stay on the masked backend: through im2col the CSR product
measured 2-7x slower than the dense convolution at 90-95% sparsity (`bench/results/backends.md`).

θ stays the dense parameter that is checkpointed, but between mask updates the trained values
live in `values`: `sync` writes them back into θ (only when the optimizer has changed them
since the last sync: the tensor's version counter says so), `install` gathers the new B from
θ and carries the optimizer state of entries that stay in B over (entries new to B start at
zero state; entries leaving B are frozen in θ). Code that reads `module.weight` directly gets
the dense α with gradients on B (correct, but without the saving).
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from . import powerprop
from .layer_types import stores_transposed

# torch flags its CSR and BSR support as beta on first use; the kernels used here are stable ones.
warnings.filterwarnings("ignore", message="Sparse (CSR|BSR) tensor support is in beta")


@dataclass(frozen=True)
class BlockPattern:
    """A's r x c blocks as BSR structures, built at each mask update. B's values stay in the
    order of single weights (`Pattern`'s); `perm` and `t_perm` gather A's part of them into
    the block order of α and of α^T."""

    size: tuple  # (r, c)
    crow: torch.Tensor  # A's blocks in BSR
    col: torch.Tensor
    perm: torch.Tensor  # (blocks, r, c): where in B's values each weight of α's blocks is
    t_crow: torch.Tensor  # A^T's blocks (c x r) in BSR: rows of blocks are θ's columns of blocks
    t_col: torch.Tensor
    t_perm: torch.Tensor  # (blocks, c, r): the same for α^T, each block transposed


@dataclass(frozen=True)
class Pattern:
    """The index structures of one set of masks, built at each mask update. int32 where the
    layer allows (half the bytes of int64, and MKL's sparse kernels take int32 as they are:
    with int64 torch converts the indices at every call and `sampled_addmm` runs 2x slower)."""

    shape: tuple  # (out, in)
    k: int  # |A|
    a_crow: torch.Tensor
    a_col: torch.Tensor
    at_crow: torch.Tensor  # A^T in CSR: rows are θ's columns
    at_col: torch.Tensor
    at_pos: torch.Tensor  # position in A's values of each A^T entry
    c_crow: torch.Tensor  # B \ A
    c_col: torch.Tensor
    b_crow: torch.Tensor  # B in B's value order, as A stacked on B \ A: (2 out) x in
    b_col: torch.Tensor  # A's columns then B \ A's (a_col and c_col are views of it)
    blocks: BlockPattern | None = None  # with blocks: α and α^T in BSR (then at_* are empty)

    @property
    def size(self) -> int:
        """|B|: the number of values the layer trains."""
        return self.b_col.numel()


def index_dtype(shape: tuple) -> torch.dtype:
    """int32 when every index and count of a layer of `shape` fits in it."""
    return torch.int32 if shape[0] * shape[1] < 2**31 else torch.int64


BLOCK = 1 << 20  # entries of θ per row block in the moves between θ and B's order and in the index builds


def _block_rows(shape: tuple) -> int:
    return max(1, BLOCK // max(1, shape[1]))


def _counts(counts: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """CSR row pointers from per-row counts."""
    crow = torch.zeros(counts.numel() + 1, dtype=dtype, device=counts.device)
    torch.cumsum(counts, 0, out=crow[1:])
    return crow


def build_pattern(forward: torch.Tensor, backward: torch.Tensor, blocksize: tuple = (1, 1)) -> Pattern:
    """The CSR structures of A, A^T and B \\ A, built one row block at a time: no index or
    mask temporary of the whole layer (a refresh's memory peak). With a `blocksize` other
    than (1, 1) (masks of whole blocks), A and A^T in BSR instead of A^T in CSR."""
    split = backward is not forward
    transpose = tuple(blocksize) == (1, 1)
    # A 1x1 convolution's (out, in, 1, ...) masks as the (out, in) matrix they are.
    forward, backward = forward.reshape(forward.shape[0], -1), backward.reshape(backward.shape[0], -1)
    out, inp = forward.shape
    dtype, device, step = index_dtype(forward.shape), forward.device, _block_rows(forward.shape)
    blocks = [slice(r0, min(out, r0 + step)) for r0 in range(0, out, step)]
    a_rows = torch.zeros(out, dtype=torch.int64, device=device)
    c_rows = torch.zeros(out, dtype=torch.int64, device=device)
    a_cols = torch.zeros(inp, dtype=torch.int64, device=device)
    for rows in blocks:
        a_rows[rows] = forward[rows].sum(1)
        if transpose:
            a_cols += forward[rows].sum(0)
        if split:
            c_rows[rows] = (backward[rows] & ~forward[rows]).sum(1)
    a_crow, at_crow, c_crow = _counts(a_rows, dtype), _counts(a_cols, dtype), _counts(c_rows, dtype)
    k = int(a_crow[-1])
    at_col, at_pos = (torch.empty(k if transpose else 0, dtype=dtype, device=device) for _ in range(2))
    b_col = torch.empty(k + int(c_crow[-1]), dtype=dtype, device=device)
    a_col, c_col = b_col[:k], b_col[k:]
    # A^T's row-major order is A's entries by (column, row): an entry's place in it is its
    # column's start, plus the column's entries in earlier blocks, plus its rank in this one.
    placed = at_crow[:-1].to(torch.int64)
    for rows in blocks:
        block = forward[rows]
        flat = block.reshape(-1).nonzero().squeeze(1)
        col = flat % inp
        start, end = int(a_crow[rows.start]), int(a_crow[rows.stop])
        a_col[start:end] = col
        if transpose:
            where = placed[col] + block.cumsum(0, dtype=torch.int32).reshape(-1)[flat] - 1
            at_col[where] = (flat // inp + rows.start).to(dtype)
            at_pos[where] = torch.arange(start, end, dtype=dtype, device=device)
            placed += block.sum(0)
        if split:
            extra = (backward[rows] & ~block).reshape(-1).nonzero().squeeze(1)
            c_col[int(c_crow[rows.start]) : int(c_crow[rows.stop])] = extra % inp
    b_crow = torch.cat([a_crow, c_crow[1:] + k])
    blocks = None if transpose else build_blocks(forward, a_crow, blocksize)
    return Pattern((out, inp), k, a_crow, a_col, at_crow, at_col, at_pos, c_crow, c_col, b_crow, b_col, blocks)


def build_blocks(forward: torch.Tensor, a_crow: torch.Tensor, blocksize: tuple) -> BlockPattern:
    """A's blocks in BSR (of a 2-D mask of whole r x c blocks, with its CSR row pointers)."""
    r, c = blocksize
    dtype = a_crow.dtype
    grid = forward[::r, ::c]  # a block is whole: its first weight says whether it is in A
    g = build_pattern(grid, grid)  # the grid's CSR (and its transpose's) are A's (and A^T's) BSR structures
    counts = (g.a_crow[1:] - g.a_crow[:-1]).to(torch.int64)  # blocks per row of blocks
    row = torch.repeat_interleave(torch.arange(grid.shape[0], device=grid.device), counts)
    # In B's values (single weights, row-major) the weights of row of blocks i start after
    # a_crow[i r]; each of its r rows holds counts[i] x c of them, c per block in column order.
    rank = torch.arange(row.numel(), device=grid.device) - g.a_crow.to(torch.int64)[row]
    start = (a_crow[::r][:-1].to(torch.int64)[row] + rank * c).to(dtype)
    stride = (counts[row] * c).to(dtype)
    within = torch.arange(r, dtype=dtype, device=grid.device).view(1, r, 1)
    perm = start.view(-1, 1, 1) + stride.view(-1, 1, 1) * within + torch.arange(c, dtype=dtype, device=grid.device)
    t_perm = perm.index_select(0, g.at_pos).transpose(1, 2).contiguous()
    return BlockPattern((r, c), g.a_crow, g.a_col, perm, g.at_crow, g.at_col, t_perm)


def row_blocks(p: Pattern):
    """The layer in row blocks, made one at a time: per block, its slice of flat θ and, for
    A's and for B \\ A's entries in it, their slice of B's values and their flat positions
    within the block. Values move between θ and B's order block by block, so no index or
    dense tensor of the whole layer is ever made (a refresh of a 4096x4096 layer at 90/80
    would need 200 MB of them)."""
    (out, inp), rows = p.shape, _block_rows(p.shape)
    for r0 in range(0, out, rows):
        r1 = min(out, r0 + rows)
        parts = []
        for crow, col, offset in ((p.a_crow, p.a_col, 0), (p.c_crow, p.c_col, p.k)):
            start, end = int(crow[r0]), int(crow[r1])
            counts = (crow[r0 + 1 : r1 + 1] - crow[r0:r1]).to(torch.int64)
            local = torch.repeat_interleave(torch.arange(r1 - r0, device=col.device), counts) * inp + col[start:end]
            parts.append((slice(offset + start, offset + end), local))
        yield slice(r0 * inp, r1 * inp), parts


def scatter_values(blocks, flat: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Write B's `values` into `flat` (θ's shape, flattened) at their positions."""
    for rows, parts in blocks:
        block = flat[rows]
        for where, local in parts:
            block.index_copy_(0, local, values[where])
    return flat


def gather_values(blocks, flat: torch.Tensor, size: int) -> torch.Tensor:
    """B's values read from `flat` (θ's shape, flattened), in B's order."""
    values = flat.new_empty(size)
    for rows, parts in blocks:
        block = flat[rows]
        for where, local in parts:
            torch.index_select(block, 0, local, out=values[where])
    return values


def carry_over(state: torch.Tensor, old_blocks, new_blocks, size: int) -> torch.Tensor:
    """Per-entry state in the old B's order -> the new B's order: entries in both keep theirs,
    entries new to B get zero (one row block of θ's size at a time)."""
    moved = state.new_empty(size)
    buffer = None
    for (rows, old_parts), (_, new_parts) in zip(old_blocks, new_blocks):
        if buffer is None:
            buffer = state.new_empty(rows.stop - rows.start)
        dense = buffer[: rows.stop - rows.start].zero_()
        for where, local in old_parts:
            dense.index_copy_(0, local, state[where])
        for where, local in new_parts:
            torch.index_select(dense, 0, local, out=moved[where])
    return moved


def _csr(crow, col, values, shape) -> torch.Tensor:
    return torch.sparse_csr_tensor(crow, col, values, shape, check_invariants=False)


def _alpha(p: Pattern, values: torch.Tensor) -> torch.Tensor:
    """α: A's values in CSR, or gathered into A's blocks in BSR."""
    if p.blocks is None:
        return _csr(p.a_crow, p.a_col, values[: p.k], p.shape)
    b = p.blocks
    blocks = values.index_select(0, b.perm.view(-1)).view(-1, *b.size)
    return torch.sparse_bsr_tensor(b.crow, b.col, blocks, p.shape, check_invariants=False)


def _alpha_t(p: Pattern, values: torch.Tensor) -> torch.Tensor:
    """α^T, built as its own CSR or BSR tensor (torch multiplies by neither format's transpose
    view on the CPU)."""
    if p.blocks is None:
        return _csr(p.at_crow, p.at_col, values[: p.k].index_select(0, p.at_pos), p.shape[::-1])
    b = p.blocks
    blocks = values.index_select(0, b.t_perm.view(-1)).view(-1, *b.size[::-1])
    return torch.sparse_bsr_tensor(b.t_crow, b.t_col, blocks, p.shape[::-1], check_invariants=False)


def _weight_gradient(p: Pattern, gy_t: torch.Tensor, x_t: torch.Tensor) -> torch.Tensor:
    """∂L/∂α on B, in B's value order: (gy^T x) sampled at A's entries and then at B \\ A's,
    in one kernel call on the stacked pattern (rows of A, then rows of B \\ A, against gy^T
    stacked twice), O(batch x |B|). Both operands come feature-major (`gy_t` out x batch,
    `x_t` in x batch, contiguous): the kernel reads a row of each per entry, faster than
    from x itself and 2x faster than from a transposed view of gy. The values passed in
    must be zeros: on the CPU beta=0 still multiplies them (0 * NaN from `empty` is NaN)."""
    rows = gy_t if p.c_col.numel() == 0 else torch.cat([gy_t, gy_t])
    shape = (rows.shape[0], p.shape[1])
    crow = p.a_crow if p.c_col.numel() == 0 else p.b_crow
    sampled = _csr(crow, p.b_col, x_t.new_zeros(p.b_col.numel()), shape)
    return torch.sparse.sampled_addmm(sampled, rows, x_t.t(), beta=0.0, out=sampled).values()


class _SparseLinear(torch.autograd.Function):
    """y = x α^T for a 2-D x (y = x α when `transposed`: α stored (in, out)); gradients for x
    and for B's values.

    The CSR kernels want the dense operand feature-major (features x batch, contiguous) and
    give their result that way: y is returned as a transposed view of it, so the next sparse
    layer (after bias and activation, which keep the layout) gets its operand without a copy,
    and so does the backward pass."""

    @staticmethod
    def forward(ctx, x, values, p: Pattern, transposed: bool = False):
        alpha = _alpha_t(p, values) if transposed else _alpha(p, values)  # out x in either way
        x_t = x.t().contiguous()  # free when x is itself a transposed view
        ctx.save_for_backward(x_t, values)
        ctx.pattern = p  # a refresh builds a new Pattern: this step's stays valid
        ctx.transposed = transposed
        return torch.sparse.mm(alpha, x_t).t()

    @staticmethod
    def backward(ctx, gy):
        x_t, values = ctx.saved_tensors
        p = ctx.pattern
        grad_x = grad_values = None
        gy_t = gy.t().contiguous()
        if ctx.needs_input_grad[0]:
            alpha_t = _alpha(p, values) if ctx.transposed else _alpha_t(p, values)  # in x out
            grad_x = torch.sparse.mm(alpha_t, gy_t).t()
        if ctx.needs_input_grad[1]:
            # ∂L/∂α in the stored layout: gy^T x for (out, in), x^T gy for (in, out)
            grad_values = _weight_gradient(p, x_t, gy_t) if ctx.transposed else _weight_gradient(p, gy_t, x_t)
        return grad_x, grad_values, None, None


class _DenseAlpha(torch.autograd.Function):
    """α as a dense tensor from B's values (for code that reads `module.weight`); gradient
    ∂L/∂α gathered on B."""

    @staticmethod
    def forward(ctx, values, forward_mask, backward_mask, k):
        ctx.masks, ctx.k = (forward_mask, backward_mask), k
        alpha = values.new_zeros(forward_mask.shape)
        return alpha.masked_scatter_(forward_mask, values[:k])

    @staticmethod
    def backward(ctx, grad):
        forward_mask, backward_mask = ctx.masks
        if backward_mask is forward_mask:
            return grad[forward_mask], None, None, None
        return torch.cat([grad[forward_mask], grad[backward_mask & ~forward_mask]]), None, None, None


def _forward(module: nn.Module, side: "SparseLinearWeight", x: torch.Tensor) -> torch.Tensor:
    """The layer's forward on the sparse backend (fp32 kernels: no autocast inside)."""
    linear = isinstance(module, nn.Linear) or side.transposed
    if side.use_dense:
        side.sync(module.parametrizations.weight.original)  # module.weight: w of the dense θ
        if linear:
            return F.linear(x, module.weight.t() if side.transposed else module.weight, module.bias)
        return module._conv_forward(x, module.weight, module.bias)
    with torch.autocast(x.device.type, enabled=False):
        if linear:
            rows = x.reshape(-1, x.shape[-1]).to(side.values.dtype)
            y = _SparseLinear.apply(rows, side.weights(), side.pattern, side.transposed).reshape(*x.shape[:-1], -1)
            return y if module.bias is None else y + module.bias
        return _pointwise_conv(module, side, x)


def _pointwise_conv(module: nn.Module, side: "SparseLinearWeight", x: torch.Tensor) -> torch.Tensor:
    """A 1x1 convolution as the Linear map over channels: the positions (batch x space) are
    the rows, laid out channel-major, which is what the CSR kernels want; the output is a
    view of its channel-major result in the input's dimension order."""
    batched = x.dim() == module.weight.dim()
    if not batched:
        x = x.unsqueeze(0)
    x = x[(slice(None), slice(None), *(slice(None, None, s) for s in module.stride))]
    n, channels, *space = x.shape
    rows = x.transpose(0, 1).reshape(channels, -1).t().to(side.values.dtype)
    y = _SparseLinear.apply(rows, side.weights(), side.pattern)
    if module.bias is not None:
        y = y + module.bias
    y = y.t().reshape(-1, n, *space).transpose(0, 1)
    return y if batched else y.squeeze(0)


class SparseLinearWeight(nn.Module):
    """The sparse compute side (see the module docstring). Holds the layer's bool masks, as
    the masked side does, plus B's values and the CSR (and with blocks BSR) patterns built
    from the masks; `blocksize` (r, r) for masks of whole blocks; `transposed`: θ is stored
    (in, out). With `power` p (Powerpropagation) the values trained are θ's and α's are
    θ·|θ|^(p−1) of them."""

    backend = "sparse"

    def __init__(self, theta: torch.Tensor, blocksize: tuple = (1, 1), transposed: bool = False):
        super().__init__()
        self.blocksize = tuple(blocksize)
        self.transposed = transposed
        empty = torch.zeros(theta.shape, dtype=torch.bool, device=theta.device)
        self.forward_mask = empty  # A
        self.backward_mask = empty  # B ⊇ A; the same tensor when B = A
        self.use_dense = False
        self.power = 1.0  # Powerpropagation's p (1: off)
        # Not registered: it is no parameter of the model (the state_dict holds θ alone).
        object.__setattr__(self, "values", nn.Parameter(theta.new_zeros(0)))
        self.pattern = build_pattern(empty, empty)
        self._synced = self.values._version

    def forward(self, theta: torch.Tensor) -> torch.Tensor:
        if self.use_dense:
            return powerprop.weight(theta, self.power)
        return _DenseAlpha.apply(self.weights(), self.forward_mask, self.backward_mask, self.pattern.k)

    def weights(self) -> torch.Tensor:
        """B's values as the layer computes with them (differentiable in `values`): the values
        themselves, or w = θ·|θ|^(p−1) of them under Powerpropagation."""
        return powerprop.weight(self.values, self.power)

    def trained(self, theta: nn.Parameter) -> nn.Parameter:
        """The tensor the optimizer trains for this layer: B's values."""
        return self.values

    @torch.no_grad()
    def sync(self, theta: torch.Tensor) -> None:
        """Write B's values back into θ if the optimizer changed them since the last sync."""
        if self.values._version != self._synced and self.values.numel():
            scatter_values(row_blocks(self.pattern), theta.view(-1), self.values.detach())
        self._synced = self.values._version

    def reload(self, theta) -> None:
        """θ was written from outside (a checkpoint): it wins over the values held; `install`
        gathers them from θ again."""
        self._synced = self.values._version

    @torch.no_grad()
    def install(self, theta, forward, backward, optimizer) -> None:
        """New masks: θ gets the trained values, the new B is gathered from θ, the optimizer
        state of entries staying in B moves with them and entries new to B start at zero."""
        self.sync(theta)
        self.values.grad = None  # this step's gradient is spent, and has the old size
        self.forward_mask = self.backward_mask = None  # the old masks may go before the new index is built
        pattern = build_pattern(forward, backward, self.blocksize)
        state = optimizer.state.get(self.values) if optimizer is not None else None
        if state:
            for key in list(state):  # one at a time: each old tensor goes before the next is made
                if torch.is_tensor(state[key]) and state[key].shape == self.values.shape and state[key].dim():
                    state[key] = carry_over(state[key], row_blocks(self.pattern), row_blocks(pattern), pattern.size)
        self.values.data = gather_values(row_blocks(pattern), theta.detach().reshape(-1), pattern.size)
        self.forward_mask, self.backward_mask = forward, backward
        self.pattern = pattern
        self._synced = self.values._version

    @torch.no_grad()
    def regularize(self, theta, a: float, b: float) -> None:
        """Add a·θ on A and b·θ on B to the values' gradient (A's values come first)."""
        grad, values = self.values.grad, self.values.detach()
        if grad is None:
            return
        if a:
            grad[: self.pattern.k].add_(values[: self.pattern.k], alpha=a)
        if b:
            grad.add_(values, alpha=b)

    @torch.no_grad()
    def decay(self, theta, a: float, b: float) -> None:
        """values -= a·values on A and b·values on B (A's values come first); only B is held."""
        values = self.values.detach()  # (shares the version counter: θ syncs from it later)
        k = self.pattern.k
        values[:k].mul_(1.0 - a - b)
        values[k:].mul_(1.0 - b)

    def to_dense(self, state: torch.Tensor) -> torch.Tensor:
        """A per-entry tensor of the values (optimizer state) in θ's shape, zero outside B."""
        dense = state.new_zeros(self.forward_mask.shape)
        scatter_values(row_blocks(self.pattern), dense.view(-1), state)
        return dense

    def from_dense(self, state: torch.Tensor) -> torch.Tensor:
        flat = state.to(self.values.device).reshape(-1)
        return gather_values(row_blocks(self.pattern), flat, self.pattern.size)

    def pass_dense_gradient(self, dense: bool) -> None:
        if dense:
            raise ValueError("the sparse backend computes the weight gradient on B only; use sparsity.backend=masked")

    def held(self) -> dict[str, list[torch.Tensor]]:
        """The tensors this compute side holds, by kind (for memory accounting; the values are
        counted with the optimizer's parameters)."""
        p = self.pattern
        index = [p.a_crow, p.a_col, p.at_crow, p.at_col, p.at_pos, p.c_crow, p.c_col]
        if p.blocks is not None:
            b = p.blocks
            index += [b.crow, b.col, b.perm, b.t_crow, b.t_col, b.t_perm]
        return {"masks": [self.forward_mask, self.backward_mask], "index": index}

    def detach(self, module: nn.Module) -> None:
        """Leave `module` with θ (up to date) as its plain, trainable weight."""
        theta = module.parametrizations.weight.original
        self.sync(theta)
        del module.forward
        parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)
        theta.requires_grad_(True)


CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def can_run(module: nn.Module) -> bool:
    """Linear layers (transformers' Conv1D too), and 1x1 convolutions without padding or
    groups (any stride)."""
    if isinstance(module, nn.Linear) or stores_transposed(module):
        return True
    if not isinstance(module, CONV_TYPES) or module.groups != 1 or module.padding_mode != "zeros":
        return False
    padding = module.padding if isinstance(module.padding, tuple) else ()
    no_padding = module.padding in ("valid", "same") or all(p == 0 for p in padding)
    return no_padding and all(k == 1 for k in module.kernel_size)


def attach_sparse(module: nn.Module, blocksize: tuple = (1, 1)) -> SparseLinearWeight:
    """Parametrize `module.weight` (reads give α) and replace its forward by the CSR (or, with
    `blocksize` r x r, the BSR) kernel. θ stays the Parameter object it was, no longer trained
    directly."""
    theta = module.weight
    side = SparseLinearWeight(theta.detach(), blocksize, stores_transposed(module))
    parametrize.register_parametrization(module, "weight", side, unsafe=True)
    module.forward = functools.partial(_forward, module, side)
    theta.requires_grad_(False)
    return side
