import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from conftest import BACKENDS, grad_of
from topkast_cli.sparsity import TopKAST, load_plain_state_dict, plain_state_dict

# The sparse backend runs Linear layers and 1x1 convolutions (here one with a stride): its
# network has the same input and output.
NETS = {
    "masked": lambda: nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(8 * 6 * 6, 10),
    ),
    "sparse": lambda: nn.Sequential(
        nn.Conv2d(3, 8, 1), nn.ReLU(),
        nn.Conv2d(8, 8, 1, stride=2, bias=False), nn.ReLU(),
        nn.Flatten(), nn.Linear(8 * 3 * 3, 32), nn.ReLU(), nn.Linear(32, 10),
    ),
}


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


def small_net(backend="masked"):
    torch.manual_seed(0)
    return NETS[backend]()


def attach(model, forward=0.8, backward=0.5, backend="masked"):
    return TopKAST(forward, backward, dense_first=False, backend=backend).attach(model)


def test_forward_uses_alpha(backend):
    model = small_net(backend)
    reference = copy.deepcopy(model)  # a plain model, weights multiplied by A by hand
    method = attach(model, backend=backend)
    with torch.no_grad():
        for layer in method.layers:
            dict(reference.named_parameters())[layer.name].mul_(layer.forward)
    x = torch.randn(4, 3, 6, 6)
    if backend == "masked":
        assert torch.equal(model(x), reference(x))
    else:  # another summation order
        torch.testing.assert_close(model(x), reference(x))
    assert not torch.allclose(model(x), small_net(backend)(x)), "masks must change the output"


def test_gradient_is_dloss_dalpha_on_b_and_zero_elsewhere(backend):
    model = small_net(backend)
    plain = copy.deepcopy(model)
    method = attach(model, backend=backend)
    x, y = torch.randn(4, 3, 6, 6), torch.randint(0, 10, (4,))
    F.cross_entropy(model(x), y).backward()

    # Reference: the same network with α as independent leaves.
    params = {n: p.detach().clone() for n, p in plain.named_parameters()}
    for layer in method.layers:
        params[layer.name] = (params[layer.name] * layer.forward).requires_grad_()
    loss = F.cross_entropy(functional_call(plain, params, (x,)), y)
    grads = torch.autograd.grad(loss, [params[l.name] for l in method.layers])

    for layer, g_alpha in zip(method.layers, grads):
        g = grad_of(layer)
        assert torch.equal(g[~layer.backward], torch.zeros_like(g[~layer.backward]))
        only_b = layer.backward & ~layer.forward
        assert only_b.any()
        torch.testing.assert_close(g[layer.backward], g_alpha[layer.backward])
        assert g[only_b].abs().sum() > 0, "entries of B\\A must get gradient (not θ*mask's zero)"


def test_module_weight_read_directly_is_alpha(backend):
    # Code that reads `.weight` without calling forward (attention, tied weights) sees α, and
    # its gradient reaches B.
    model = nn.Sequential(nn.Linear(6, 6), nn.Linear(6, 6))
    method = TopKAST(0.5, 0.25, dense_first=False, backend=backend).attach(model)
    layer = method.layers[0]
    assert torch.equal(model[0].weight, layer.theta * layer.forward)
    (model[0].weight * torch.arange(36.0).view(6, 6)).sum().backward()
    expected = torch.where(layer.backward, torch.arange(36.0).view(6, 6), 0)
    assert torch.equal(grad_of(layer), expected)


def test_plain_state_dict_has_dense_names_and_round_trips(backend):
    model = small_net(backend)
    dense_keys = set(model.state_dict())
    attach(model, backend=backend)
    state = plain_state_dict(model)
    assert set(state) == dense_keys
    # Loads into a plain model, and back into a sparse one.
    small_net(backend).load_state_dict(state)
    other = small_net(backend)
    attach(other, backend=backend)
    with torch.no_grad():
        for p in other.parameters():
            p.zero_()
    load_plain_state_dict(other, state)
    for k, v in plain_state_dict(other).items():
        assert torch.equal(v, state[k])


