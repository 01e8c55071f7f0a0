"""Static, SET, RigL and GMP: each one's defining rule, exact counts, frozen inactive weights,
and exact resume through the trainer."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import BACKENDS, OPTIMIZERS, TINY, batch, make_config, net, split_run_matches, state_of, step
from test_eval import eval_config
from topkast_cli.errors import UserError
from topkast_cli.evaluate import evaluate_checkpoint
from topkast_cli.run_logs import read_jsonl
from topkast_cli.sparsity import GMP, SET, RigL, Static
from topkast_cli.commands.train import train
from topkast_cli.run import build_optimizer

METHODS = {
    "static": lambda b: Static(0.9, regularization=0.01, backend=b),
    "set": lambda b: SET(0.9, update_interval=2, drop_fraction=0.3, regularization=0.01, backend=b),
    "rigl": lambda b: RigL(0.9, update_interval=2, drop_fraction=0.3, end_steps=10, regularization=0.01, backend=b),
}
# Each method on every backend that runs it (RigL's dense-gradient capture: masked only).
CASES = [(name, b) for name in METHODS for b in BACKENDS if not (name == "rigl" and b == "sparse")]


@pytest.mark.parametrize("name, backend", CASES)
def test_exact_counts_at_every_step_and_b_equals_a(name, backend):
    model = net()
    method = METHODS[name](backend).attach(model)
    optimizer = build_optimizer(lambda g: torch.optim.SGD(g, lr=0.1), model, method)
    for i in range(12):
        for layer in method.layers:
            assert int(layer.forward.sum()) == round(0.1 * layer.numel) == layer.k_forward
            assert torch.equal(layer.forward, layer.backward)
        step(model, method, optimizer, i)


@pytest.mark.parametrize("opt", OPTIMIZERS)
@pytest.mark.parametrize("name, backend", CASES)
def test_inactive_weights_are_frozen_and_grown_ones_start_at_zero(name, backend, opt):
    model = net()
    method = METHODS[name](backend)
    method.attach(model)
    optimizer = build_optimizer(OPTIMIZERS[opt], model, method)
    updates = 0
    for i in range(10):
        before = [(l.theta.detach().clone(), l.forward.clone()) for l in method.layers]
        changed = step(model, method, optimizer, i)
        updates += changed
        for layer, (theta, active) in zip(method.layers, before):
            now = layer.theta.detach()
            born = layer.forward & ~active
            assert torch.equal(now[~active & ~born], theta[~active & ~born]), f"step {i}: {layer.name} moved"
            assert bool((now[born] == 0).all()), "grown weights start at zero"
            assert not torch.equal(now[active], theta[active]), "active weights train"
            if born.any():  # fresh optimizer state for grown weights
                for key, value in optimizer.state[layer.trained].items():
                    if torch.is_tensor(value) and value.shape == layer.trained.shape:
                        assert bool((state_of(optimizer, layer, key)[born] == 0).all())
    assert updates == (0 if name == "static" else 5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_static_masks_never_change_and_differ_by_seed(backend):
    model = net()
    method = Static(0.8, backend=backend).attach(model)
    first = [l.forward.clone() for l in method.layers]
    optimizer = build_optimizer(lambda g: torch.optim.Adam(g, lr=0.1), model, method)
    for i in range(5):
        assert not step(model, method, optimizer, i)
    assert all(torch.equal(a, l.forward) for a, l in zip(first, method.layers))
    torch.manual_seed(1)
    other = Static(0.8).attach(nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 5)))
    assert not torch.equal(other.layers[0].forward, first[0]), "a random mask, not a fixed pattern"


def test_drop_removes_exactly_the_smallest_active_magnitudes():
    model = net()
    method = SET(0.5, update_interval=1, drop_fraction=0.25).attach(model)
    layer = method.layers[0]
    theta, active = layer.theta.detach(), layer.forward.clone()
    n = round(0.25 * layer.k_forward)
    # Grow scores that rank every inactive entry first: the dropped ones are then not regrown.
    scores = torch.rand(theta.shape) + 2 * (~active).float()
    smallest = theta.abs().masked_fill(~active, math.inf).view(-1).topk(n, largest=False).indices
    method.drop_and_grow(layer, n, scores, None)
    dropped = active & ~layer.forward
    expected = torch.zeros(theta.numel(), dtype=torch.bool)
    expected[smallest] = True
    assert torch.equal(dropped, expected.view_as(active))
    grown = layer.forward & ~active
    assert int(grown.sum()) == n and int(layer.forward.sum()) == layer.k_forward
    assert bool((theta[grown] == 0).all())


def test_rigl_regrows_exactly_the_highest_gradient_inactive_weights():
    model = net()
    method = RigL(0.8, update_interval=1, drop_fraction=0.2, decay="constant", end_steps=None).attach(model)
    layer = method.layers[0]
    old = layer.forward.clone()
    # The dense gradient of the step, computed by hand on a copy without masks.
    x, y = batch(0)
    reference = net()
    with torch.no_grad():
        for m_ref, m in zip(reference, model):
            if isinstance(m, nn.Linear):
                m_ref.bias.copy_(m.bias)
                m_ref.weight.copy_(m.weight)  # α
    F.cross_entropy(reference(x), y).backward()
    dense_grad = reference[2].weight.grad.abs()

    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: θ stays, only masks move
    method.before_forward(0)
    F.cross_entropy(model(x), y).backward()
    method.after_backward(0)
    assert bool((layer.theta.grad[~old] == 0).all()), "the optimizer only sees gradients on A"
    optimizer.step()
    method.after_step(1, optimizer)

    n = round(0.2 * layer.k_forward)
    magnitude = layer.theta.detach().abs().masked_fill(~old, -math.inf).view(-1)
    kept = torch.zeros_like(old).view(-1)
    kept[magnitude.topk(layer.k_forward - n).indices] = True
    kept = kept.view_as(old)
    assert bool((layer.forward & kept).sum() == layer.k_forward - n)
    grown = layer.forward & ~kept  # may include dropped weights whose gradient is large
    assert int(grown.sum()) == n and int(layer.forward.sum()) == layer.k_forward
    candidates = dense_grad.masked_fill(kept, -math.inf)
    expected = torch.zeros_like(old).view(-1)
    expected[candidates.view(-1).topk(n).indices] = True
    assert torch.equal(grown, expected.view_as(old))
    # The layer is back to gradients on A = B (one mask) after the update step.
    assert layer.backward is layer.forward
    x, y = batch(1)
    optimizer.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    assert bool((layer.theta.grad[~layer.forward] == 0).all())


def test_rigl_drop_fraction_decays_along_a_cosine_and_updates_end():
    method = RigL(0.9, update_interval=10, drop_fraction=0.4, end_steps=100)
    method.layers = [object()]  # only the schedule is read
    assert method.fraction(0) == pytest.approx(0.4)
    assert method.fraction(50) == pytest.approx(0.2)
    assert method.fraction(100) == pytest.approx(0.0, abs=1e-12)
    assert method.update_due(100) and not method.update_due(110) and not method.update_due(95)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gmp_follows_the_cubic_schedule_and_only_prunes(backend):
    model = net()
    method = GMP(0.9, begin_steps=2, end_steps=8, prune_interval=2, backend=backend).attach(model)
    optimizer = build_optimizer(lambda g: torch.optim.SGD(g, lr=0.1), model, method)
    layer = method.layers[0]
    assert bool(layer.forward.all()) and method.phase(0) == "prune"
    counts, previous = [], layer.forward.clone()
    for i in range(10):
        step(model, method, optimizer, i)
        counts.append(int(layer.forward.sum()))
        assert not bool((layer.forward & ~previous).any()), "pruning never regrows"
        previous = layer.forward.clone()
    n, k = layer.numel, layer.k_forward
    assert counts[:2] == [n, n]
    assert counts[3] == k + round((n - k) * (1 - 2 / 6) ** 3)  # step 4
    assert counts[5] == k + round((n - k) * (1 - 4 / 6) ** 3)  # step 6
    assert counts[7:] == [k, k, k] and method.phase(10) == "fixed"


def test_gmp_prunes_by_magnitude():
    model = net()
    method = GMP(0.5, begin_steps=0, end_steps=0).attach(model)
    for layer in method.layers:
        theta = layer.theta.detach().abs()
        assert int(layer.forward.sum()) == layer.k_forward
        assert float(theta[layer.forward].min()) >= float(theta[~layer.forward].max())


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: SET(0.9, update_interval=0), "update_interval"),
        (lambda: RigL(0.9, drop_fraction=1.5), "drop_fraction"),
        (lambda: SET(0.9, decay="linear"), "decay"),
        (lambda: GMP(0.9, begin_steps=50, end_steps=10), "after"),
        (lambda: GMP(0.9, prune_interval=0), "prune_interval"),
        (lambda: Static(1.2), "sparsity.forward"),
    ],
)
def test_bad_values(make, match):
    with pytest.raises(UserError, match=match):
        make()


RESUME = {
    "static": [],
    "set": ["sparsity.update_interval=3", "sparsity.end_steps=18"],
    "rigl": ["sparsity.update_interval=3", "sparsity.end_steps=18"],
    "gmp": ["sparsity.begin_steps=3", "sparsity.end_steps=18", "sparsity.prune_interval=3"],
}


@pytest.mark.parametrize("name", RESUME)
def test_resume_is_exact(tmp_path, name):
    tiny = [o for o in TINY if not o.startswith("sparsity.")]
    common = [*tiny, f"sparsity={name}", *RESUME[name], "trainer.deterministic=true", "trainer.max_steps=24",
              "trainer.eval_every=4", "trainer.checkpoint_every=4", "optimizer=sgd", "optimizer.lr=0.05",
              "trainer.tensorboard=false"]
    split_run_matches(tmp_path, common, 12)  # (stopped at an update step)
    churn = [r["layers"] for r in read_jsonl(tmp_path / "straight" / "sparsity.jsonl") if r["step"] > 0]
    assert name == "static" or any(l["churn"] > 0 for r in churn for l in r.values()), "masks should move"


@pytest.mark.parametrize("name", ["set", "gmp"])
def test_eval_rebuilds_the_method_from_the_checkpoint(tmp_path, name):
    # GMP's schedule points are fractions of the run: eval must resolve them the same way.
    tiny = [o for o in TINY if not o.startswith("sparsity.")]
    summary = train(make_config([*tiny, f"sparsity={name}", "trainer.tensorboard=false"]), tmp_path)
    report = evaluate_checkpoint(eval_config(tmp_path / "checkpoints" / "last.ckpt"))
    assert report["metrics"]["acc1"] == summary["final"]["acc1"]


def test_a_resumed_method_with_b_equal_a_keeps_one_mask():
    model = net()
    method = SET(0.8).attach(model)
    assert all(l.backward is l.forward for l in method.layers)
    other = SET(0.8).attach(net())
    other.load_state_dict(method.state_dict())
    assert all(l.backward is l.forward for l in other.layers)
    assert all(torch.equal(a.forward, b.forward) for a, b in zip(method.layers, other.layers))
