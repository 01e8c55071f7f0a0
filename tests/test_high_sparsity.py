"""The options for high sparsity: the per-entry Adam restart, the decoupled regulariser
(nothing outside B moves), the λ schedule, keeping every unit in A (exact k), the promotions
record, and the collapse warning (and exit 1 on request)."""

import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import BACKENDS, OPTIMIZERS, TINY, batch, grad_of, make_config, net, run_topkast, step
from topkast_cli.errors import RunFailed, UserError
from topkast_cli.health import CollapseWatch
from topkast_cli.run import build_optimizer
from topkast_cli.sparsity import RigL, TopKAST
from topkast_cli.sparsity.topk import topk_masks, topk_masks_every_row


# ------------------------------------------------------------------ per-entry restart
def first_step_of_reentered_entries(restart: str, backend: str = "masked"):
    """Train a few steps with Adam, then push entries out of B and back in (their moments are
    zeroed on the way out) and return (their |Δθ| at the next step, lr)."""
    lr = 0.01
    model = net()
    method = TopKAST(0.7, 0.5, refresh_interval=10**6, moment_restart=restart, backend=backend).attach(model)
    optimizer = build_optimizer(lambda g: torch.optim.Adam(g, lr=lr), model, method)
    for i in range(30):
        step(model, method, optimizer, i)
    layer = method.layers[0]
    old_b, a = layer.backward.clone(), layer.forward
    out = old_b & ~a  # candidates leave B (their state is zeroed) ...
    layer.set_masks(a, a.clone(), optimizer)
    layer.set_masks(a, old_b, optimizer)  # ... and come back with fresh moments
    # late in a run, where Adam's bias corrections are about 1
    optimizer.state[layer.trained]["step"] = torch.tensor(5000.0)
    before = layer.theta.detach().clone()
    x, y = batch(99)
    optimizer.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    moved = grad_of(layer).abs() > 1e-4  # (eps = 1e-8 is negligible next to these)
    method.after_backward(30)
    method.before_step(30, optimizer)
    optimizer.step()
    delta = (layer.theta.detach() - before).abs()
    return delta[out & moved], lr


@pytest.mark.parametrize("backend", BACKENDS)
def test_reentered_entries_take_a_first_step_of_lr_with_the_per_entry_restart(backend):
    delta, lr = first_step_of_reentered_entries("per_entry", backend)
    assert delta.numel() > 10
    torch.testing.assert_close(delta, torch.full_like(delta, lr), rtol=1e-3, atol=1e-7)


def test_without_the_restart_reentered_entries_take_about_3x_lr():
    delta, lr = first_step_of_reentered_entries("zero")
    assert float(delta.median()) > 2.5 * lr  # (1-β1)/sqrt(1-β2) ≈ 3.16 late in a run


# ---------------------------------------------------------------- decoupled penalty
@pytest.mark.parametrize("backend", BACKENDS)
def test_decoupled_penalty_shrinks_theta_by_lr_lambda_s_and_leaves_the_gradient(backend):
    lam, lr = 0.5, 0.1
    model = net()
    method = TopKAST(0.9, 0.6, regularization=lam, regularization_form="decoupled", backend=backend).attach(model)
    optimizer = build_optimizer(lambda g: torch.optim.SGD(g, lr=lr), model, method)
    x, y = batch(0)
    F.cross_entropy(model(x), y).backward()
    plain = [grad_of(l).clone() for l in method.layers]
    before = [l.theta.detach().clone() for l in method.layers]
    method.after_backward(0)
    method.before_step(0, optimizer)
    for layer, g0, theta in zip(method.layers, plain, before):
        assert torch.equal(grad_of(layer), g0), "the decoupled form adds no gradient"
        a, b, d = layer.forward, layer.backward, layer.density
        now = layer.theta.detach()
        torch.testing.assert_close(now[a], theta[a] * (1 - lr * lam))
        torch.testing.assert_close(now[b & ~a], theta[b & ~a] * (1 - lr * lam / d))
        assert torch.equal(now[~b], theta[~b])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", [*OPTIMIZERS, "adam"])
def test_decoupled_penalty_moves_nothing_outside_b(name, backend):
    make = OPTIMIZERS.get(name, lambda g: torch.optim.Adam(g, lr=0.05))
    model = net()
    method = TopKAST(0.7, 0.5, refresh_interval=2, regularization=0.5, regularization_form="decoupled",
                     moment_restart="per_entry", backend=backend).attach(model)
    optimizer = build_optimizer(make, model, method)
    for i in range(12):
        before = [(l.theta.detach().clone(), l.backward.clone()) for l in method.layers]
        step(model, method, optimizer, i)
        for layer, (theta, b) in zip(method.layers, before):
            assert torch.equal(layer.theta.detach()[~b], theta[~b]), f"step {i}: {layer.name} moved outside B"