def test_dense_evaluation_switch(backend):
    model = small_net(backend)
    reference = copy.deepcopy(model)
    method = attach(model, backend=backend)
    x = torch.randn(2, 3, 6, 6)
    method.use_dense_weights(True)
    assert torch.equal(model(x), reference(x))
    method.use_dense_weights(False)
    assert not torch.equal(model(x), reference(x))


def test_masked_caches_follow_the_masks_across_refreshes():
    """The masked backend reuses α's buffer and keeps the regulariser's factor between mask
    changes: after each refresh both follow the new masks, exactly as computed afresh."""
    model = small_net()
    method = TopKAST(0.8, 0.5, refresh_interval=2, regularization=0.1, dense_first=False).attach(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    x, y = torch.randn(4, 3, 6, 6), torch.randint(0, 10, (4,))
    refreshes = 0
    for i in range(6):
        method.before_forward(i)
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        plain = [layer.theta.grad.clone() for layer in method.layers]
        method.after_backward(i)
        for layer, g in zip(method.layers, plain):
            theta, a, b = layer.theta.detach(), layer.forward, layer.backward
            assert torch.equal(g[~b], torch.zeros_like(g[~b]))
            on_a, on_b = 0.1 * (1 - 1 / layer.density), 0.1 / layer.density  # λ·(a, b)
            factor = torch.where(b, on_b, 0.0).masked_fill_(a, on_a + on_b)  # from this step's masks
            assert torch.equal(layer.theta.grad, g.addcmul(theta, factor))
            with torch.no_grad():  # (evaluation gets a fresh α)
                assert torch.equal(layer.module.weight, torch.where(a, theta, 0))
        before = [l.theta.detach().clone() for l in method.layers]
        masks = [l.backward.clone() for l in method.layers]
        method.before_step(i, optimizer)
        optimizer.step()
        refreshes += method.after_step(i + 1, optimizer)
        for layer, theta, b in zip(method.layers, before, masks):
            assert torch.equal(layer.theta.detach()[~b], theta[~b]), f"step {i}: {layer.name} moved outside B"
        for layer in method.layers:  # the training forward (α's buffer) computes with the new A
            assert torch.equal(layer.module.weight.detach(), torch.where(layer.forward, layer.theta.detach(), 0))
    assert refreshes >= 2


def test_alpha_held_elsewhere_is_never_overwritten():
    """A weight read twice in one pass (tied weights) or kept by the caller gets its own α:
    the buffer is written only when nothing holds the α handed out before."""
    model = small_net()
    method = attach(model)
    layer = method.layers[-1]
    first = layer.module.weight
    kept = first.detach().clone()
    with torch.no_grad():
        layer.theta.add_(1.0)
    second = layer.module.weight
    assert second.data_ptr() != first.data_ptr() and torch.equal(first, kept)
    x = torch.randn(2, 8 * 6 * 6)
    (F.linear(x, first).sum() + F.linear(x, second).sum()).backward()  # both graphs intact
    grad = layer.theta.grad
    assert torch.equal(grad[~layer.backward], torch.zeros_like(grad[~layer.backward]))


def test_gradient_masking_leaves_a_shared_gradient_whole():
    """α read together with another parameter (α + W): autograd hands both the same gradient
    tensor, so masking α's must not touch W's."""
    torch.manual_seed(0)
    layer = nn.Linear(6, 4, bias=False)
    extra = nn.Parameter(torch.zeros(4, 6))
    method = attach(nn.Sequential(layer))
    x = torch.randn(3, 6)
    other = extra * 1.0  # (made before α: autograd reaches α's node first)
    (F.linear(x, other + layer.weight) ** 2).sum().backward()
    sparse = method.layers[0]
    w = (layer.weight.detach() + extra.detach()).requires_grad_()
    (F.linear(x, w) ** 2).sum().backward()
    assert torch.equal(extra.grad, w.grad)  # whole: W's gradient is not masked by B
    assert torch.equal(sparse.theta.grad, torch.where(sparse.backward, w.grad, 0))
