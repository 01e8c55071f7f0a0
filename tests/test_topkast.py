import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import BACKENDS, OPTIMIZERS, batch, grad_of, net, state_of, step
from topkast_cli.errors import UserError
from topkast_cli.sparsity import TopKAST
from topkast_cli.run import build_optimizer


@pytest.mark.parametrize("backend", BACKENDS)
def test_exact_counts_every_layer(backend):
    model = net()
    method = TopKAST(0.9, 0.8, refresh_interval=1, backend=backend).attach(model)
    opt = build_optimizer(lambda g: torch.optim.SGD(g, lr=0.1), model, method)
    for i in range(3):
        for layer in method.layers:
            assert int(layer.forward.sum()) == round(0.1 * layer.numel)
            assert int(layer.backward.sum()) == round(0.2 * layer.numel)
            assert bool((layer.backward | ~layer.forward).all())
        step(model, method, opt, i)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_entries_outside_b_are_frozen_also_after_a_refresh(name, backend):
    model = net()
    method = TopKAST(0.7, 0.5, refresh_interval=2, regularization=0.01, backend=backend).attach(model)
    optimizer = build_optimizer(OPTIMIZERS[name], model, method)
    refreshes_that_moved_b = 0
    for i in range(12):
        before = [(l.theta.detach().clone(), l.backward.clone()) for l in method.layers]
        changed = step(model, method, optimizer, i)
        for layer, (theta, b) in zip(method.layers, before):
            outside = ~b
            assert torch.equal(layer.theta.detach()[outside], theta[outside]), f"step {i}: {layer.name} moved outside B"
            assert not torch.equal(layer.theta.detach()[b], theta[b]), "entries in B should train"
        if changed:
            refreshes_that_moved_b += sum(not torch.equal(l.backward, b) for l, (_, b) in zip(method.layers, before))
    assert refreshes_that_moved_b > 0, "the test needs refreshes that change B"


@pytest.mark.parametrize("backend", BACKENDS)
def test_optimizer_state_of_entries_leaving_b_is_zeroed(backend):
    model = net()
    method = TopKAST(0.7, 0.5, refresh_interval=1, backend=backend).attach(model)
    optimizer = build_optimizer(lambda g: torch.optim.SGD(g, lr=0.5, momentum=0.9), model, method)
    for i in range(6):
        old = [l.backward.clone() for l in method.layers]
        step(model, method, optimizer, i)
        for layer, b in zip(method.layers, old):
            left = b & ~layer.backward
            buf = state_of(optimizer, layer, "momentum_buffer")
            assert torch.equal(buf[~layer.backward], torch.zeros_like(buf[~layer.backward]))
            if left.any():
                return
    pytest.fail("no entry left B during the test")


