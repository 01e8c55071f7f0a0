"""The sparse-training library. It knows nothing of the trainer: a trainer builds a method,
`attach`es it to a model, calls its hooks and asks it about itself (see `base.SparsityMethod`).
Each sparse layer's masks have one owner, `SparseLayer`; `MaskSchedule` says when they change."""

from .base import SparseLayer, SparsityMethod, default_backward_sparsity
from .dense import Dense
from .dynamic import DynamicSparse
from .distribution import layer_counts
from .gmp import GMP
from .masking import computed_state_dict, load_plain_state_dict, masked_weight, plain_state_dict, zero_optimizer_state
from .rigl import RigL
from .schedule import MaskSchedule, check_steps, resolve_steps
from .set import SET
from .static import Static
from .topk import topk_mask, topk_masks
from .topkast import TopKAST

__all__ = [
    "Dense",
    "DynamicSparse",
    "GMP",
    "MaskSchedule",
    "RigL",
    "SET",
    "Static",
    "SparseLayer",
    "SparsityMethod",
    "TopKAST",
    "check_steps",
    "computed_state_dict",
    "default_backward_sparsity",
    "layer_counts",
    "load_plain_state_dict",
    "masked_weight",
    "plain_state_dict",
    "resolve_steps",
    "topk_mask",
    "topk_masks",
    "zero_optimizer_state",
]
