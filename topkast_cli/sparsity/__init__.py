"""The sparse-training library. It knows nothing of the trainer: a trainer builds a method,
`attach`es it to a model, and calls its hooks (see `base.SparsityMethod`)."""

from .base import SparseLayer, SparsityMethod, measured_density, zero_optimizer_state
from .dense import Dense
from .dynamic import DynamicSparse
from .distribution import layer_counts
from .gmp import GMP
from .masking import (
    load_plain_state_dict,
    masked_weight,
    named_masked_weights,
    plain_state_dict,
    use_dense_weights,
)
from .rigl import RigL
from .set import SET
from .static import Static
from .topk import topk_mask, topk_masks
from .topkast import TopKAST

__all__ = [
    "Dense",
    "DynamicSparse",
    "GMP",
    "RigL",
    "SET",
    "Static",
    "SparseLayer",
    "SparsityMethod",
    "TopKAST",
    "layer_counts",
    "load_plain_state_dict",
    "masked_weight",
    "measured_density",
    "named_masked_weights",
    "plain_state_dict",
    "topk_mask",
    "topk_masks",
    "use_dense_weights",
    "zero_optimizer_state",
]