def test_decoupled_penalty_alone_moves_b_only():
    """With no loss gradient at all, only the penalty acts: B shrinks, the rest is bit-equal."""
    model = net()
    method = TopKAST(0.8, 0.6, regularization=1.0, regularization_form="decoupled").attach(model)
    optimizer = build_optimizer(lambda g: torch.optim.Adam(g, lr=0.1), model, method)
    layer = method.layers[0]
    theta = layer.theta.detach().clone()
    layer.theta.grad = torch.zeros_like(layer.theta)
    method.after_backward(0)
    method.before_step(0, optimizer)
    b = layer.backward
    assert torch.equal(layer.theta.detach()[~b], theta[~b])
    assert bool((layer.theta.detach()[b].abs() < theta[b].abs()).all())


def test_lambda_schedule_cosine():
    method = TopKAST(0.9, regularization=0.2, regularization_schedule="cosine")
    method.attach(net(), total_steps=100)
    assert method.regularization_at(0) == pytest.approx(0.2)
    assert method.regularization_at(50) == pytest.approx(0.1)
    assert method.regularization_at(100) == pytest.approx(0.0, abs=1e-12)
    assert TopKAST(0.9, regularization=0.2).regularization_at(50) == 0.2


@pytest.mark.parametrize("kwargs,match", [
    ({"regularization_form": "both"}, "regularization_form"),
    ({"regularization_schedule": "linear"}, "regularization_schedule"),
    ({"moment_restart": "yes"}, "moment_restart"),
    ({"keep_units": "yes"}, "keep_units"),
])
def test_bad_values(kwargs, match):
    with pytest.raises(UserError, match=match):
        TopKAST(**kwargs)


def test_rigl_takes_the_optimizer_options():
    model = net()
    method = RigL(0.9, regularization=0.1, regularization_form="decoupled", moment_restart="per_entry").attach(model)
    optimizer = build_optimizer(lambda g: torch.optim.Adam(g, lr=0.01), model, method)
    for i in range(3):
        step(model, method, optimizer, i)


# ------------------------------------------------------------------- keep_units
def test_every_row_keeps_an_entry_with_exact_counts():
    scores = torch.rand(8, 50)
    scores[:4] *= 100  # the top 40 all lie in the first 4 rows
    plain_a, _ = topk_masks(scores, 40, 80)
    assert not bool(plain_a[4:].any(1).any())
    a, b = topk_masks_every_row(scores, 40, 80)
    assert int(a.sum()) == 40 and int(b.sum()) == 80
    assert bool(a.any(1).all())
    assert bool((b | ~a).all())
    assert bool(a[torch.arange(8), scores.argmax(1)].all())  # each row's best


def test_every_row_is_topk_when_topk_already_reaches_every_row():
    scores = torch.rand(6, 30) + torch.eye(6, 30) * 10  # each row's best is in the top 6
    assert torch.equal(topk_masks_every_row(scores, 20, 40)[0], topk_masks(scores, 20, 40)[0])


def test_fewer_entries_than_rows_keeps_the_best_rows():
    scores = torch.rand(10, 4)
    a, b = topk_masks_every_row(scores, 3, 6)
    assert int(a.sum()) == 3 and int(b.sum()) == 6 and int(a.any(1).sum()) == 3


@pytest.mark.parametrize("backend", BACKENDS)
def test_keep_units_keeps_every_unit_and_exact_k_through_training(backend):
    model = net()
    with torch.no_grad():  # unit 0..31 of the middle layer start far larger than the rest
        model[2].weight[:32] *= 100
    method = TopKAST(0.95, 0.9, refresh_interval=2, exploration_steps=8, keep_units=True, backend=backend).attach(model)
    optimizer = build_optimizer(lambda g: torch.optim.Adam(g, lr=0.01), model, method)
    for i in range(10):
        for layer in method.layers:
            assert int(layer.forward.sum()) == layer.k_forward
            assert int(layer.backward.sum()) == (layer.k_forward if method.locked else layer.k_backward)
            assert bool(layer.forward.reshape(layer.forward.shape[0], -1).any(1).all()), layer.name
        step(model, method, optimizer, i)
    plain = TopKAST(0.95, 0.9).attach(net_with_big_rows())
    assert not bool(plain.layers[0].forward.any(1).all()), "the test needs a layer top-k leaves a unit out of"


def net_with_big_rows():
    model = net()
    with torch.no_grad():
        model[2].weight[:32] *= 100
    return model


# ------------------------------------------------------------------- promotions
def test_promotions_are_the_share_of_a_that_came_from_b_minus_a():
    model = net()
    method = TopKAST(0.5, 0.0).attach(model)
    layer = method.layers[0]
    a, b = layer.forward.clone(), layer.backward.clone()
    candidates = (b & ~a).nonzero()[:10]
    new_a = a.clone()
    dropped = a.nonzero()[:10]
    new_a[tuple(dropped.T)] = False
    new_a[tuple(candidates.T)] = True
    layer.set_masks(new_a, b)
    assert layer.promotions == pytest.approx(10 / int(new_a.sum()))
    assert method.report(0)["layers"][layer.name]["promotions"] == pytest.approx(layer.promotions)


