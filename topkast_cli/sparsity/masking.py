"""The compute side of a sparse layer: how its dense θ and its two masks become the weight it
computes with.

Every sparse layer (Linear, Conv, Embedding, transformers' Conv1D: see `layer_types`) gets a
`MaskedWeight` parametrization on its `weight`, so any code that reads `module.weight` (its
own forward, attention blocks that read `out_proj.weight`, tied embeddings) sees
α = θ ⊙ 1_A, while θ stays the stored parameter.

The masks are stored here, once, as bool tensors (one byte per weight; B = A is one shared
tensor). Between steps the training pass also keeps α's buffer and the regulariser's factor,
float tensors of θ's shape derived from them, so a step makes no layer-sized tensor of its
own (see `MaskedWeight.__init__`). Only their owner, `base.SparseLayer`, reads or changes them: everything else asks
the layer. This is the `masked` backend; `sparse_linear.SparseLinearWeight` is the `sparse`
one. Both are compute sides with the same interface (`backend`, `trained`, `install`, `sync`,
`reload`, `regularize`, `decay`, `to_dense` / `from_dense`, `pass_dense_gradient`, `detach`), so the
owner swaps them per layer without the methods or the trainer knowing.
"""

from __future__ import annotations

import re
import weakref

import torch
from torch import nn
from torch.nn.utils import parametrize

from . import powerprop


class _MaskedWeight(torch.autograd.Function):
    """Forward: θ where A, else 0. Backward: g where B, else 0 (B None: g everywhere).

    The gradient on B \\ A is ∂L/∂α there (not 0, which plain `θ * mask` would give), and
    entries outside B get exactly zero gradient.
    """

    @staticmethod
    def forward(ctx, theta, forward_mask, backward_mask, out=None):
        ctx.save_for_backward(backward_mask)
        if out is None:
            return torch.where(forward_mask, theta, 0)
        # α written into the owner's buffer; handed out as its own tensor so that the owner
        # can tell, by a weak reference, when nothing holds it any more.
        return torch.where(forward_mask, theta, theta.new_zeros(()), out=out).detach()

    @staticmethod
    def backward(ctx, grad):
        (backward_mask,) = ctx.saved_tensors
        if backward_mask is None:
            return grad, None, None, None
        # Never in place: an op that reads α with another tensor (α + W, a custom model's
        # sum) hands both the same gradient tensor, whose other reader must see it whole.
        return torch.where(backward_mask, grad, 0), None, None, None


def masked_weight(theta: torch.Tensor, forward_mask: torch.Tensor, backward_mask: torch.Tensor | None,
                  out: torch.Tensor | None = None):
    """α = θ ⊙ 1_A with gradient g ⊙ 1_B (bool masks; backward_mask None: the dense gradient),
    written into `out` when given (a buffer of θ's shape that nothing else holds)."""
    return _MaskedWeight.apply(theta, forward_mask, backward_mask, out)


def zero_optimizer_state(optimizer: torch.optim.Optimizer | None, param: torch.Tensor, where: torch.Tensor) -> None:
    """Zero every per-entry optimizer state (momentum, Adam moments, ...) at `where`, so
    that a zero gradient leaves those entries exactly unchanged at the next steps."""
    if optimizer is None or not bool(where.any()):
        return
    for value in optimizer.state.get(param, {}).values():
        if torch.is_tensor(value) and value.shape == param.shape:
            value.masked_fill_(where, 0)


