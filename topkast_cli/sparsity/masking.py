"""How a layer turns its dense θ and its two masks into the weight it computes with.

This is the one place where θ and the masks meet. Every sparse layer (Linear, Conv,
Embedding) gets a `MaskedWeight` parametrization on its `weight`, so any code that reads
`module.weight` (its own forward, attention blocks that read `out_proj.weight`, tied
embeddings) sees α = θ ⊙ 1_A, while θ stays the stored parameter. A sparse-kernel backend
would replace `masked_weight` per layer type without touching the trainer.
"""

from __future__ import annotations

import re

import torch
from torch import nn
from torch.nn.utils import parametrize


class _MaskedWeight(torch.autograd.Function):
    """Forward: θ ⊙ forward_mask. Backward: g ⊙ backward_mask.

    The gradient on B \\ A is ∂L/∂α there (not 0, which plain `θ * mask` would give), and
    entries outside B get exactly zero gradient.
    """

    @staticmethod
    def forward(ctx, theta, forward_mask, backward_mask):
        ctx.save_for_backward(backward_mask)
        return theta * forward_mask

    @staticmethod
    def backward(ctx, grad):
        (backward_mask,) = ctx.saved_tensors
        return grad * backward_mask, None, None


def masked_weight(theta: torch.Tensor, forward_mask: torch.Tensor, backward_mask: torch.Tensor):
    """α = θ ⊙ forward_mask with gradient g ⊙ backward_mask (masks in θ's dtype)."""
    return _MaskedWeight.apply(theta, forward_mask, backward_mask)


class MaskedWeight(nn.Module):
    """Parametrization θ -> α. Holds the masks as float tensors (not state_dict buffers:
    the checkpoint stores masks as bool tensors, apart from the model)."""

    def __init__(self, theta: torch.Tensor):
        super().__init__()
        ones = torch.ones_like(theta, memory_format=torch.contiguous_format)
        self.forward_mask = ones
        self.backward_mask = ones
        self.use_dense = False  # evaluate the dense θ (eval.dense=true)

    def set_masks(self, forward: torch.Tensor, backward: torch.Tensor) -> None:
        # Float masks: a float product is faster than one with a bool mask. B = A (the same
        # tensor) shares one.
        self.forward_mask = forward.to(self.forward_mask.dtype)
        self.backward_mask = self.forward_mask if backward is forward else backward.to(self.forward_mask.dtype)

    def forward(self, theta: torch.Tensor) -> torch.Tensor:
        if self.use_dense:
            return theta
        return masked_weight(theta, self.forward_mask, self.backward_mask)


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


def named_masked_weights(model: nn.Module):
    """(plain weight name, module, MaskedWeight) for every parametrized layer."""
    for name, module in model.named_modules():
        if parametrize.is_parametrized(module, "weight"):
            for p in module.parametrizations.weight:
                if isinstance(p, MaskedWeight):
                    yield (f"{name}.weight" if name else "weight"), module, p


def use_dense_weights(model: nn.Module, dense: bool = True) -> None:
    """Make every sparse layer compute with θ instead of α (for `eval.dense=true`)."""
    for _, _, p in named_masked_weights(model):
        p.use_dense = dense
