"""The compute side of a sparse layer: how its dense θ and its two masks become the weight it
computes with.

Every sparse layer (Linear, Conv, Embedding) gets a `MaskedWeight` parametrization on its
`weight`, so any code that reads `module.weight` (its own forward, attention blocks that read
`out_proj.weight`, tied embeddings) sees α = θ ⊙ 1_A, while θ stays the stored parameter.

The masks are stored here, once, as bool tensors (one byte per weight; B = A is one shared
tensor). Only their owner, `base.SparseLayer`, reads or changes them: everything else asks
the layer. A sparse-kernel backend would replace this module per layer type without touching
the methods or the trainer.
"""

from __future__ import annotations

import re

import torch
from torch import nn
from torch.nn.utils import parametrize


class _MaskedWeight(torch.autograd.Function):
    """Forward: θ where A, else 0. Backward: g where B, else 0 (B None: g everywhere).

    The gradient on B \\ A is ∂L/∂α there (not 0, which plain `θ * mask` would give), and
    entries outside B get exactly zero gradient.
    """

    @staticmethod
    def forward(ctx, theta, forward_mask, backward_mask):
        ctx.save_for_backward(backward_mask)
        return torch.where(forward_mask, theta, 0)

    @staticmethod
    def backward(ctx, grad):
        (backward_mask,) = ctx.saved_tensors
        if backward_mask is None:
            return grad, None, None
        return torch.where(backward_mask, grad, 0), None, None


def masked_weight(theta: torch.Tensor, forward_mask: torch.Tensor, backward_mask: torch.Tensor | None):
    """α = θ ⊙ 1_A with gradient g ⊙ 1_B (bool masks; backward_mask None: the dense gradient)."""
    return _MaskedWeight.apply(theta, forward_mask, backward_mask)


class MaskedWeight(nn.Module):
    """Parametrization θ -> α, holding the layer's masks (bool, not state_dict buffers: the
    checkpoint stores masks apart from the model). Read and written by `SparseLayer` only."""

    def __init__(self, theta: torch.Tensor):
        super().__init__()
        empty = torch.zeros(theta.shape, dtype=torch.bool, device=theta.device)
        self.forward_mask = empty  # A
        self.backward_mask = empty  # B ⊇ A; the same tensor when B = A
        self.dense_gradient = False  # let every entry's gradient through (RigL's capture)
        self.use_dense = False  # compute with the dense θ (eval.dense=true)

    def forward(self, theta: torch.Tensor) -> torch.Tensor:
        if self.use_dense:
            return theta
        return masked_weight(theta, self.forward_mask, None if self.dense_gradient else self.backward_mask)


SPARSE_LAYER_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
EMBEDDING_TYPES = (nn.Embedding,)


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
    """state_dict with the names of the dense model (θ under `layer.weight`), so a checkpoint
    loads into a plain torchvision/PyTorch model too."""
    return {plain_name(k): v for k, v in model.state_dict().items()}


def load_plain_state_dict(model: nn.Module, state: dict, strict: bool = True):
    """Inverse of `plain_state_dict` for a model that may carry parametrizations."""
    names = {plain_name(k): k for k in model.state_dict()}
    renamed = {names.get(k, k): v for k, v in state.items()}
    return model.load_state_dict(renamed, strict=strict)