class MaskedWeight(nn.Module):
    """Parametrization θ -> α, holding the layer's masks (bool, not state_dict buffers: the
    checkpoint stores masks apart from the model). Read and written by `SparseLayer` only.
    The optimizer trains θ itself; its gradient is dense, zero outside B. With `power` p
    (Powerpropagation) the layer computes with w = θ·|θ|^(p−1) in place of θ."""

    backend = "masked"

    def __init__(self, theta: torch.Tensor):
        super().__init__()
        empty = torch.zeros(theta.shape, dtype=torch.bool, device=theta.device)
        self.forward_mask = empty  # A
        self.backward_mask = empty  # B ⊇ A; the same tensor when B = A
        self.dense_gradient = False  # let every entry's gradient through (RigL's capture)
        self.use_dense = False  # compute with the dense θ (eval.dense=true)
        self.power = 1.0  # Powerpropagation's p (1: off)
        # Reused between steps, so a training step makes no layer-sized tensor here: α's
        # buffer (with a weak reference to the α last handed out: the buffer is written again
        # only once that is gone), and the regulariser's per-entry factor, which depends on
        # the masks alone (dropped when they change).
        self._alpha: torch.Tensor | None = None
        self._alpha_out: weakref.ref | None = None
        self._factor: torch.Tensor | None = None
        self._factor_key = None

    def forward(self, theta: torch.Tensor) -> torch.Tensor:
        # The power before the mask: B \ A then gets ∂L/∂w·p|θ|^(p−1), where after it (0's
        # derivative) it would get nothing.
        w = powerprop.weight(theta, self.power)
        if self.use_dense:
            return w
        backward = None if self.dense_gradient else self.backward_mask
        out = self._alpha_buffer(w)
        alpha = masked_weight(w, self.forward_mask, backward, out)
        if out is not None:
            self._alpha_out = weakref.ref(alpha)
        return alpha

    def _alpha_buffer(self, w: torch.Tensor) -> torch.Tensor | None:
        """The buffer for α in a training forward pass, or None (a fresh α): without gradient
        (evaluation, inspection) α is never a buffer that a later step overwrites; a layer read
        twice in one pass (tied weights) gets a fresh α while the first is alive; θ in another
        memory format (channels-last convolutions) keeps the plain path. `w`: θ, or its power."""
        if not (torch.is_grad_enabled() and w.requires_grad and w.is_contiguous()):
            return None
        if self._alpha_out is not None and self._alpha_out() is not None:
            return None
        buffer = self._alpha
        if buffer is None or buffer.shape != w.shape or buffer.dtype != w.dtype or buffer.device != w.device:
            self._alpha = buffer = torch.empty_like(w, memory_format=torch.contiguous_format)
        return buffer

    # The compute-side interface (see the module docstring); θ is the layer's parameter.
    def trained(self, theta: nn.Parameter) -> nn.Parameter:
        """The tensor the optimizer trains for this layer: θ."""
        return theta

    def install(self, theta, forward, backward, optimizer) -> None:
        """New masks; entries leaving B lose their optimizer state, so they freeze."""
        zero_optimizer_state(optimizer, theta, self.backward_mask & ~backward)
        self.forward_mask, self.backward_mask = forward, backward
        self._factor = self._factor_key = None  # made from the old masks

    def sync(self, theta) -> None:
        """θ is always current here."""

    def reload(self, theta) -> None:
        """θ was written from outside: nothing is held apart from it (the cached factor
        depends on the masks alone; it is dropped anyway, as the masks come next)."""
        self._factor = self._factor_key = None

    def _per_entry(self, theta, on_a: float, on_b: float, outside: float) -> torch.Tensor:
        """A float tensor of θ's shape: on_a on A, on_b on B \\ A, outside elsewhere. Built from
        the bool masks in place (multiplying by a bool tensor would first copy it to float), and
        kept until the masks or the values change (a constant λ: once per refresh)."""
        key = (on_a, on_b, outside, theta.dtype, theta.device)
        if self._factor_key != key:
            self._factor = None  # not two at once
            values = torch.where(self.backward_mask, on_b, outside).to(theta.dtype)
            self._factor, self._factor_key = values.masked_fill_(self.forward_mask, on_a), key
        return self._factor

    @torch.no_grad()
    def regularize(self, theta, a: float, b: float) -> None:
        """Add a·θ on A and b·θ on B to θ's gradient (a+b on A, b on B \\ A)."""
        if theta.grad is None or not (a or b):
            return
        theta.grad.addcmul_(theta, self._per_entry(theta, a + b, b, 0.0))

    @torch.no_grad()
    def decay(self, theta, a: float, b: float) -> None:
        """θ -= a·θ on A and b·θ on B (one step of the decoupled regulariser), as the factors
        1-a-b and 1-b the sparse backend multiplies its values by; outside B the factor is
        exactly 1, so frozen entries keep their value bit for bit."""
        if a or b:
            theta.mul_(self._per_entry(theta, 1.0 - a - b, 1.0 - b, 1.0))

    def to_dense(self, state: torch.Tensor) -> torch.Tensor:
        """A per-entry tensor of the trained tensor (optimizer state) in θ's shape: as it is."""
        return state

    def from_dense(self, state: torch.Tensor) -> torch.Tensor:
        return state

    def pass_dense_gradient(self, dense: bool) -> None:
        self.dense_gradient = bool(dense)

    def held(self) -> dict[str, list[torch.Tensor]]:
        """The tensors this compute side holds, by kind (for memory accounting)."""
        cached = [t for t in (self._alpha, self._factor) if t is not None]
        return {"masks": [self.forward_mask, self.backward_mask], "cache": cached}

    def detach(self, module: nn.Module) -> None:
        """Leave `module` with θ as its plain weight."""
        parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)


def attach(module: nn.Module) -> MaskedWeight:
    """Parametrize `module.weight`; the Parameter object θ itself is kept (optimizers
    built before or after see the same tensor)."""
    param = MaskedWeight(module.weight.detach())
    parametrize.register_parametrization(module, "weight", param, unsafe=True)
    return param


def dense_parameter(module: nn.Module) -> nn.Parameter:
    """θ of a layer, parametrized or not."""
    if parametrize.is_parametrized(module, "weight"):
        return module.parametrizations.weight.original
    return module.weight


_PARAMETRIZED_KEY = re.compile(r"parametrizations\.(\w+)\.original$")


def plain_name(name: str) -> str:
    """`conv.parametrizations.weight.original` -> `conv.weight`."""
    return _PARAMETRIZED_KEY.sub(r"\1", name)


def plain_state_dict(model: nn.Module) -> dict:
    """state_dict with the names of the dense model (θ under `layer.weight`). It loads into a
    plain torchvision/PyTorch model, but that model then computes with θ, not α: for the
    network a run trains use `computed_state_dict`. θ is the trained parameter, what a
    checkpoint must hold to resume exactly: under Powerpropagation the layer's weight is
    θ·|θ|^(p−1), whose inverse does not round-trip bit for bit."""
    return {plain_name(k): v for k, v in model.state_dict().items()}


@torch.no_grad()
def computed_state_dict(model: nn.Module) -> dict:
    """`plain_state_dict` with each parametrized weight replaced by what the layer computes
    with (α, zeros in place; under Powerpropagation w = θ·|θ|^(p−1) on A): the trained
    network, for a plain model."""
    state = plain_state_dict(model)
    for name, module in model.named_modules():
        if parametrize.is_parametrized(module, "weight"):
            state[f"{name}.weight" if name else "weight"] = module.weight.detach().clone()
    return state


def load_plain_state_dict(model: nn.Module, state: dict, strict: bool = True):
    """Inverse of `plain_state_dict` for a model that may carry parametrizations."""
    names = {plain_name(k): k for k in model.state_dict()}
    renamed = {names.get(k, k): v for k, v in state.items()}
    return model.load_state_dict(renamed, strict=strict)
