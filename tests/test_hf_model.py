"""`model=hf_causal_lm`: a tiny GPT-2 from `transformers` under Top-KAST. Its Conv1D
projections (weights stored (in, out)) are sparse layers with exact k, B ⊇ A and gradients on
B only, alike on both backends; blocks and N:M groups are chosen on the out x in matrix; the
tied head reads the token table's α; FLOPs, export and exact resume through the trainer.
Without `transformers`: test_hf_optional.py."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers", reason="the HF model needs the optional extra: pip install 'topkast-cli[hf]'")

from transformers import GPT2LMHeadModel  # noqa: E402
from transformers.pytorch_utils import Conv1D  # noqa: E402

from conftest import make_config, split_run_matches  # noqa: E402
from test_export import export_config  # noqa: E402
from test_hf_optional import hf_overrides  # noqa: E402
from test_interrupt import read_jsonl  # noqa: E402
from test_language_model import write_text  # noqa: E402
from topkast_cli.checkpoint import load_checkpoint  # noqa: E402
from topkast_cli.commands.train import train  # noqa: E402
from topkast_cli.errors import UserError  # noqa: E402
from topkast_cli.export import bsr_entry, dense_from_bsr, dense_from_csr, export_checkpoint  # noqa: E402
from topkast_cli.flops import count_flops  # noqa: E402
from topkast_cli.models.hf import HFCausalLM  # noqa: E402
from topkast_cli.run import build_optimizer  # noqa: E402
from topkast_cli.sparsity import TopKAST  # noqa: E402
from topkast_cli.sparsity.selection import select_sparse_layers  # noqa: E402

VOCAB, CONTEXT = 20, 16
PROJECTIONS = [f"transformer.h.{i}.{m}" for i in range(2) for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
# Through the trainer: 12 steps, refreshes every 3, the masks lock at 9; a constant lr, so that
# a run split at step 6 follows the same schedule (cosine_lm's follows max_steps).
RUN = ["trainer.max_steps=12", "trainer.eval_every=6", "trainer.log_every=6", "trainer.checkpoint_every=6",
       "trainer.progress=false", "trainer.tensorboard=false", "trainer.deterministic=true",
       "sparsity.refresh_interval=3", "sparsity.exploration_steps=9", "scheduler=constant"]


def tiny(**kwargs) -> HFCausalLM:
    torch.manual_seed(0)
    return HFCausalLM(VOCAB, CONTEXT, n_layer=2, n_embd=32, n_head=2, **kwargs)


def tokens(seed: int, batch: int = 4) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, CONTEXT + 1), generator=torch.Generator().manual_seed(seed))


def lm_step(model, method, optimizer, i) -> None:
    """One training step in the trainer's hook order, on next-token prediction."""
    x = tokens(i)
    method.before_forward(i)
    optimizer.zero_grad(set_to_none=True)
    F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten()).backward()
    method.after_backward(i)
    method.before_step(i, optimizer)
    optimizer.step()
    method.after_step(i + 1, optimizer)


def assert_exact_k(masks: dict, numel: dict, forward=0.9, backward=0.8) -> None:
    for name, (a, b) in masks.items():
        assert int(a.sum()) == round((1 - forward) * numel[name]), name
        assert int(b.sum()) == round((1 - backward) * numel[name]), name
        assert bool((b | ~a).all()), f"{name}: B must contain A"


# --------------------------------------------------------------------------- the model
def test_logits_shape_causality_and_context():
    model = tiny().eval()
    x = tokens(0)[:, :CONTEXT]
    out = model(x)
    assert out.shape == (4, CONTEXT, VOCAB)
    y = x.clone()
    y[:, 10:] = (y[:, 10:] + 1) % VOCAB
    assert torch.allclose(model(y)[:, :10], out[:, :10], atol=1e-5)
    assert model.transformer.config.n_positions == CONTEXT  # n_positions defaults to the context
    with pytest.raises(UserError, match="longer than the model's position table"):
        HFCausalLM(VOCAB, CONTEXT, n_layer=1, n_embd=32, n_head=2, n_positions=8)
    with pytest.raises(UserError, match="model.n_embd=30 must be a multiple of model.n_head=4"):
        HFCausalLM(VOCAB, CONTEXT, n_embd=30, n_head=4)


