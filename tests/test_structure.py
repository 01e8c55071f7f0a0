"""Structured Top-KAST (sparsity.block, sparsity.pattern=nm): every rule of DESIGN.md §1 at
the coarser grain. Exact k in blocks, blocks whole, B ⊇ A, the top blocks by norm, nothing
outside B moves (SGD, momentum, Adam), the gradient is the masked backend's on the expanded
masks, the regulariser's 1/D counts blocks, ERK in blocks, the lock; N:M groups; exact resume,
export, old checkpoints, and the values refused."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import TINY, grad_of, make_config, state_of, step
from test_eval import eval_config
from topkast_cli.checkpoint import load_checkpoint
from topkast_cli.commands.train import train
from topkast_cli.errors import UserError
from topkast_cli.evaluate import evaluate_checkpoint
from topkast_cli.export import dense_from_bsr, dense_from_csr, export_checkpoint
from topkast_cli.resume import check_fits
from topkast_cli.run import build_optimizer
from topkast_cli.run_logs import read_jsonl
from topkast_cli.sparsity import TopKAST
from topkast_cli.sparsity.structure import NM, Blocks

# method keyword arguments: each a structure at 80/60 (N:M: its own densities)
STRUCTURES = {
    "block2x2": {"block": [2, 2]},
    "block4x1": {"block": [4, 1]},
    "block1x8": {"block": [1, 8]},
    "block4x4": {"block": [4, 4]},
    "nm2:4": {"pattern": "nm", "nm": [2, 4], "forward": 0.5, "backward": 0.25},
    "nm1:4": {"pattern": "nm", "nm": [1, 4], "forward": None, "backward": None},  # B: the top 2 of 4
}


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8))


def convnet():
    """A 3x3 convolution (a 16 x 72 matrix) and a Linear layer behind the dense first layer."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 8),
    )


def conv_batch(i):
    g = torch.Generator().manual_seed(i)
    return torch.randn(8, 3, 6, 6, generator=g), torch.randint(0, 8, (8,), generator=g)


def mlp_batch(i):
    g = torch.Generator().manual_seed(i)
    return torch.randn(32, 20, generator=g), torch.randint(0, 8, (32,), generator=g)


NETS = {"mlp": (mlp, mlp_batch), "conv": (convnet, conv_batch)}


def method(kwargs, **more):
    kwargs = {"forward": 0.8, "backward": 0.6, **kwargs, **more}
    return TopKAST(**kwargs)


