"""Forward FLOPs of a model for one input, dense and with the weights it actually computes with.

Counted with forward hooks on Conv and Linear modules (and transformers' Conv1D: the types
`sparsity.layer_types` lists), from the output shapes they really produce: each weight entry
takes part in one multiply-add per output position (conv: each spatial position of the
output; linear: each row of the leading dimensions), so a layer costs
2 x weights x positions FLOPs dense and 2 x nonzero weights x positions sparse. A sparse layer's
weight is α = θ ⊙ 1_A (or θ under `use_dense_weights`), so the nonzeros are counted from the
effective weight. Bias additions, activations, pooling and normalisation are not counted (they
are small and the same dense or sparse). Modules whose forward is not called (e.g. the
projection inside nn.MultiheadAttention, which reads the weight directly) are not counted.

Training FLOPs (`training_flops`) count one training step's forward and backward for the same
input: the forward on A (2·|A| per position), the input gradient through A (2·|A|) and the
weight gradient on B (2·|B|), i.e. 2·(2·|A| + |B|) per position and layer; a dense layer has
A = B = all its weights (3x its forward). |B| is the backward set's size while the masks
explore (after refinement B = A, so those steps cost less). The first layer's input gradient
is counted too, and a mask refresh is not.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.nn.utils.parametrize import type_before_parametrizations

from .sparsity.layer_types import out_features, sparse_layer_types


@dataclass
class LayerFlops:
    name: str
    type: str
    weight_shape: list
    output_shape: list  # per sample (batch dimension removed)
    params: int  # weight entries
    nonzero: int  # nonzero entries of the effective weight
    dense_flops: int
    flops: int

    @property
    def density(self) -> float:
        return self.nonzero / max(1, self.params)

    def to_dict(self) -> dict:
        return {**asdict(self), "density": self.density}


def _positions(module: nn.Module, output: torch.Tensor) -> int:
    """Output positions per sample at which every weight entry is used once."""
    return output[0].numel() // out_features(module)


@torch.no_grad()
def count_flops(model: nn.Module, example: torch.Tensor) -> list[LayerFlops]:
    """Per-layer forward FLOPs of `model` for one sample `example` (with its batch dimension
    of size 1), in the order the layers run. The model's mode is restored."""
    if example.shape[0] != 1:
        raise ValueError(f"count_flops needs a batch of one sample, got shape {tuple(example.shape)}")
    layers: dict[str, LayerFlops] = {}

    def hook(name):
        def record(module, inputs, output):
            weight = module.weight  # the effective weight (a parametrization returns α)
            positions = _positions(module, output)
            params, nonzero = weight.numel(), int(torch.count_nonzero(weight))
            if name in layers:  # a module called more than once: its work adds up
                layers[name].dense_flops += 2 * params * positions
                layers[name].flops += 2 * nonzero * positions
                return
            layers[name] = LayerFlops(
                name, type_before_parametrizations(module).__name__, list(weight.shape), list(output.shape[1:]),
                params, nonzero, 2 * params * positions, 2 * nonzero * positions,
            )

        return record

    handles = [
        m.register_forward_hook(hook(name or type(m).__name__))
        for name, m in model.named_modules()
        if isinstance(m, sparse_layer_types())
    ]
    was_training = model.training
    model.eval()
    try:
        model(example)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return list(layers.values())


def total(layers: list[LayerFlops]) -> dict:
    dense = sum(l.dense_flops for l in layers)
    sparse = sum(l.flops for l in layers)
    return {"dense_flops": dense, "flops": sparse, "ratio": sparse / dense if dense else 1.0}


def training_flops(layers: list[LayerFlops], backward: dict[str, int]) -> int:
    """Forward + backward FLOPs of one training input (see the module's docstring). `backward`:
    |B| of each sparse layer by module name; any other layer trains every weight."""
    out = 0
    for l in layers:
        positions = l.dense_flops // (2 * max(1, l.params))
        out += 2 * l.flops + 2 * backward.get(l.name, l.params) * positions
    return out
