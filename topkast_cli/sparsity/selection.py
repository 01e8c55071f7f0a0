"""Which weights are sparse: Conv/Linear weights (transformers' Conv1D too, see `layer_types`;
embeddings optionally), minus the layers the user keeps dense (the first layer by default,
and name patterns)."""

from __future__ import annotations

import fnmatch

from torch import nn

from ..errors import UserError
from .layer_types import EMBEDDING_TYPES, sparse_layer_types


def candidate_layers(model: nn.Module, include_embeddings: bool = False) -> list[tuple[str, nn.Module]]:
    types = sparse_layer_types() + (EMBEDDING_TYPES if include_embeddings else ())
    return [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, types) and getattr(m, "weight", None) is not None
    ]


def select_sparse_layers(
    model: nn.Module,
    dense_first: bool = True,
    dense_layers: list[str] | tuple = (),
    include_embeddings: bool = False,
) -> list[tuple[str, nn.Module]]:
    """Layers whose weight becomes sparse, in model order.

    `dense_first` keeps the first candidate layer (in registration order) dense, as RigL's
    uniform setting does; a model whose input layer is not that (a Transformer's token
    embedding) names it in `input_layer`, and that one is kept instead (if it is a candidate).
    `dense_layers` are fnmatch patterns on module names (`fc`, `layer4.*`); a pattern that
    matches no candidate layer is an error, since it is almost certainly a typo.
    """
    layers = candidate_layers(model, include_embeddings)
    if not layers:
        raise UserError("the model has no Conv/Linear layer to make sparse; use sparsity=dense")
    names = [n for n, _ in layers]
    first = getattr(model, "input_layer", None) or names[0]
    keep_dense = {first} if dense_first else set()
    for pattern in dense_layers:
        hits = fnmatch.filter(names, pattern)
        if not hits:
            shown = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")
            raise UserError(f"sparsity.dense_layers: pattern {pattern!r} matches no layer; layers are: {shown}")
        keep_dense.update(hits)
    chosen = [(n, m) for n, m in layers if n not in keep_dense]
    if not chosen:
        raise UserError("sparsity.dense_layers/dense_first leave no layer to make sparse; use sparsity=dense")
    return chosen