def test_the_projections_are_the_sparse_layers():
    model = tiny()
    assert [n for n, _ in select_sparse_layers(model)] == PROJECTIONS
    assert all(isinstance(m, Conv1D) for _, m in select_sparse_layers(model))
    # with the embeddings: the token table is the input layer (dense_first), the position table a candidate
    names = [n for n, _ in select_sparse_layers(model, include_embeddings=True)]
    assert "transformer.wte" not in names and names[0] == "transformer.wpe"
    names = [n for n, _ in select_sparse_layers(model, dense_first=False, include_embeddings=True)]
    assert names[:2] == ["transformer.wte", "transformer.wpe"]


def test_the_tied_head_computes_with_the_token_tables_alpha():
    model = tiny()
    method = TopKAST(0.9, 0.8, dense_first=False, include_embeddings=True).attach(model)
    wte = next(layer for layer in method.layers if layer.name == "transformer.wte.weight")
    x = tokens(0)[:, :CONTEXT]
    h = model.transformer(input_ids=x).last_hidden_state
    alpha = wte.theta.detach() * wte.forward
    assert int(torch.count_nonzero(model.transformer.wte.weight)) == int(torch.count_nonzero(alpha)) < alpha.numel()
    torch.testing.assert_close(model(x), F.linear(h, alpha))
    # the lookup reads α as well: a token's embedding is its row of α
    torch.testing.assert_close(model.transformer.wte(x), alpha[x])


# ------------------------------------------------------------- Top-KAST on both backends
def _trained(backend: str, steps: int = 7):
    model = tiny()
    method = TopKAST(0.9, 0.8, refresh_interval=3, regularization=1e-3, backend=backend).attach(model)
    assert method.backends() == {f"{n}.weight": backend for n in PROJECTIONS}
    optimizer = build_optimizer(lambda g: torch.optim.Adam(g, lr=0.01), model, method)
    for i in range(steps):
        lm_step(model, method, optimizer, i)
    return model, method, optimizer


@pytest.mark.parametrize("backend", ["masked", "sparse"])
def test_exact_k_and_gradients_only_on_b(backend):
    model, method, optimizer = _trained(backend, steps=4)  # refreshes at 3: masks have changed once
    numel = {layer.name: layer.numel for layer in method.layers}
    assert_exact_k({layer.name: (layer.forward, layer.backward) for layer in method.layers}, numel)
    before = {layer.name: layer.theta.detach().clone() for layer in method.layers}
    x = tokens(99)
    optimizer.zero_grad(set_to_none=True)
    F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten()).backward()
    for layer in method.layers:
        grad = layer.dense_state(layer.trained.grad)
        assert grad.shape == layer.theta.shape  # (in, out), Conv1D's own layout
        assert not bool(grad[~layer.backward].any()), f"{layer.name}: a gradient outside B"
        assert bool(grad[layer.backward & ~layer.forward].any()), f"{layer.name}: no gradient on B \\ A"
    optimizer.step()
    for layer in method.layers:
        outside = ~layer.backward
        assert torch.equal(layer.theta.detach()[outside], before[layer.name][outside]), f"{layer.name} moved outside B"


def test_both_backends_train_alike():
    """The sparse backend's transposed kernels (y = x α, weight gradient x^T gy) against the
    masked backend: the same masks through refreshes, the same parameters up to rounding."""
    masked, sparse = _trained("masked")[1], _trained("sparse")[1]
    for a, b in zip(masked.layers, sparse.layers):
        assert torch.equal(a.forward, b.forward) and torch.equal(a.backward, b.backward), a.name
        torch.testing.assert_close(b.theta, a.theta, rtol=1e-4, atol=1e-5)


