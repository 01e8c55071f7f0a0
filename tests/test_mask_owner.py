"""`SparseLayer` is the one owner of a layer's masks: they are stored once, as bool tensors,
in the compute side; only `set_masks` changes them; RigL's dense-gradient capture leaves them
(and the optimizer state) as they were."""

import pytest
import torch
import torch.nn.functional as F

from conftest import BACKENDS, batch, grad_of, net, state_of, step
from topkast_cli.errors import UserError
from topkast_cli.run import build_optimizer
from topkast_cli.sparsity import GMP, SET, RigL, Static, TopKAST

METHODS = {
    "topkast": lambda b: TopKAST(0.8, 0.6, refresh_interval=2, exploration_steps=6, regularization=0.01, backend=b),
    "static": lambda b: Static(0.8, backend=b),
    "set": lambda b: SET(0.8, update_interval=2, backend=b),
    "rigl": lambda b: RigL(0.8, update_interval=2, end_steps=None, backend=b),
    "gmp": lambda b: GMP(0.8, begin_steps=0, end_steps=6, prune_interval=2, backend=b),
}
# Every method on every backend that runs it (RigL's dense-gradient capture: masked only).
CASES = [(name, b) for name in METHODS for b in BACKENDS if not (name == "rigl" and b == "sparse")]


def compute_side(layer):
    (param,) = layer.module.parametrizations.weight
    return param


def tensors_of(module):
    return [v for v in vars(module).values() if torch.is_tensor(v)]


@pytest.mark.parametrize("name, backend", CASES)
def test_masks_are_bool_stored_once_and_b_is_a_when_equal(name, backend):
    model = net()
    method = METHODS[name](backend).attach(model)
    optimizer = build_optimizer(lambda g: torch.optim.SGD(g, lr=0.1), model, method)
    for i in range(8):
        for layer in method.layers:
            side = compute_side(layer)
            assert layer.forward.dtype == layer.backward.dtype == torch.bool
            # What the layer reads is what the compute side uses, not a copy.
            assert layer.forward is side.forward_mask and layer.backward is side.backward_mask
            # At most one byte per weight per mask, nothing else of θ's size held (the sparse
            # backend also holds B's values, the tensor the optimizer trains, |B| long) but
            # what the masked backend declares it reuses between steps: α's buffer and the
            # regulariser's factor, never a copy of a mask.
            cache = {t.data_ptr() for t in side.held().get("cache", [])}
            held = {t.data_ptr(): t for t in tensors_of(side) if t is not layer.trained and t.data_ptr() not in cache}
            assert all(t.dtype == torch.bool for t in held.values()) and len(held) <= 2
            assert len(cache) <= 2 and not cache & {layer.forward.data_ptr(), layer.backward.data_ptr()}
            assert layer.trained.numel() == (layer.numel if backend == "masked" else int(layer.backward.sum()))
            if torch.equal(layer.forward, layer.backward):
                assert layer.backward is layer.forward, "B = A is one tensor"
        step(model, method, optimizer, i)


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_layer_computes_with_the_masks_it_reports(backend):
    model = net()
    method = TopKAST(0.8, 0.6, backend=backend).attach(model)
    layer = method.layers[0]
    forward = torch.zeros_like(layer.forward)
    forward.view(-1)[:7] = True
    backward = forward.clone()
    backward.view(-1)[7:20] = True
    layer.set_masks(forward, backward)
    assert layer.forward is forward and layer.backward is backward
    assert torch.equal(model[2].weight, torch.where(forward, layer.theta, 0))
    x, y = batch(0)
    F.cross_entropy(model(x), y).backward()
    grad = grad_of(layer)
    assert bool((grad[~backward] == 0).all()) and bool((grad[backward & ~forward] != 0).any())


