"""The sparse compute side's index structures and value moves, built row block by row block,
against the plain whole-layer definitions."""

import pytest
import torch

from topkast_cli.sparsity import sparse_linear
from topkast_cli.sparsity.topk import topk_masks


def _masks(shape, forward, backward, seed=0):
    scores = torch.rand(shape, generator=torch.Generator().manual_seed(seed))
    return topk_masks(scores, forward, backward)


@pytest.mark.parametrize("block", [1, 7, 64, 1 << 20])  # a row per block, blocks across rows, one block
@pytest.mark.parametrize("shared", [False, True])
def test_pattern_matches_the_whole_layer_definition(monkeypatch, block, shared):
    monkeypatch.setattr(sparse_linear, "BLOCK", block)
    forward, backward = _masks((13, 9), 30, 60)
    if shared:
        backward = forward
    p = sparse_linear.build_pattern(forward, backward)
    a = forward.to_sparse_csr()
    assert p.k == 30
    assert torch.equal(p.a_crow.long(), a.crow_indices()) and torch.equal(p.a_col.long(), a.col_indices())
    at = forward.t().contiguous().to_sparse_csr()
    assert torch.equal(p.at_crow.long(), at.crow_indices()) and torch.equal(p.at_col.long(), at.col_indices())
    # at_pos: the A-order position of each A^T entry, so A's values permuted give A^T's.
    values = torch.arange(1.0, 31.0)
    dense = torch.zeros(13, 9)
    dense[forward] = values
    assert torch.equal(values[p.at_pos.long()], dense.t()[forward.t()])
    c = (backward & ~forward).to_sparse_csr()
    assert torch.equal(p.c_crow.long(), c.crow_indices()) and torch.equal(p.c_col.long(), c.col_indices())


@pytest.mark.parametrize("block", [1, 10, 1 << 20])
def test_values_move_between_theta_and_b_block_by_block(monkeypatch, block):
    monkeypatch.setattr(sparse_linear, "BLOCK", block)
    theta = torch.randn(11, 8)
    forward, backward = _masks((11, 8), 20, 45, seed=1)
    new_forward, new_backward = _masks((11, 8), 20, 45, seed=2)
    old, new = sparse_linear.build_pattern(forward, backward), sparse_linear.build_pattern(new_forward, new_backward)
    order = torch.cat([theta[forward], theta[backward & ~forward]])  # B's order: A's, then B \ A's
    assert torch.equal(sparse_linear.gather_values(sparse_linear.row_blocks(old), theta.reshape(-1), 45), order)
    back = sparse_linear.scatter_values(sparse_linear.row_blocks(old), torch.zeros(88), order)
    assert torch.equal(back.view(11, 8), torch.where(backward, theta, 0))
    # Optimizer state carried to the new B: kept where an entry stays in B, zero where it is new.
    moved = sparse_linear.carry_over(order, sparse_linear.row_blocks(old), sparse_linear.row_blocks(new), 45)
    expected = torch.where(backward, theta, 0)
    assert torch.equal(moved, torch.cat([expected[new_forward], expected[new_backward & ~new_forward]]))


@pytest.mark.parametrize("block", [1, 7, 1 << 20])
@pytest.mark.parametrize("size", [(2, 2), (3, 3), (4, 4)])
@pytest.mark.parametrize("shared", [False, True])
def test_bsr_alpha_and_its_transpose_are_a_in_blocks(monkeypatch, block, size, shared):
    """With blocks, α and α^T are BSR tensors of A's blocks, and B's values keep the order of
    single weights: the CSR parts are the unstructured pattern's, so every value move is too."""
    from topkast_cli.sparsity.structure import Blocks

    monkeypatch.setattr(sparse_linear, "BLOCK", block)
    r, c = size
    theta = torch.randn(12, 24, generator=torch.Generator().manual_seed(3))
    blocks = 12 * 24 // (r * c)
    forward, backward = Blocks(r, c).masks(theta, blocks // 4 * r * c, blocks // 2 * r * c)
    if shared:
        backward = forward
    p = sparse_linear.build_pattern(forward, backward, size)
    plain = sparse_linear.build_pattern(forward, backward)
    for key in ("a_crow", "a_col", "c_crow", "c_col", "b_crow", "b_col"):
        assert torch.equal(getattr(p, key), getattr(plain, key)), key
    assert p.at_col.numel() == 0 and p.at_pos.numel() == 0  # α^T is BSR instead
    values = torch.cat([theta[forward], theta[backward & ~forward]])
    alpha, alpha_t = sparse_linear._alpha(p, values), sparse_linear._alpha_t(p, values)
    assert alpha.layout == torch.sparse_bsr and alpha.values().shape == (blocks // 4, r, c)
    assert alpha_t.layout == torch.sparse_bsr and alpha_t.values().shape == (blocks // 4, c, r)
    assert torch.equal(alpha.to_dense(), torch.where(forward, theta, 0))
    assert torch.equal(alpha_t.to_dense(), torch.where(forward, theta, 0).t())