def units(layer, structure):
    """A and B as masks of blocks (or of N:M groups, per entry) and the number of units."""
    matrix = (layer.theta.shape[0], -1)
    if isinstance(structure, NM):
        return layer.forward.reshape(matrix), layer.backward.reshape(matrix), layer.numel
    r, c = structure.rows, structure.cols
    out = []
    for mask in (layer.forward, layer.backward):
        m = mask.reshape(mask.shape[0] // r, r, -1, c)
        whole = m.all(dim=3).all(dim=1)
        assert torch.equal(whole, m.any(dim=3).any(dim=1)), f"{layer.name}: a block is partly in a set"
        out.append(whole)
    return out[0], out[1], layer.numel // structure.size


def check_masks(m, structure, uniform=True, top=True):
    """Exact counts (in blocks / per group), blocks whole, B ⊇ A, the top units by score."""
    for layer in m.layers:
        forward, backward, n = units(layer, structure)
        assert bool((backward | ~forward).all()), "A must be a subset of B"
        theta = layer.theta.detach()
        if isinstance(structure, NM):
            groups = lambda t: t.reshape(-1, structure.m)  # noqa: E731
            assert torch.equal(groups(layer.forward).sum(1), torch.full((layer.numel // structure.m,), structure.n))
            kb = structure.n_backward if not torch.equal(layer.forward, layer.backward) else structure.n
            assert bool((groups(layer.backward).sum(1) == kb).all())
            mag = groups(theta.abs())
            inside = mag.masked_fill(~groups(layer.forward), math.inf).min(1).values
            outside = mag.masked_fill(groups(layer.forward), -math.inf).max(1).values
            assert bool((inside >= outside).all()), "A: the top n |θ| of every group"
            continue
        d, db = 1 - m.forward_sparsity, 1 - m.backward_sparsity
        assert int(forward.sum()) * structure.size == layer.k_forward
        if uniform:
            assert int(forward.sum()) == round(d * n)
        if uniform and not torch.equal(layer.forward, layer.backward):
            assert int(backward.sum()) == round(db * n)
        if not top:
            continue
        r, c = structure.rows, structure.cols
        norms = torch.linalg.vector_norm(theta.reshape(theta.shape[0] // r, r, -1, c), dim=(1, 3))
        assert norms[forward].min() >= norms[~forward].max(), "A: the blocks of largest norm"
        if not backward.all():
            assert norms[backward].min() >= norms[~backward].max(), "B: the blocks of largest norm"


def the_structure(kwargs):
    return TopKAST(**{"forward": 0.8, "backward": 0.6, **kwargs}).structure


@pytest.mark.parametrize("net", NETS)
@pytest.mark.parametrize("name", STRUCTURES)
def test_exact_counts_whole_blocks_nesting_and_top_scores_through_refreshes(name, net):
    make, data = NETS[net]
    model = make()
    m = method(STRUCTURES[name], refresh_interval=1).attach(model)
    opt = build_optimizer(lambda g: torch.optim.Adam(g, lr=0.05), model, m)
    moved = False
    for i in range(6):
        check_masks(m, m.structure)
        step(model, m, opt, i, data(i))
        moved = moved or any(l.churn > 0 for l in m.layers)
    assert moved, "the masks should move"


OPTIMIZERS = {
    "sgd": lambda g: torch.optim.SGD(g, lr=0.5),
    "momentum": lambda g: torch.optim.SGD(g, lr=0.5, momentum=0.9, weight_decay=0.01),
    "adam": lambda g: torch.optim.Adam(g, lr=0.05),
}


@pytest.mark.parametrize("form", ["decoupled", "coupled"])
@pytest.mark.parametrize("opt", OPTIMIZERS)
@pytest.mark.parametrize("name", ["block4x4", "block4x1", "nm1:4"])
def test_nothing_outside_b_moves(name, opt, form):
    model = convnet()
    m = method(STRUCTURES[name], refresh_interval=2, regularization=0.05, regularization_form=form).attach(model)
    optimizer = build_optimizer(OPTIMIZERS[opt], model, m)
    b_moved = 0
    for i in range(10):
        before = [(l.theta.detach().clone(), l.backward.clone()) for l in m.layers]
        step(model, m, optimizer, i, conv_batch(i))
        for layer, (theta, b) in zip(m.layers, before):
            assert torch.equal(layer.theta.detach()[~b], theta[~b]), f"step {i}: {layer.name} moved outside B"
            assert not torch.equal(layer.theta.detach()[b], theta[b]), "B trains"
            b_moved += not torch.equal(layer.backward, b)
    assert b_moved, "the test needs refreshes that change B"


@pytest.mark.parametrize("net", NETS)
@pytest.mark.parametrize("name", STRUCTURES)
def test_gradient_is_the_unstructured_masked_gradient_on_the_expanded_masks(name, net):
    make, data = NETS[net]
    model, plain = make(), make()
    m = method(STRUCTURES[name]).attach(model)
    reference = TopKAST(0.8, 0.6).attach(plain)  # unstructured, then given the same masks
    for mine, theirs in zip(m.layers, reference.layers):
        theirs.set_masks(mine.forward.clone(), mine.backward.clone())
    x, y = data(0)
    for net_ in (model, plain):
        F.cross_entropy(net_(x), y).backward()
    for mine, theirs in zip(m.layers, reference.layers):
        assert torch.equal(mine.trained.grad, theirs.trained.grad), mine.name
        assert torch.equal(mine.trained.grad[~mine.backward], torch.zeros_like(mine.trained.grad[~mine.backward]))
        assert mine.trained.grad[mine.backward & ~mine.forward].abs().sum() > 0, "∂L/∂α reaches B \\ A"


@pytest.mark.parametrize("name", ["block4x4", "nm1:4"])
def test_regulariser_weights_candidates_by_one_over_the_density_in_blocks(name):
    model = mlp()
    lam = 0.1
    m = method(STRUCTURES[name], regularization=lam, regularization_form="coupled").attach(model)
    F.cross_entropy(model(mlp_batch(0)[0]), mlp_batch(0)[1]).backward()
    plain = [l.trained.grad.clone() for l in m.layers]
    m.after_backward(0)
    for layer, g0 in zip(m.layers, plain):
        forward, backward, n = units(layer, m.structure)
        d = int(forward.sum()) / n  # the density in blocks (per entry for N:M)
        assert layer.density == pytest.approx(d)
        added, theta, a, b = layer.trained.grad - g0, layer.theta.detach(), layer.forward, layer.backward
        torch.testing.assert_close(added[a], lam * theta[a])
        torch.testing.assert_close(added[b & ~a], lam / d * theta[b & ~a])
        assert not added[~b].any()


@pytest.mark.parametrize("block", [(4, 4), (2, 8), (1, 3), (16, 1)])
def test_block_scores_are_the_blocks_norms_also_across_pieces(monkeypatch, block):
    from topkast_cli.sparsity import structure

    monkeypatch.setattr(structure, "CHUNK", 300)  # several row blocks per piece, a short last piece
    theta = torch.randn(48, 8, 3, 3)  # a 48 x 72 matrix
    r, c = block
    expected = torch.linalg.vector_norm(theta.reshape(48 // r, r, 72 // c, c), dim=(1, 3)).square()
    torch.testing.assert_close(Blocks(r, c).scores(theta), expected)


def test_erk_counts_blocks():
    shapes = {"a": (64, 64), "b": (8, 64), "c": (16, 8, 3, 3)}
    blocks = Blocks(4, 4)
    k_forward, k_backward = blocks.counts(shapes, 0.2, 0.4, "erk")
    total_blocks = sum(math.prod(s) for s in shapes.values()) // 16
    assert sum(k_forward.values()) == round(0.2 * total_blocks) * 16
    for name, shape in shapes.items():
        assert k_forward[name] % 16 == 0 and k_backward[name] % 16 == 0
        assert k_forward[name] <= k_backward[name] <= math.prod(shape)
    # denser where ERK says so (fewer weights per fan-in + fan-out), as without blocks
    assert k_forward["b"] / 512 > k_forward["a"] / 4096
    model = convnet()
    m = method({"block": [4, 4]}, distribution="erk").attach(model)
    check_masks(m, m.structure, uniform=False)
    blocks_total = sum(l.numel for l in m.layers) // 16
    assert sum(int(l.forward.sum()) for l in m.layers) == round(0.2 * blocks_total) * 16


def test_the_lock_fixes_a_and_makes_b_equal_a():
    model = mlp()
    m = method({"block": [4, 4]}, refresh_interval=3, exploration_steps=6).attach(model)
    opt = build_optimizer(lambda g: torch.optim.SGD(g, lr=0.5), model, m)
    assert [i + 1 for i in range(12) if step(model, m, opt, i, mlp_batch(i))] == [3, 6]
    assert all(l.forward is l.backward for l in m.layers) and m.phase(6) == "refine"
    check_masks(m, m.structure, top=False)  # (θ trained on after the lock)


def test_keep_units_keeps_a_block_in_every_row_of_blocks():
    def model():
        net = mlp()
        with torch.no_grad():
            net[2].weight[:4].mul_(1e-3)  # the first row of blocks would lose every block
        return net

    m = method({"block": [4, 4]}, forward=0.9, backward=0.8, keep_units=True).attach(model())
    forward, _, _ = units(m.layers[0], m.structure)
    assert bool(forward.any(dim=1).all()) and int(forward.sum()) == round(0.1 * 256)
    without = method({"block": [4, 4]}, forward=0.9, backward=0.8).attach(model())
    assert not units(without.layers[0], without.structure)[0][0].any(), "the test needs a row that would lose all"


def test_one_by_one_blocks_are_unstructured_top_kast():
    a, b = mlp(), mlp()
    one = TopKAST(0.8, 0.6, block=[1, 1], refresh_interval=1).attach(a)
    plain = TopKAST(0.8, 0.6, refresh_interval=1).attach(b)
    oa = build_optimizer(lambda g: torch.optim.SGD(g, lr=0.5), a, one)
    ob = build_optimizer(lambda g: torch.optim.SGD(g, lr=0.5), b, plain)
    for i in range(3):
        step(a, one, oa, i, mlp_batch(i))
        step(b, plain, ob, i, mlp_batch(i))
    for x, y in zip(one.layers, plain.layers):
        assert torch.equal(x.forward, y.forward) and torch.equal(x.theta, y.theta)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"block": [0, 4]}, r"sparsity.block=\[0, 4\] must be two integers >= 1"),
        ({"block": [2.5, 4]}, r"sparsity.block=\[2.5, 4\] must be two integers"),
        ({"block": [4]}, r"sparsity.block=\[4\] must be two integers"),
        ({"block": "4x4"}, "sparsity.block='4x4' must be two integers"),
        ({"pattern": "nm", "nm": [4, 2], "forward": None}, r"sparsity.nm=\[4, 2\]: n must be below m"),
        ({"pattern": "nm", "nm": [4, 4], "forward": None}, "n must be below m"),
        ({"pattern": "nm", "nm": [0, 4], "forward": None}, "two integers >= 1"),
        ({"pattern": "nm"}, r"needs sparsity.nm=\[n, m\]"),
        ({"pattern": "nm", "nm": [2, 4]}, r"sparsity.forward=0.8 conflicts with sparsity.nm=\[2, 4\].*0.5 or null"),
        ({"pattern": "nm", "nm": [2, 4], "forward": 0.5, "backward": 0.3}, "allowed: 0.5, 0.25, 0"),
        ({"pattern": "nm", "nm": [2, 4], "forward": 0.5, "distribution": "erk"}, "use uniform"),
        ({"pattern": "nm", "nm": [2, 4], "forward": 0.5, "block": [2, 2]}, "choose one structure"),
        ({"nm": [2, 4]}, "needs sparsity.pattern=nm"),
        ({"forward": None}, "sparsity.forward=null needs sparsity.pattern=nm"),
        ({"pattern": "blocks"}, "sparsity.pattern='blocks' is not known; allowed: block, nm"),
        ({"block": [2, 4], "backend": "sparse"}, r"cannot run sparsity.block=\[2, 4\]: its BSR kernels take square blocks only.*backend=masked"),
        ({**STRUCTURES["nm2:4"], "backend": "sparse"}, r"cannot run sparsity.nm=\[2, 4\]: N:M .*backend=masked"),
    ],
)
def test_bad_values(kwargs, match):
    with pytest.raises(UserError, match=match):
        TopKAST(**{"forward": 0.8, "backward": 0.6, **kwargs})


def test_a_structure_that_does_not_fit_a_layer_names_it():
    with pytest.raises(UserError, match=r"block=\[3, 3\] does not divide layer 2: its weight \(64, 64\) is a 64 x 64"):
        method({"block": [3, 3]}).attach(mlp())
    with pytest.raises(UserError, match=r"nm=\[2, 16\] does not fit layer 2: .* 72 inputs per output"):
        TopKAST(None, pattern="nm", nm=[2, 16]).attach(convnet())


@pytest.mark.parametrize("kwargs, why", [({"block": [4, 1]}, "square blocks only"), (STRUCTURES["nm2:4"], "N:M")])
def test_auto_keeps_what_bsr_cannot_run_masked_and_says_why(kwargs, why):
    m = method(kwargs, backend="auto").attach(mlp(), example=torch.randn(4, 20))
    assert set(m.backends().values()) == {"masked"}
    assert all(why in note for note in m.backend_notes.values())


# ------------------------------------------------------------------- through the trainer
BASE = [a for a in TINY if not a.startswith("sparsity.")] + ["sparsity.refresh_interval=5"]
RUNS = {
    # the default 1-D CNN: 25 x 75, 25 x 75 and 10 x 475 matrices
    "block": ["sparsity.block=[5,5]"],
    "nm": ["sparsity.pattern=nm", "sparsity.nm=[1,5]", "sparsity.forward=null"],
}


@pytest.mark.parametrize("name", RUNS)
def test_resume_is_exact(tmp_path, name):
    common = [*BASE, *RUNS[name], "sparsity.exploration_steps=15", "trainer.deterministic=true",
              "trainer.max_steps=24", "trainer.eval_every=4", "trainer.checkpoint_every=4", "trainer.tensorboard=false"]
    try:
        train(make_config(common), tmp_path / "straight")
        train(make_config([*common, "trainer.max_steps=12"]), tmp_path / "split")
        train(make_config([*common, "resume=auto"]), tmp_path / "split")
    finally:
        torch.use_deterministic_algorithms(False)
    a, b = (load_checkpoint(tmp_path / d / "checkpoints" / "last.ckpt") for d in ("straight", "split"))
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for key in a["masks"]:
        for which in ("forward", "backward"):
            assert torch.equal(a["masks"][key][which], b["masks"][key][which]), key
    assert read_jsonl(tmp_path / "straight" / "metrics.jsonl") == read_jsonl(tmp_path / "split" / "metrics.jsonl")
    records = read_jsonl(tmp_path / "straight" / "sparsity.jsonl")
    assert any(l["churn"] > 0 for r in records if r["step"] > 0 for l in r["layers"].values()), "masks should move"
    expected = 0.2 if name == "nm" else 0.1
    assert records[-1]["forward_density"] == pytest.approx(expected, abs=0.005)  # (rounding to whole blocks)


@pytest.fixture(scope="module")
def block_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("block-run")
    summary = train(make_config([*BASE, *RUNS["block"], "trainer.tensorboard=false"]), run_dir)
    return run_dir, summary


def test_export_of_a_block_sparse_model_keeps_whole_blocks(block_run):
    run_dir, _ = block_run
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    report = export_checkpoint(make_config([f"ckpt={ckpt}"], config_name="export"))
    plain = torch.load(report["plain"], weights_only=True)
    csr = torch.load(report["csr"], weights_only=True)
    masks = load_checkpoint(ckpt)["masks"]
    for name, entry in ((k, v) for k, v in csr.items() if isinstance(v, dict)):
        weight = plain[name]
        assert torch.equal(dense_from_csr(entry), weight)
        nonzero = weight.reshape(weight.shape[0] // 5, 5, -1, 5).ne(0).any(dim=3).any(dim=1)
        assert int(nonzero.sum()) <= int(masks[name]["forward"].sum()) // 25  # only A's blocks hold weights
        assert torch.equal(weight == 0, ~masks[name]["forward"] | (weight == 0))
    assert report["density"]["sparse_density"] <= 0.1 + 1e-9
    bsr = torch.load(report["bsr"], weights_only=True)
    assert set(bsr) == set(plain) and report["bsr_bytes"] < report["plain_bytes"]
    for name, entry in ((k, v) for k, v in bsr.items() if isinstance(v, dict)):
        assert entry["layout"] == "bsr" and entry["blocksize"] == [5, 5] and entry["values"].shape[1:] == (5, 5)
        assert torch.equal(dense_from_bsr(entry), plain[name])
        assert entry["values"].shape[0] <= int(masks[name]["forward"].sum()) // 25
    assert evaluate_checkpoint(eval_config(ckpt))["metrics"]["acc1"] == block_run[1]["final"]["acc1"]


def test_a_checkpoint_from_before_structures_resumes(block_run):
    """Its config has no sparsity.block / pattern / nm: it was unstructured."""
    run_dir, _ = block_run
    state = load_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    cfg = make_config(BASE)
    m = TopKAST(**{k: v for k, v in cfg.sparsity.items() if k != "_target_"})
    for key in ("block", "pattern", "nm"):
        del state["config"]["sparsity"][key]
    check_fits(state, cfg, "old.ckpt", m)
    with pytest.raises(UserError, match=r"sparsity.block=\[1, 1\], the config has sparsity.block=\[5, 5\]"):
        check_fits(state, make_config([*BASE, *RUNS["block"]]), "old.ckpt", m)


# --------------------------------------------------------- blocks on the sparse backend (BSR)
def pointwise():
    """1x1 convolutions (one strided) behind a dense first one, then a Linear layer: sparse
    32 x 16, 16 x 32 and 16 x 16 matrices."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 1), nn.ReLU(), nn.Conv2d(16, 32, 1), nn.ReLU(), nn.Conv2d(32, 16, 1, stride=2), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 16),  # (16 outputs: 4 blocks of 8x8, labels below 8)
    )


BSR_NETS = {"mlp": (mlp, mlp_batch), "pointwise": (pointwise, conv_batch)}  # dense first: 64x64, 8x64 in the MLP


def both_backends(make, kwargs):
    """The same model and method on `masked` and on `sparse` (the same θ, so the same masks)."""
    out = []
    for backend in ("masked", "sparse"):
        model = make()
        m = method(kwargs, backend=backend).attach(model)
        assert set(m.backends().values()) == {backend}
        if backend == "sparse":
            assert all(l._compute.pattern.blocks.size == tuple(kwargs["block"]) for l in m.layers), "BSR"
        out.append((model, m))
    return out


@pytest.mark.parametrize("block", [[2, 2], [4, 4], [8, 8]])
@pytest.mark.parametrize("net", BSR_NETS)
def test_bsr_output_and_gradients_are_the_masked_backends(net, block):
    make, data = BSR_NETS[net]
    (masked, a), (sparse, b) = both_backends(make, {"block": block})
    x, y = data(0)
    xs = [x.clone().requires_grad_(True) for _ in range(2)]
    outs = [model(xi) for model, xi in zip((masked, sparse), xs)]
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-6)
    for out in outs:
        F.cross_entropy(out, y).backward()
    torch.testing.assert_close(xs[1].grad, xs[0].grad, rtol=1e-5, atol=1e-7)  # the input gradient, through α^T in BSR
    for mine, theirs in zip(b.layers, a.layers):
        assert torch.equal(mine.forward, theirs.forward) and torch.equal(mine.backward, theirs.backward)
        grad = grad_of(mine)
        torch.testing.assert_close(grad, theirs.trained.grad, rtol=1e-5, atol=1e-7)
        assert not grad[~mine.backward].any() and grad[mine.backward & ~mine.forward].abs().sum() > 0
    for p, q in zip(sparse.parameters(), masked.parameters()):
        if p.requires_grad:  # biases and the dense layers
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("opt", OPTIMIZERS)
@pytest.mark.parametrize("block", [[2, 2], [4, 4]])
@pytest.mark.parametrize("net", BSR_NETS)
def test_bsr_trains_as_the_masked_backend_and_nothing_outside_b_moves(net, block, opt):
    """Through refreshes that change B: exact k in blocks, whole blocks, B ⊇ A, the top blocks;
    outside B nothing moves; and the masked backend's masks, θ and optimizer state."""
    make, data = BSR_NETS[net]
    runs = both_backends(make, {"block": block, "refresh_interval": 2, "regularization": 0.05})
    optimizers = [build_optimizer(OPTIMIZERS[opt], model, m) for model, m in runs]
    b_moved = 0
    for i in range(8):
        m = runs[1][1]
        before = [(l.theta.detach().clone(), l.backward.clone()) for l in m.layers]
        for (model, mi), optimizer in zip(runs, optimizers):
            step(model, mi, optimizer, i, data(i))
        check_masks(m, m.structure, top=False)  # (θ trained on since the refresh)
        for layer, (theta, b) in zip(m.layers, before):
            assert torch.equal(layer.theta.detach()[~b], theta[~b]), f"step {i}: {layer.name} moved outside B"
            assert not torch.equal(layer.theta.detach()[b], theta[b]), "B trains"
            b_moved += not torch.equal(layer.backward, b)
    assert b_moved, "the test needs refreshes that change B"
    (_, masked), (_, sparse) = runs
    for mine, theirs in zip(sparse.layers, masked.layers):
        assert torch.equal(mine.forward, theirs.forward) and torch.equal(mine.backward, theirs.backward), mine.name
        torch.testing.assert_close(mine.theta, theirs.theta, rtol=1e-4, atol=1e-5)
        for key, value in optimizers[0].state[theirs.trained].items():
            if torch.is_tensor(value) and value.dim():
                torch.testing.assert_close(state_of(optimizers[1], mine, key), value, rtol=1e-3, atol=1e-6)


def test_auto_times_block_layers_and_chooses_per_layer(monkeypatch):
    from topkast_cli.sparsity import backend_choice

    # Timings made up per layer: the first Linear gains from BSR, the second loses.
    def seconds(layer, x, grad):
        layer.module(x).backward(grad)  # (it runs, on either side)
        assert layer.backend == "masked" or layer._compute.pattern.blocks is not None
        return {"masked": 1.0, "sparse": 0.5 if layer.module is model[2] else 2.0}[layer.backend]

    monkeypatch.setattr(backend_choice, "_seconds", seconds)
    model = mlp()
    m = method({"block": [4, 4]}, backend="auto").attach(model, example=torch.randn(4, 20))
    assert m.backends() == {"2.weight": "sparse", "4.weight": "masked"}
    assert m.backend_notes["2"].startswith("sparse (forward+backward 500.00 ms sparse, 1000.00 ms masked)")
    assert m.layers[0]._compute.pattern.blocks.size == (4, 4)
    monkeypatch.undo()
    real = method({"block": [4, 4]}, backend="auto").attach(mlp(), example=torch.randn(4, 20))
    assert all("ms sparse" in note for note in real.backend_notes.values()), real.backend_notes


# Through the trainer: an MLP on MNIST-1D, 64x40 and 64x64 in 8x8 blocks (the 10-way classifier dense).
BSR_RUN = [*BASE, "model=mlp", "model.hidden=[64,64]", "sparsity.dense_first=false", "sparsity.dense_layers=[net.5]",
           "sparsity.block=[8,8]", "sparsity.exploration_steps=15", "sparsity.regularization=0.01",
           "trainer.deterministic=true", "trainer.max_steps=24", "trainer.eval_every=4", "trainer.checkpoint_every=4",
           "trainer.tensorboard=false"]


@pytest.fixture(scope="module")
def bsr_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("bsr-runs")
    summaries = {}
    try:
        for name, first, second in [("masked", "masked", None), ("sparse", "sparse", None),
                                    ("sparse-split", "sparse", "sparse"), ("masked-then-sparse", "masked", "sparse")]:
            if second is None:
                summaries[name] = train(make_config([*BSR_RUN, f"sparsity.backend={first}"]), root / name)
            else:
                train(make_config([*BSR_RUN, f"sparsity.backend={first}", "trainer.max_steps=12"]), root / name)
                summaries[name] = train(make_config([*BSR_RUN, f"sparsity.backend={second}", "resume=auto"]), root / name)
    finally:
        torch.use_deterministic_algorithms(False)
    return root, summaries


def test_bsr_resume_is_exact_and_matches_the_masked_backend(bsr_runs):
    root, summaries = bsr_runs
    assert set(summaries["sparse"]["backends"].values()) == {"sparse"}
    assert set(summaries["masked-then-sparse"]["backends"].values()) == {"sparse"}
    ckpt = {name: load_checkpoint(root / name / "checkpoints" / "last.ckpt") for name in summaries}
    straight, split = ckpt["sparse"], ckpt["sparse-split"]
    assert straight["sparsity"]["extra"]["locked"]
    for key in straight["model"]:
        assert torch.equal(straight["model"][key], split["model"][key]), key
    for key in straight["masks"]:
        for which in ("forward", "backward"):
            assert torch.equal(straight["masks"][key][which], split["masks"][key][which]), key
    assert read_jsonl(root / "sparse" / "metrics.jsonl") == read_jsonl(root / "sparse-split" / "metrics.jsonl")
    records = read_jsonl(root / "sparse" / "sparsity.jsonl")
    assert any(l["churn"] > 0 for r in records if r["step"] > 0 for l in r["layers"].values()), "masks should move"
    reference = ckpt["masked"]
    for name in ("sparse", "masked-then-sparse"):
        for key, masks in reference["masks"].items():
            assert torch.equal(masks["forward"], ckpt[name]["masks"][key]["forward"]), (name, key)
            assert torch.equal(masks["backward"], ckpt[name]["masks"][key]["backward"]), (name, key)
        for key, value in reference["model"].items():
            torch.testing.assert_close(ckpt[name]["model"][key], value, rtol=1e-4, atol=1e-5, msg=f"{name}: {key}")


def test_export_of_a_bsr_run_is_the_masked_runs(bsr_runs):
    root, _ = bsr_runs
    reports = {name: export_checkpoint(make_config([f"ckpt={root / name / 'checkpoints' / 'last.ckpt'}"], config_name="export"))
               for name in ("masked", "sparse")}
    plain = {name: torch.load(r["plain"], weights_only=True) for name, r in reports.items()}
    bsr = {name: torch.load(r["bsr"], weights_only=True) for name, r in reports.items()}
    assert set(plain["sparse"]) == set(plain["masked"]) and set(bsr["sparse"]) == set(bsr["masked"])
    for key, value in plain["masked"].items():
        torch.testing.assert_close(plain["sparse"][key], value, rtol=1e-4, atol=1e-5)
    for key, entry in ((k, v) for k, v in bsr["sparse"].items() if isinstance(v, dict)):
        assert entry["blocksize"] == [8, 8] and torch.equal(dense_from_bsr(entry), plain["sparse"][key])
        assert torch.equal(entry["col_indices"], bsr["masked"][key]["col_indices"])
    assert reports["sparse"]["density"] == pytest.approx(reports["masked"]["density"])
