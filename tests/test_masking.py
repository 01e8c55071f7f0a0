import copy

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from topkast_cli.sparsity import TopKAST, load_plain_state_dict, plain_state_dict


def small_net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(8 * 6 * 6, 10),
    )


def attach(model, forward=0.8, backward=0.5):
    return TopKAST(forward, backward, dense_first=False).attach(model)


def test_forward_uses_alpha():
    model = small_net()
    reference = copy.deepcopy(model)  # a plain model, weights multiplied by A by hand
    method = attach(model)
    with torch.no_grad():
        for layer in method.layers:
            dict(reference.named_parameters())[layer.name].mul_(layer.forward)
    x = torch.randn(4, 3, 6, 6)
    assert torch.equal(model(x), reference(x))
    assert not torch.equal(model(x), small_net()(x)), "masks must change the output"


def test_gradient_is_dloss_dalpha_on_b_and_zero_elsewhere():
    model = small_net()
    plain = copy.deepcopy(model)
    method = attach(model)
    x, y = torch.randn(4, 3, 6, 6), torch.randint(0, 10, (4,))
    F.cross_entropy(model(x), y).backward()

    # Reference: the same network with α as independent leaves.
    params = {n: p.detach().clone() for n, p in plain.named_parameters()}
    for layer in method.layers:
        params[layer.name] = (params[layer.name] * layer.forward).requires_grad_()
    loss = F.cross_entropy(functional_call(plain, params, (x,)), y)
    grads = torch.autograd.grad(loss, [params[l.name] for l in method.layers])

    for layer, g_alpha in zip(method.layers, grads):
        g = layer.theta.grad
        assert torch.equal(g[~layer.backward], torch.zeros_like(g[~layer.backward]))
        only_b = layer.backward & ~layer.forward
        assert only_b.any()
        torch.testing.assert_close(g[layer.backward], g_alpha[layer.backward])
        assert g[only_b].abs().sum() > 0, "entries of B\\A must get gradient (not θ*mask's zero)"


def test_module_weight_read_directly_is_alpha():
    # Code that reads `.weight` without calling forward (attention, tied weights) sees α.
    model = nn.Sequential(nn.Linear(6, 6), nn.Linear(6, 6))
    method = TopKAST(0.5, 0.5, dense_first=False).attach(model)
    layer = method.layers[0]
    assert torch.equal(model[0].weight, layer.theta * layer.forward)


def test_plain_state_dict_has_dense_names_and_round_trips():
    model = small_net()
    dense_keys = set(model.state_dict())
    attach(model)
    state = plain_state_dict(model)
    assert set(state) == dense_keys
    # Loads into a plain model, and back into a masked one.
    small_net().load_state_dict(state)
    other = small_net()
    attach(other)
    with torch.no_grad():
        for p in other.parameters():
            p.zero_()
    load_plain_state_dict(other, state)
    for k, v in plain_state_dict(other).items():
        assert torch.equal(v, state[k])


def test_dense_evaluation_switch():
    model = small_net()
    reference = copy.deepcopy(model)
    method = attach(model)
    x = torch.randn(2, 3, 6, 6)
    method.use_dense_weights(True)
    assert torch.equal(model(x), reference(x))
    method.use_dense_weights(False)
    assert not torch.equal(model(x), reference(x))
