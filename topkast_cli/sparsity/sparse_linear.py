"""The `sparse` compute side of a Linear layer: α held compressed, the weight gradient only on
B, and the optimizer training only B's values.

The tensor the optimizer trains is `values`: the |B| values of B, those of A first and then
those of B \\ A, each part in row-major order (the order of a CSR tensor's values and of
boolean indexing). The layer's forward is replaced by `_SparseLinear`:

- forward: y = x α^T with α in CSR (A's pattern, values[:|A|], a view);
- input gradient: through α^T in CSR (A^T's pattern, A's values permuted);
- weight gradient: `torch.sparse.sampled_addmm` on A's and on B \\ A's pattern, so it costs
  O(batch x |B|) and its entries are ∂L/∂α on B (also where α is 0).

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

# torch flags its CSR support as beta on first use; the kernels used here are stable ones.
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")


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


def index_dtype(shape: tuple) -> torch.dtype:
    """int32 when every index and count of a layer of `shape` fits in it."""
    return torch.int32 if shape[0] * shape[1] < 2**31 else torch.int64


def _csr_index(mask: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(crow, col, row) of a 2-D bool mask's True entries in row-major order."""
    rows, cols = mask.shape
    flat = mask.reshape(-1).nonzero().squeeze(1)
    row = flat // cols
    # Row counts from the row indices: `mask.sum(1)` would cast the whole mask to int64.
    crow = torch.zeros(rows + 1, dtype=dtype, device=mask.device)
    torch.cumsum(torch.bincount(row, minlength=rows), 0, out=crow[1:])
    return crow, (flat % cols).to(dtype), row.to(dtype)


def build_pattern(forward: torch.Tensor, backward: torch.Tensor) -> Pattern:
    out, inp = forward.shape
    dtype = index_dtype(forward.shape)
    a_crow, a_col, a_row = _csr_index(forward, dtype)
    # A^T's row-major order is A's entries sorted by (column, row): the keys are unique.
    at_pos = torch.argsort(a_col.to(torch.int64) * out + a_row).to(dtype)
    at_col = a_row[at_pos]
    del a_row
    at_crow = torch.zeros(inp + 1, dtype=dtype, device=forward.device)
    torch.cumsum(torch.bincount(a_col, minlength=inp), 0, out=at_crow[1:])
    if backward is forward:
        c_crow, c_col = torch.zeros(out + 1, dtype=dtype, device=forward.device), a_col[:0]
    else:
        c_crow, c_col, _ = _csr_index(backward & ~forward, dtype)
    return Pattern((out, inp), int(a_col.numel()), a_crow, a_col, at_crow, at_col, at_pos, c_crow, c_col)


def positions(p: Pattern) -> torch.Tensor:
    """Flat positions in θ of B's values, in their order (A's, then B \\ A's): int64, built
    when needed (a refresh, a sync) rather than held."""

    def flat(crow, col):
        counts = (crow[1:] - crow[:-1]).to(torch.int64)
        rows = torch.repeat_interleave(torch.arange(p.shape[0], device=col.device), counts)
        return rows * p.shape[1] + col

    return torch.cat([flat(p.a_crow, p.a_col), flat(p.c_crow, p.c_col)])


def _csr(crow, col, values, shape) -> torch.Tensor:
    return torch.sparse_csr_tensor(crow, col, values, shape, check_invariants=False)


def _sampled(crow, col, gy_t, x, shape) -> torch.Tensor:
    """(gy^T x) at the pattern's entries, in its order: O(batch x entries). `gy_t` is
    contiguous (a transposed view makes the kernel 2x slower). The input's values must be
    zeros: on the CPU beta=0 still multiplies them (0 * NaN from `empty` is NaN)."""
    empty = _csr(crow, col, x.new_zeros(col.numel()), shape)
    return torch.sparse.sampled_addmm(empty, gy_t, x, beta=0.0).values()


class _SparseLinear(torch.autograd.Function):
    """y = x α^T for a 2-D x; gradients for x and for B's values."""

    @staticmethod
    def forward(ctx, x, values, p: Pattern):
        alpha = _csr(p.a_crow, p.a_col, values[: p.k], p.shape)
        ctx.save_for_backward(x, values)
        ctx.pattern = p  # a refresh builds a new Pattern: this step's stays valid
        return torch.sparse.mm(alpha, x.t()).t()

    @staticmethod
    def backward(ctx, gy):
        x, values = ctx.saved_tensors
        p = ctx.pattern
        grad_x = grad_values = None
        if ctx.needs_input_grad[0]:
            alpha_t = _csr(p.at_crow, p.at_col, values[: p.k].index_select(0, p.at_pos), p.shape[::-1])
            grad_x = torch.sparse.mm(alpha_t, gy.t()).t()
        if ctx.needs_input_grad[1]:
            gy_t = gy.t().contiguous()
            parts = [_sampled(p.a_crow, p.a_col, gy_t, x, p.shape)]
            if p.c_col.numel():
                parts.append(_sampled(p.c_crow, p.c_col, gy_t, x, p.shape))
            grad_values = torch.cat(parts)
        return grad_x, grad_values, None


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


