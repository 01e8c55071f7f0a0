"""Decoder-only Transformer for next-token prediction, from PyTorch's own parts
(`F.scaled_dot_product_attention` with a causal mask).

Every weight is read from its module (`self.embed.weight`, `nn.Linear` calls), so a sparse
layer's parametrization gives α everywhere: the token lookup and the tied output layer both
compute with the embedding's α when the embedding is sparse.

Sparse by default (Conv/Linear weights, see `sparsity/selection.py`): the attention
projections (`qkv`, `proj`) and the MLP weights (`fc`, `out`) of every block, and an untied
output layer (`head`). Dense: the token embedding (unless `sparsity.include_embeddings=true`),
the learned position table (a plain parameter, never a candidate), norms and biases.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError, check_int


class SelfAttention(nn.Module):
    def __init__(self, width: int, heads: int, dropout: float):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(b, t, c))


class Block(nn.Module):
    """Attention then MLP, each a residual branch; layer norm before (pre-norm) or after."""

    def __init__(self, width: int, heads: int, mlp_ratio: int, dropout: float, pre_norm: bool):
        super().__init__()
        self.pre_norm = pre_norm
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = SelfAttention(width, heads, dropout)
        self.fc = nn.Linear(width, mlp_ratio * width)
        self.out = nn.Linear(mlp_ratio * width, width)
        self.drop = nn.Dropout(dropout)

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(F.gelu(self.fc(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pre_norm:
            x = x + self.drop(self.attn(self.norm1(x)))
            return x + self.drop(self.mlp(self.norm2(x)))
        x = self.norm1(x + self.drop(self.attn(x)))
        return self.norm2(x + self.drop(self.mlp(x)))


class Transformer(nn.Module):
    """Token ids (batch, time) -> next-token logits (batch, time, vocab_size).

    `vocab_size` and `context` (the longest input, the size of the position table) come from
    the dataset; the rest from conf/model/transformer.yaml. `tie_embeddings`: the output layer
    is the token embedding's weight (as GPT-2 and nanoGPT do).
    """

    # `sparsity.dense_first` keeps the input layer dense: here the token embedding (dense
    # anyway unless include_embeddings), not the first attention projection.
    input_layer = "embed"

    def __init__(
        self,
        vocab_size: int,
        context: int,
        layers: int = 4,
        heads: int = 4,
        width: int = 128,
        mlp_ratio: int = 4,
        dropout: float = 0.0,
        pre_norm: bool = True,
        tie_embeddings: bool = True,
    ):
        super().__init__()
        for key, value in (("layers", layers), ("heads", heads), ("width", width), ("mlp_ratio", mlp_ratio)):
            check_int(f"model.{key}", value)
        if width % heads:
            raise UserError(f"model.width={width} must be a multiple of model.heads={heads}")
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
            raise UserError(f"model.dropout={dropout!r} must be a number in [0, 1)")
        for key, value in (("pre_norm", pre_norm), ("tie_embeddings", tie_embeddings)):
            if not isinstance(value, bool):
                raise UserError(f"model.{key}={value!r} must be true or false")
        self.context = context
        self.embed = nn.Embedding(vocab_size, width)
        self.pos = nn.Parameter(torch.zeros(context, width))
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(width, heads, mlp_ratio, dropout, pre_norm) for _ in range(layers))
        self.norm = nn.LayerNorm(width) if pre_norm else nn.Identity()
        self.head = None if tie_embeddings else nn.Linear(width, vocab_size, bias=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """GPT-2's initialisation: N(0, 0.02) weights, zero biases, and the residual branches'
        output layers scaled down by sqrt(2 x layers)."""
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                std = 0.02 / (2 * len(self.blocks)) ** 0.5 if name.endswith(("proj.weight", "out.weight")) else 0.02
                nn.init.normal_(p, 0.0, std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        t = tokens.shape[1]
        if t > self.context:
            raise ValueError(f"an input of {t} tokens is longer than the model's context ({self.context})")
        h = self.drop(self.embed(tokens) + self.pos[:t])
        for block in self.blocks:
            h = block(h)
        h = self.norm(h)
        if self.head is not None:
            return self.head(h)
        return F.linear(h, self.embed.weight)  # α when the embedding is sparse
