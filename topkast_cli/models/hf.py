"""A Hugging Face `transformers` GPT-2 for next-token prediction, thinly wrapped so that it
plugs in where `transformer.Transformer` does: token ids (batch, time) -> logits (batch, time,
vocab_size).

Built from a `GPT2Config` under GPT-2's own names (conf/model/hf_causal_lm.yaml), offline; with
`pretrained=NAME` the body's weights come from `GPT2Model.from_pretrained(NAME)` (a download,
or the local Hugging Face cache) and its architecture from NAME's config.

What is sparse (see `sparsity/layer_types.py`): the projections, `transformers`' Conv1D
layers (`attn.c_attn`, `attn.c_proj`, `mlp.c_fc`, `mlp.c_proj` of every block). Dense: the
token table `wte` and the position table `wpe` (both only candidates with
`sparsity.include_embeddings=true`; `sparsity.dense_first` keeps `wte` dense even then),
layer norms and biases.

The output layer is tied to the token table, as in GPT-2, but computed here as
`F.linear(h, wte.weight)` rather than by GPT-2's `lm_head` module: `wte.weight` is what the
table computes with, so when `wte` is sparse the head reads the same α as the lookup (an
`lm_head` would hold the Parameter θ itself and compute with the dense weights), and the head
is no second Linear layer for the selection to make sparse on its own. The state_dict has
GPT2LMHeadModel's names without `lm_head.weight` (tied to `transformer.wte.weight` there).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError, check_int

INSTALL_HINT = "model=hf_causal_lm needs the transformers package: pip install 'topkast-cli[hf]'"


def _transformers():
    """The GPT-2 classes, imported here (seconds) and only for this model."""
    try:
        from transformers import GPT2Config, GPT2Model
    except ImportError:
        raise UserError(INSTALL_HINT) from None
    return GPT2Config, GPT2Model


def _check_dropout(key: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise UserError(f"model.{key}={value!r} must be a number in [0, 1)")
    return float(value)


class HFCausalLM(nn.Module):
    """GPT-2 (`transformers.GPT2Model`) with its tied output layer; see the module docstring.

    `vocab_size` and `context` come from the dataset. `n_positions` (the position table) is
    the context unless given; with `pretrained`, the checkpoint's architecture is used (the
    size keys are ignored) and its token table is resized to the dataset's vocabulary (our
    datasets are byte/char/word vocabularies, not GPT-2's tokenizer).
    """

    input_layer = "transformer.wte"  # `sparsity.dense_first` keeps the token table dense

    def __init__(
        self,
        vocab_size: int,
        context: int,
        n_layer: int = 4,
        n_embd: int = 128,
        n_head: int = 4,
        n_positions: int | None = None,
        n_inner: int | None = None,
        resid_pdrop: float = 0.0,
        embd_pdrop: float = 0.0,
        attn_pdrop: float = 0.0,
        pretrained: str | None = None,
    ):
        super().__init__()
        GPT2Config, GPT2Model = _transformers()
        for key, value in (("n_layer", n_layer), ("n_embd", n_embd), ("n_head", n_head)):
            check_int(f"model.{key}", value)
        if n_embd % n_head:
            raise UserError(f"model.n_embd={n_embd} must be a multiple of model.n_head={n_head}")
        n_positions = context if n_positions is None else check_int("model.n_positions", n_positions)
        if n_inner is not None:
            check_int("model.n_inner", n_inner)
        if pretrained is not None and (not isinstance(pretrained, str) or not pretrained):
            raise UserError(f"model.pretrained={pretrained!r} must be a model name or directory (or null)")
        dropout = {k: _check_dropout(k, v) for k, v in
                   (("resid_pdrop", resid_pdrop), ("embd_pdrop", embd_pdrop), ("attn_pdrop", attn_pdrop))}
        if pretrained is None:
            config = GPT2Config(
                vocab_size=vocab_size, n_positions=n_positions, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
                n_inner=n_inner, bos_token_id=None, eos_token_id=None, use_cache=False, **dropout,
            )
            self.transformer = GPT2Model(config)
        else:
            self.transformer = _from_pretrained(GPT2Config, GPT2Model, pretrained, vocab_size, dropout)
        if context > self.transformer.config.n_positions:
            raise UserError(
                f"dataset.context={context} is longer than the model's position table "
                f"(model.n_positions={self.transformer.config.n_positions}); lower dataset.context"
            )
        self.context = context

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.is_meta:
            # transformers' causal-mask code reads tensor values, which the meta device (the
            # pre-flight check) has not; the sizes it would check are checked above.
            raise NotImplementedError("GPT2Model's forward has no meta version")
        h = self.transformer(input_ids=tokens, use_cache=False).last_hidden_state
        return F.linear(h, self.transformer.wte.weight)  # α when the table is sparse


def _from_pretrained(GPT2Config, GPT2Model, name: str, vocab_size: int, dropout: dict) -> nn.Module:
    """The body of checkpoint `name`, its token table resized to `vocab_size`. Under the meta
    device (the pre-flight check) only its config is read and the model is built empty."""
    try:
        config = GPT2Config.from_pretrained(name, use_cache=False, **dropout)
        if torch.empty(0).is_meta:
            model = GPT2Model(config)
        else:
            model = GPT2Model.from_pretrained(name, config=config)
    except (OSError, ValueError) as e:  # no such model, no network, not a GPT-2 checkpoint
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"model.pretrained={name}: {first}") from None
    if model.config.vocab_size != vocab_size:
        model.resize_token_embeddings(vocab_size)
    return model