def test_blocks_and_nm_groups_are_chosen_on_the_out_by_in_matrix():
    """Conv1D stores (in, out): an r x c block (r outputs, c inputs) is c x r in θ, and an N:M
    group is m consecutive rows of one column."""
    layer = TopKAST(0.75, 0.5, block=[2, 4], dense_first=False).attach(tiny()).layers[0]
    for mask in (layer.forward, layer.backward):
        blocks = mask.t().reshape(mask.shape[1] // 2, 2, mask.shape[0] // 4, 4)  # (out/2, 2, in/4, 4)
        assert bool((blocks.all(3).all(1) == blocks.any(3).any(1)).all()), "masks are whole 2 x 4 blocks"
    entry = bsr_entry(layer.module.weight, (2, 4), transposed=True)  # export: BSR over out x in
    assert entry["values"].shape[1:] == (2, 4) and torch.equal(dense_from_bsr(entry), layer.module.weight)
    layer = TopKAST(None, None, pattern="nm", nm=[2, 4], dense_first=False).attach(tiny()).layers[0]
    groups = layer.forward.t().reshape(-1, 4)  # 4 consecutive inputs of one output
    assert bool((groups.sum(1) == 2).all())
    # keep_units: every output (a column of θ) keeps a weight in A
    layer = TopKAST(0.95, 0.9, keep_units=True, dense_first=False).attach(tiny()).layers[0]
    assert bool(layer.forward.any(0).all())
    # square blocks run in BSR on the sparse backend, in the stored layout
    model = tiny()
    method = TopKAST(0.75, 0.5, block=[4, 4], dense_first=False, backend="sparse").attach(model)
    x = tokens(0)[:, :CONTEXT]
    out = model(x)
    for layer in method.layers:
        layer.use_backend("masked")
    torch.testing.assert_close(out, model(x), rtol=1e-4, atol=1e-5)


def test_flops_count_the_projections():
    model = tiny()
    TopKAST(0.9, 0.8).attach(model)
    layers = {l.name: l for l in count_flops(model, tokens(0, batch=1)[:, :CONTEXT])}
    assert list(layers) == PROJECTIONS and {l.type for l in layers.values()} == {"Conv1D"}
    c_fc = layers["transformer.h.0.mlp.c_fc"]
    assert c_fc.weight_shape == [32, 128] and c_fc.dense_flops == 2 * 32 * 128 * CONTEXT
    assert c_fc.flops == 2 * round(0.1 * 32 * 128) * CONTEXT


# ------------------------------------------------------------------ through the trainer
@pytest.fixture(scope="module", params=["masked", "sparse"])
def run(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"hf-{request.param}")
    cfg = make_config([*hf_overrides(write_text(root / "t.txt")), *RUN, f"sparsity.backend={request.param}"])
    train(cfg, root / "run")
    return request.param, cfg, root / "run"


def test_a_run_trains_with_exact_k_per_conv1d_layer(run):
    backend, _, run_dir = run
    ckpt = load_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    names = [f"{n}.weight" for n in PROJECTIONS]
    assert sorted(ckpt["masks"]) == sorted(names)
    numel = {n: ckpt["model"][n].numel() for n in names}
    assert_exact_k({n: (m["forward"], m["backward"]) for n, m in ckpt["masks"].items()}, numel, backward=0.9)  # locked: B = A
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["metric"] == "bpc" and set(summary["backends"].values()) == {backend}
    first, last = read_jsonl(run_dir / "sparsity.jsonl")[0], read_jsonl(run_dir / "sparsity.jsonl")[-1]
    assert first["backward_density"] > first["forward_density"] and last["phase"] == "refine"


def test_export_loads_into_our_model_and_into_gpt2lmheadmodel(run):
    _, cfg, run_dir = run
    report = export_checkpoint(export_config(run_dir / "checkpoints" / "last.ckpt"))
    plain = torch.load(report["plain"], weights_only=True)
    csr = torch.load(report["csr"], weights_only=True)
    for name in PROJECTIONS:
        entry, weight = csr[f"{name}.weight"], plain[f"{name}.weight"]
        assert entry["transposed"] and entry["shape"] == list(weight.shape)
        assert torch.equal(dense_from_csr(entry), weight)
        assert entry["values"].numel() == int(torch.count_nonzero(weight)) <= round(0.1 * weight.numel())
        rows = entry["crow_indices"].numel() - 1
        assert rows == weight.shape[1], "CSR over the out x in matrix"
    ours = HFCausalLM(plain["transformer.wte.weight"].shape[0], cfg.dataset.context, n_layer=2, n_embd=32, n_head=2)
    ours.load_state_dict(plain)
    theirs = GPT2LMHeadModel(ours.transformer.config).eval()
    missing, unexpected = theirs.load_state_dict(plain, strict=False)
    assert set(missing) <= {"lm_head.weight"} and not unexpected  # the head is tied to wte
    theirs.tie_weights()
    x = tokens(0)[:, : cfg.dataset.context] % plain["transformer.wte.weight"].shape[0]
    torch.testing.assert_close(theirs(input_ids=x).logits, ours.eval()(x))


def test_resume_is_exact(tmp_path):
    split_run_matches(tmp_path, [*hf_overrides(write_text(tmp_path / "t.txt")), *RUN, "sparsity.backend=sparse"], 6)
