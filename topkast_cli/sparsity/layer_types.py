"""Which module types hold a weight that can be sparse, and how to read it as a matrix.

The one place that lists them: selection, both compute backends, block structure, FLOP
counting and export all ask here.

Conv and Linear layers, embeddings (optionally), and Hugging Face `transformers`' `Conv1D`
(GPT-2's projections): a Linear layer whose weight is stored transposed, (in, out), computing
y = x W + b. Everything that sees a weight as the matrix out x in (blocks, N:M groups, units
kept by `keep_units`, exported CSR/BSR) transposes a Conv1D weight first; masks, θ and
checkpoints stay in the stored layout.
"""

from __future__ import annotations

import math
import sys

import torch
from torch import nn

BASE_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
EMBEDDING_TYPES = (nn.Embedding,)


def transposed_type() -> type | None:
    """transformers' Conv1D if that module is loaded, else None.

    Looked up in sys.modules, never imported: a model can only hold a Conv1D once its module
    has been imported, so this is exact, and a model without one does not pay for importing
    transformers (seconds) or need it installed."""
    return getattr(sys.modules.get("transformers.pytorch_utils"), "Conv1D", None)


def sparse_layer_types() -> tuple[type, ...]:
    """Module types whose `weight` may become sparse (embeddings apart: `EMBEDDING_TYPES`)."""
    conv1d = transposed_type()
    return BASE_TYPES + ((conv1d,) if conv1d is not None else ())


def stores_transposed(module: nn.Module) -> bool:
    """True for a layer whose weight is (in, out) rather than (out, in, ...)."""
    conv1d = transposed_type()
    return conv1d is not None and isinstance(module, conv1d)


def matrix(weight: torch.Tensor, transposed: bool = False) -> torch.Tensor:
    """The weight as the matrix out x in (a view: a convolution's in x kernel flattened;
    a transposed layer's weight transposed)."""
    return weight.t() if transposed else weight.reshape(weight.shape[0], -1)


def matrix_shape(shape: tuple, transposed: bool = False) -> tuple[int, int]:
    """(out, in) of a weight of `shape`, as `matrix` sees it."""
    return (shape[1], shape[0]) if transposed else (shape[0], math.prod(shape[1:]))


def out_features(module: nn.Module) -> int:
    """Output features (channels) of a layer of `sparse_layer_types()`."""
    return matrix_shape(tuple(module.weight.shape), stores_transposed(module))[0]