@pytest.mark.parametrize("backend", BACKENDS)
def test_set_masks_counts_churn_zeroes_state_leaving_b_and_checks_its_input(backend):
    model = net()
    method = TopKAST(0.5, 0.5, refresh_interval=1, backend=backend).attach(model)
    optimizer = build_optimizer(lambda g: torch.optim.SGD(g, lr=0.1, momentum=0.9), model, method)
    step(model, method, optimizer, 0)
    layer = method.layers[0]
    old = layer.forward.clone()
    kept = state_of(optimizer, layer, "momentum_buffer").clone()
    new = old.clone()
    new.view(-1)[:20] = ~old.view(-1)[:20]  # some entries leave B, some enter
    new = new if int(new.sum()) else ~old
    layer.set_masks(new, new, optimizer)
    buffer = state_of(optimizer, layer, "momentum_buffer")
    assert 0 < layer.churn <= 1.0
    left, stayed = old & ~new, old & new
    assert bool((buffer[left] == 0).all()) and torch.equal(buffer[stayed], kept[stayed])
    assert bool((buffer[new & ~old] == 0).all()), "entries new to B start at zero state"
    new = ~new
    layer.set_masks(new, new, optimizer)
    assert layer.churn == 1.0  # all of A replaced
    with pytest.raises(ValueError, match="bool"):
        layer.set_masks(new.float(), new.float())
    with pytest.raises(ValueError, match="shape"):
        layer.set_masks(new.view(-1), new.view(-1))
    assert layer.forward is new, "a refused change leaves the masks as they were"


def test_a_checkpoint_with_masks_of_another_shape_is_a_user_error():
    method = Static(0.8).attach(net())
    state = method.state_dict()
    name = method.layers[0].name
    state["masks"][name] = {"forward": torch.ones(3, dtype=torch.bool), "backward": torch.ones(3, dtype=torch.bool)}
    with pytest.raises(UserError, match=name):
        Static(0.8).attach(net()).load_state_dict(state)


def test_rigl_capture_leaves_masks_and_optimizer_state_as_they_were():
    model = net()
    method = RigL(0.8, update_interval=3, drop_fraction=0.3, decay="constant", end_steps=None).attach(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    for i in range(2):  # steps 1 and 2: no update, optimizer state exists
        step(model, method, optimizer, i)
    masks = [(l.forward, l.backward, l.forward.clone()) for l in method.layers]
    state = {id(p): {k: v.clone() for k, v in s.items() if torch.is_tensor(v)} for p, s in optimizer.state.items()}

    def unchanged():
        for layer, (f, b, values) in zip(method.layers, masks):
            assert layer.forward is f and layer.backward is b and torch.equal(f, values)
        for p, s in optimizer.state.items():
            for k, v in state[id(p)].items():
                assert torch.equal(s[k], v)

    x, y = batch(2)
    method.before_forward(2)  # step 3 updates: capture the dense gradient
    assert method.capturing
    unchanged()
    optimizer.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    unchanged()
    outside = [(~l.forward) & (l.theta.grad != 0) for l in method.layers]
    assert all(bool(o.any()) for o in outside), "the dense gradient reaches entries outside A"
    method.after_backward(2)
    unchanged()
    assert all(bool((l.theta.grad[~l.forward] == 0).all()) for l in method.layers), "masked back to A"
    optimizer.step()
    assert method.after_step(3, optimizer)
    # After the update the backward pass masks again (no dense gradient left on).
    optimizer.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    assert all(bool((l.theta.grad[~l.backward] == 0).all()) for l in method.layers)


def test_a_skipped_rigl_step_closes_the_capture():
    model = net()
    method = RigL(0.8, update_interval=1, end_steps=None).attach(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = batch(0)
    method.before_forward(0)
    F.cross_entropy(model(x), y).backward()
    method.after_step(1, optimizer)  # no after_backward: the step was skipped
    assert not method.capturing
    optimizer.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    assert all(bool((l.theta.grad[~l.backward] == 0).all()) for l in method.layers)


@pytest.mark.parametrize("backend", BACKENDS)
def test_measured_density_and_dense_weights(backend):
    model = net()
    method = TopKAST(0.75, 0.5, backend=backend).attach(model)
    density = method.measured_density(model)
    sparse = sum(l.numel for l in method.layers)
    assert density["sparse_params"] == sparse
    assert density["sparse_density"] == sum(l.k_forward for l in method.layers) / sparse
    assert density["params"] == sum(p.numel() for p in model.parameters())
    x, _ = batch(0)
    sparse_out = model(x)
    method.use_dense_weights(True)
    assert method.measured_density(model)["sparse_density"] == 1.0
    assert not torch.equal(model(x), sparse_out)
    method.use_dense_weights(False)
    assert torch.equal(model(x), sparse_out)