def test_magnitudes_split_by_set():
    model = net()
    method = TopKAST(0.8, 0.6).attach(model)
    parts = method.magnitudes()
    total = sum(l.numel for l in method.layers)
    assert sum(v.numel() for v in parts.values()) == total
    assert parts["A"].numel() == sum(l.k_forward for l in method.layers)
    for layer in method.layers:  # within a layer, the sets are magnitude bands
        own = layer.magnitudes()
        assert float(own["A"].min()) >= float(own["B-A"].max()) >= float(own["outside_B"].max())
    assert all(v.numel() <= 100 for v in method.magnitudes(limit=100).values())


# --------------------------------------------------------------------- collapse
class Dead(nn.Module):
    """Linear 4 -> 3 whose outputs are all negative, then a ReLU and a classifier."""

    def __init__(self):
        super().__init__()
        self.hidden = nn.Linear(4, 3)
        self.out = nn.Linear(3, 10)
        with torch.no_grad():
            self.hidden.weight.fill_(-1.0)
            self.hidden.bias.fill_(-1.0)

    def forward(self, x):
        return self.out(torch.relu(self.hidden(x)))


def watch_dead(stop: bool, dead: bool = True):
    model = Dead()
    if not dead:
        with torch.no_grad():
            model.hidden.weight.fill_(1.0)
    method = TopKAST(0.5, 0.0, dense_first=False, dense_layers=["out"]).attach(model)
    watch = CollapseWatch(method, window=20, stop=stop, log_every=5)
    messages = []
    x = torch.rand(16, 4)
    for s in range(0, 40):
        watch.before_step(s)
        out = model(x)
        if (s + 1) % 5 == 0:
            message = watch.check(s + 1, 1.0, out)  # a loss well below chance: only the layer speaks
            if message:
                messages.append((s + 1, message))
    watch.close()
    return messages


def test_a_dead_layer_gets_one_warning_naming_it_the_cause_and_remedies(caplog):
    with caplog.at_level(logging.WARNING, logger="topkast"):
        messages = watch_dead(stop=False)
    assert len(messages) == 1, "one warning only"
    step_, message = messages[0]
    assert step_ == 20
    assert "layer hidden" in message and "dead" in message
    assert "likely cause" in message and "optimizer.lr" in message and "sparsity.keep_units=true" in message
    assert "\n" not in message
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == [message]


def test_a_live_layer_gets_no_warning():
    assert watch_dead(stop=False, dead=False) == []


def test_collapse_stop_raises_run_failed():
    with pytest.raises(RunFailed, match="layer hidden") as failed:
        watch_dead(stop=True)
    assert failed.value.exit_code == 1


def test_the_probe_costs_nothing_between_log_steps():
    model = Dead()
    method = TopKAST(0.5, 0.0, dense_first=False, dense_layers=["out"]).attach(model)
    watch = CollapseWatch(method, window=20, stop=False, log_every=5)
    watch.before_step(0)  # step 1 does not end a log interval
    model(torch.rand(2, 4))
    assert watch.dead == {}


LOSS_AT_CHANCE = [*TINY, "trainer.max_steps=40", "trainer.eval_every=null", "trainer.checkpoint_every=null",
                  "optimizer.lr=1e-12", "trainer.collapse_window=20", "trainer.tensorboard=false"]


def test_loss_at_chance_is_reported_in_a_real_run(tmp_path, caplog):
    from topkast_cli.commands.train import train

    with caplog.at_level(logging.WARNING, logger="topkast"):
        train(make_config(LOSS_AT_CHANCE), tmp_path / "run")
    warnings = [r.getMessage() for r in caplog.records if "collapse" in r.getMessage()]
    assert len(warnings) == 1 and "chance level" in warnings[0]


def test_collapse_stop_ends_the_console_run_with_exit_1_and_one_line(tmp_path):
    done = run_topkast(["train", *LOSS_AT_CHANCE, "trainer.collapse_stop=true", f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    assert done.returncode == 1, done.stderr
    lines = [l for l in done.stderr.splitlines() if "collapse" in l]
    assert lines and "chance level" in lines[-1] and "Traceback" not in done.stderr


@pytest.mark.parametrize("key,value", [("trainer.collapse_window", "0"), ("trainer.collapse_stop", "maybe")])
def test_bad_trainer_values_are_one_line(tmp_path, key, value):
    done = run_topkast(["train", *TINY, f"{key}={value}", f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    assert done.returncode == 2 and key in done.stderr and "Traceback" not in done.stderr
