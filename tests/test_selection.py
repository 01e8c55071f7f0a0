import pytest
from torch import nn

from topkast_cli.errors import UserError
from topkast_cli.sparsity.selection import select_sparse_layers


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 8)
        self.conv = nn.Conv1d(8, 8, 3)
        self.norm = nn.BatchNorm1d(8)
        self.block = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
        self.head = nn.Linear(8, 4)


def names(layers):
    return [n for n, _ in layers]


def test_first_layer_dense_by_default_and_norms_never_sparse():
    assert names(select_sparse_layers(Net())) == ["block.0", "block.1", "head"]
    assert names(select_sparse_layers(Net(), dense_first=False)) == ["conv", "block.0", "block.1", "head"]


def test_embeddings_optional():
    chosen = names(select_sparse_layers(Net(), dense_first=False, include_embeddings=True))
    assert chosen[0] == "embed"


def test_patterns_keep_layers_dense():
    assert names(select_sparse_layers(Net(), dense_layers=["block.*"])) == ["head"]


def test_pattern_matching_nothing_is_an_error():
    with pytest.raises(UserError, match="'blok.*' matches no layer"):
        select_sparse_layers(Net(), dense_layers=["blok.*"])


def test_nothing_left_is_an_error():
    with pytest.raises(UserError, match="no layer"):
        select_sparse_layers(Net(), dense_layers=["*"])