@pytest.mark.parametrize("backend", BACKENDS)
def test_regulariser_gradient(backend):
    model = net()
    lam = 0.1
    method = TopKAST(0.9, 0.6, regularization=lam, backend=backend).attach(model)
    x, y = batch(0)
    F.cross_entropy(model(x), y).backward()
    plain = [grad_of(l).clone() for l in method.layers]
    method.after_backward(0)
    for layer, g0 in zip(method.layers, plain):
        added = grad_of(layer) - g0
        theta, a, b = layer.theta.detach(), layer.forward, layer.backward
        d = layer.k_forward / layer.numel
        torch.testing.assert_close(added[a], lam * theta[a])
        torch.testing.assert_close(added[b & ~a], lam / d * theta[b & ~a])
        assert torch.equal(added[~b], torch.zeros_like(added[~b]))
    expected = sum(0.5 * lam * float((l.theta.detach() ** 2 * (l.forward + (l.backward & ~l.forward) / l.density)).sum()) for l in method.layers)
    assert math.isclose(method.regularization(), expected, rel_tol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_refresh_interval_and_refinement_lock(backend):
    model = net()
    method = TopKAST(0.8, 0.6, refresh_interval=3, exploration_steps=9, backend=backend).attach(model)
    opt = build_optimizer(lambda g: torch.optim.SGD(g, lr=0.5), model, method)
    changed_at = [i + 1 for i in range(20) if step(model, method, opt, i)]
    assert changed_at == [3, 6, 9]
    assert method.phase(12) == "refine"
    masks = [(l.forward.clone(), l.backward.clone()) for l in method.layers]
    for layer, (f, b) in zip(method.layers, masks):
        assert torch.equal(f, b), "after exploration B = A"
    for i in range(20, 30):
        step(model, method, opt, i)
    for layer, (f, b) in zip(method.layers, masks):
        assert torch.equal(layer.forward, f) and torch.equal(layer.backward, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_masks_follow_magnitudes_and_churn(backend):
    model = net()
    method = TopKAST(0.9, 0.8, refresh_interval=1, backend=backend).attach(model)
    opt = build_optimizer(lambda g: torch.optim.SGD(g, lr=1.0), model, method)
    step(model, method, opt, 0)
    for layer in method.layers:
        mag = layer.theta.detach().abs()
        assert mag[layer.forward].min() >= mag[~layer.forward].max()
    assert method.report(1)["layers"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_reenters_with_stored_theta(backend):
    model = nn.Sequential(nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False))
    method = TopKAST(0.5, 0.5, dense_first=False, backend=backend).attach(model)
    layer = method.layers[0]
    theta = layer.theta
    with torch.no_grad():
        theta.copy_(torch.arange(16.0).view(4, 4) + 1)
    method.after_step(100)  # refresh: top 8 = values 9..16
    with torch.no_grad():
        theta[0, 0] = 100.0  # an entry outside A grows (e.g. loaded); it re-enters with its θ
    method.after_step(200)
    assert bool(layer.forward[0, 0]) and float(model[0].weight.detach()[0, 0]) == 100.0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"forward": 1.5}, "sparsity.forward"),
        ({"forward": -0.1}, "sparsity.forward"),
        ({"forward": 0.8, "backward": 0.9}, "above sparsity.forward"),
        ({"refresh_interval": 0}, "refresh_interval"),
        ({"exploration_steps": -1}, "exploration_steps"),
        ({"exploration_steps": 1.5}, "exploration_steps"),
        ({"regularization": -1.0}, "regularization"),
        ({"distribution": "banana"}, "distribution"),
    ],
)
def test_bad_values(kwargs, match):
    with pytest.raises(UserError, match=match):
        TopKAST(**kwargs)


def test_a_layer_left_empty_is_named():
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    with pytest.raises(UserError, match="layer 1"):
        TopKAST(0.9, 0.8).attach(model)


@pytest.mark.parametrize("backend", BACKENDS)
def test_state_dict_round_trip(backend):
    model = net()
    method = TopKAST(0.8, 0.6, refresh_interval=2, exploration_steps=4, backend=backend).attach(model)
    opt = build_optimizer(lambda g: torch.optim.SGD(g, lr=0.5), model, method)
    for i in range(5):
        step(model, method, opt, i)
    state = method.state_dict()
    other = TopKAST(0.8, 0.6, refresh_interval=2, exploration_steps=4, backend=backend).attach(net())
    other.load_state_dict(state)
    assert other.phase(4) == method.phase(4) == "refine"
    for a, b in zip(method.layers, other.layers):
        assert torch.equal(a.forward, b.forward) and torch.equal(a.backward, b.backward)


def test_exploration_as_a_fraction_of_the_run():
    method = TopKAST(0.8, 0.6, refresh_interval=2, exploration_steps=0.5).attach(net(), total_steps=20)
    assert method.schedule.end == 10
    model = net()
    method = TopKAST(0.8, 0.6, refresh_interval=2, exploration_steps=0.5).attach(model, total_steps=20)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    changed_at = [i + 1 for i in range(20) if step(model, method, opt, i)]
    assert changed_at == [2, 4, 6, 8, 10] and method.phase(12) == "refine"