def _forward(module: nn.Linear, side: "SparseLinearWeight", x: torch.Tensor) -> torch.Tensor:
    """The Linear layer's forward on the sparse backend (fp32 kernels: no autocast inside)."""
    if side.use_dense:
        side.sync(module.parametrizations.weight.original)
        return F.linear(x, module.weight, module.bias)
    with torch.autocast(x.device.type, enabled=False):
        rows = x.reshape(-1, x.shape[-1]).to(side.values.dtype)
        y = _SparseLinear.apply(rows, side.values, side.pattern).reshape(*x.shape[:-1], -1)
        return y if module.bias is None else y + module.bias


class SparseLinearWeight(nn.Module):
    """The sparse compute side (see the module docstring). Holds the layer's bool masks, as
    the masked side does, plus B's values and the CSR patterns built from the masks."""

    backend = "sparse"

    def __init__(self, theta: torch.Tensor):
        super().__init__()
        empty = torch.zeros(theta.shape, dtype=torch.bool, device=theta.device)
        self.forward_mask = empty  # A
        self.backward_mask = empty  # B ⊇ A; the same tensor when B = A
        self.use_dense = False
        # Not registered: it is no parameter of the model (the state_dict holds θ alone).
        object.__setattr__(self, "values", nn.Parameter(theta.new_zeros(0)))
        self.pattern = build_pattern(empty, empty)
        self._synced = self.values._version

    def forward(self, theta: torch.Tensor) -> torch.Tensor:
        if self.use_dense:
            return theta
        return _DenseAlpha.apply(self.values, self.forward_mask, self.backward_mask, self.pattern.k)

    def trained(self, theta: nn.Parameter) -> nn.Parameter:
        """The tensor the optimizer trains for this layer: B's values."""
        return self.values

    def _scatter(self, into: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """`into` (θ's shape) with B's entries set to `values`; index ops: masked_scatter_ is
        serial on the CPU."""
        into.view(-1).index_copy_(0, positions(self.pattern), values)
        return into

    @torch.no_grad()
    def sync(self, theta: torch.Tensor) -> None:
        """Write B's values back into θ if the optimizer changed them since the last sync."""
        if self.values._version != self._synced and self.values.numel():
            self._scatter(theta, self.values.detach())
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
        pattern = build_pattern(forward, backward)
        where = positions(pattern)
        state = optimizer.state.get(self.values) if optimizer is not None else None
        if state:
            for key, value in list(state.items()):
                if torch.is_tensor(value) and value.shape == self.values.shape and value.dim():
                    dense = self.to_dense(value)
                    state[key] = None  # let the old one go before the new one is made
                    state[key] = dense.view(-1).index_select(0, where)
                    del dense
        self.values.grad = None  # this step's gradient is spent, and has the old size
        self.values.data = theta.detach().reshape(-1).index_select(0, where)
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
        return self._scatter(state.new_zeros(self.forward_mask.shape), state)

    def from_dense(self, state: torch.Tensor) -> torch.Tensor:
        return state.to(self.values.device).reshape(-1).index_select(0, positions(self.pattern))

    def pass_dense_gradient(self, dense: bool) -> None:
        if dense:
            raise ValueError("the sparse backend computes the weight gradient on B only; use sparsity.backend=masked")

    def held(self) -> dict[str, list[torch.Tensor]]:
        """The tensors this compute side holds, by kind (for memory accounting; the values are
        counted with the optimizer's parameters)."""
        p = self.pattern
        index = [p.a_crow, p.a_col, p.at_crow, p.at_col, p.at_pos, p.c_crow, p.c_col]
        return {"masks": [self.forward_mask, self.backward_mask], "index": index}

    def detach(self, module: nn.Module) -> None:
        """Leave `module` with θ (up to date) as its plain, trainable weight."""
        theta = module.parametrizations.weight.original
        self.sync(theta)
        del module.forward
        parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)
        theta.requires_grad_(True)


def can_run(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear)


def attach_sparse(module: nn.Linear) -> SparseLinearWeight:
    """Parametrize `module.weight` (reads give α) and replace its forward by the CSR kernel.
    θ stays the Parameter object it was, no longer trained directly."""
    theta = module.weight
    side = SparseLinearWeight(theta.detach())
    parametrize.register_parametrization(module, "weight", side, unsafe=True)
    module.forward = functools.partial(_forward, module, side)
    theta.requires_grad_(False)
    return side
