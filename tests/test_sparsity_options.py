"""Top-KAST's options for sparse layers that learn slowly: `sparsity.powerprop`,
`sparsity.alpha_scale`, `sparsity.lr_scale`. Each does what it claims, keeps the invariants of
DESIGN.md section 1 on both backends, resumes exactly, and a bad value is one line and exit 2."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
import torch.nn.functional as F

from conftest import BACKENDS, TINY, batch, grad_of, make_config, net, run_topkast, step
from topkast_cli.checkpoint import load_checkpoint
from topkast_cli.commands import train as train_command
from topkast_cli.commands.train import train
from topkast_cli.errors import UserError
from topkast_cli.launch import preflight
from topkast_cli.run import build_optimizer, build_run
from topkast_cli.sparsity import TopKAST, computed_state_dict

OPTIMIZERS = {
    "sgd": lambda g: torch.optim.SGD(g, lr=0.2),
    "momentum": lambda g: torch.optim.SGD(g, lr=0.2, momentum=0.9, weight_decay=0.01),
    "adam": lambda g: torch.optim.Adam(g, lr=0.02, weight_decay=0.01),
}
OPTIONS = {
    "powerprop_2": {"powerprop": 2},
    "powerprop_1.5": {"powerprop": 1.5},
    "alpha_rms": {"alpha_scale": "rms"},
    "alpha_0.5": {"alpha_scale": 0.5},
    "lr_density": {"lr_scale": "density"},
    "lr_0.3": {"lr_scale": 0.3},
    "all": {"powerprop": 2, "alpha_scale": "rms", "lr_scale": "density"},
}


def sparse_net(backend, **options):
    model = net()
    return model, TopKAST(0.7, 0.5, refresh_interval=2, regularization=0.01, backend=backend, **options).attach(model)


def effective(layer, p):
    """w = θ·|θ|^(p−1) on A, 0 elsewhere, from the layer's θ."""
    theta = layer.theta.detach()
    return torch.where(layer.forward, theta * theta.abs().pow(p - 1), 0)


# ---------------------------------------------------------------------- powerprop
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("p", [2, 3.5])
def test_powerprop_layer_computes_with_theta_abs_theta_on_a_and_zero_elsewhere(backend, p):
    model, method = sparse_net(backend, powerprop=p)
    optimizer = build_optimizer(OPTIMIZERS["adam"], model, method)
    for i in range(4):
        x, _ = batch(i)
        for layer, module in zip(method.layers, [model[2], model[4]]):
            weight = module.weight.detach()
            torch.testing.assert_close(weight, effective(layer, p))
            assert torch.equal(weight[~layer.forward], torch.zeros_like(weight[~layer.forward]))
        # the layer's own forward (the CSR kernel on `sparse`) computes with the same weights
        hidden = F.relu(model[0](x))
        torch.testing.assert_close(model[2](hidden), F.linear(hidden, effective(method.layers[0], p), model[2].bias))
        step(model, method, optimizer, i)


@pytest.mark.parametrize("backend", BACKENDS)
def test_powerprop_leaves_the_initial_function_and_masks_unchanged(backend):
    plain_model, plain = sparse_net(backend)
    model, method = sparse_net(backend, powerprop=2)
    x, _ = batch(0)
    torch.testing.assert_close(model(x), plain_model(x))
    for layer, ref in zip(method.layers, plain.layers):
        assert torch.equal(layer.forward, ref.forward) and torch.equal(layer.backward, ref.backward)
        theta = ref.theta.detach()
        torch.testing.assert_close(layer.theta.detach(), theta.sign() * theta.abs().sqrt())


@pytest.mark.parametrize("backend", BACKENDS)
def test_powerprop_gradient_is_the_chain_rule_on_b_and_zero_outside(backend):
    p = 2
    model, method = sparse_net(backend, powerprop=p)
    x, y = batch(0)
    F.cross_entropy(model(x), y).backward()
    # ∂L/∂w from a plain copy of the network that computes with the effective weights
    copy = net()
    with torch.no_grad():
        for i, layer in zip([2, 4], method.layers):
            copy[i].weight.copy_(effective(layer, p))
        copy[0].weight.copy_(model[0].weight)
    F.cross_entropy(copy(x), y).backward()
    for i, layer in zip([2, 4], method.layers):
        theta, b = layer.theta.detach(), layer.backward
        expected = torch.where(b, copy[i].weight.grad * p * theta.abs().pow(p - 1), 0)
        torch.testing.assert_close(grad_of(layer), expected)
        assert torch.equal(grad_of(layer)[~b], torch.zeros_like(theta[~b]))
        assert bool((grad_of(layer)[b & ~layer.forward] != 0).any()), "B \\ A gets the chain rule's gradient"


def test_powerprop_computed_state_dict_gives_w_and_the_plain_one_theta():
    model, method = sparse_net("masked", powerprop=2)
    computed, plain = computed_state_dict(model), model.state_dict()
    for i, layer in zip([2, 4], method.layers):
        assert torch.equal(computed[f"{i}.weight"], effective(layer, 2))
        assert torch.equal(plain[f"{i}.parametrizations.weight.original"], layer.theta.detach())


# ---------------------------------------------------------------------- alpha_scale
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("powerprop", [1, 2])
def test_alpha_scale_rms_gives_the_forward_weights_the_dense_layers_sum_of_squares(backend, powerprop):
    dense = net()
    model, method = sparse_net(backend, alpha_scale="rms", powerprop=powerprop)
    for i, layer in zip([2, 4], method.layers):
        alpha, w0 = model[i].weight.detach(), dense[i].weight.detach()
        torch.testing.assert_close(alpha.norm(), w0.norm())
        # one factor per layer, above 1 but below 1/sqrt(D): A holds the largest weights
        factor = float(alpha.norm() / w0[layer.forward].norm())
        assert 1.0 < factor < layer.density ** -0.5
        torch.testing.assert_close(alpha, torch.where(layer.forward, w0 * factor, 0))


@pytest.mark.parametrize("backend", BACKENDS)
def test_alpha_scale_number_multiplies_the_initial_weights(backend):
    dense = net()
    model, method = sparse_net(backend, alpha_scale=0.5)
    for i, layer in zip([2, 4], method.layers):
        torch.testing.assert_close(model[i].weight.detach(), torch.where(layer.forward, 0.5 * dense[i].weight.detach(), 0))
    assert torch.equal(model[0].weight, dense[0].weight), "dense layers keep their initialisation"


# ---------------------------------------------------------------------- lr_scale
@pytest.mark.parametrize("backend", BACKENDS)
def test_lr_scale_gives_each_sparse_layer_its_group(backend):
    for option, factor in (("density", lambda layer: 1 / layer.density), (0.3, lambda layer: 0.3)):
        model, method = sparse_net(backend, lr_scale=option)
        optimizer = build_optimizer(OPTIMIZERS["adam"], model, method)
        dense, *sparse = optimizer.param_groups
        assert dense["lr"] == 0.02 and "lr_scale" not in dense
        assert len(sparse) == len(method.layers)
        for group, layer in zip(sparse, method.layers):
            assert group["params"] == [layer.trained] and group["weight_decay"] == 0.0
            assert group["lr"] == pytest.approx(0.02 * factor(layer)) and group["lr_scale"] == factor(layer)
    model, method = sparse_net(backend)
    assert len(build_optimizer(OPTIMIZERS["adam"], model, method).param_groups) == 2, "off: one sparse group"


@pytest.mark.usefixtures("builds_runs")
def test_lr_scale_keeps_its_ratio_under_the_schedule():
    cfg = make_config([*TINY, "sparsity.lr_scale=density", "scheduler=cosine", "scheduler.warmup=0.2"])
    run = build_run(cfg)
    ratios = [g["lr_scale"] for g in run.optimizer.param_groups[1:]]
    for _ in range(7):
        run.optimizer.step()
        run.scheduler.step()
        dense, *sparse = run.optimizer.param_groups
        for group, ratio in zip(sparse, ratios):
            assert group["lr"] == pytest.approx(dense["lr"] * ratio)


# ------------------------------------------------------------ invariants, each option
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("optimizer_name", OPTIMIZERS)
@pytest.mark.parametrize("option", OPTIONS)
def test_invariants_hold_with_each_option(option, optimizer_name, backend):
    model, method = sparse_net(backend, **OPTIONS[option])
    optimizer = build_optimizer(OPTIMIZERS[optimizer_name], model, method)
    moved_b = 0
    for i in range(10):
        before = [(l.theta.detach().clone(), l.backward.clone()) for l in method.layers]
        changed = step(model, method, optimizer, i)
        for layer, (theta, b) in zip(method.layers, before):
            assert int(layer.forward.sum()) == layer.k_forward == round(0.3 * layer.numel)
            assert int(layer.backward.sum()) == layer.k_backward == round(0.5 * layer.numel)
            assert bool((layer.backward | ~layer.forward).all()), "B ⊇ A"
            assert torch.equal(layer.theta.detach()[~b], theta[~b]), f"step {i}: {layer.name} moved outside B"
            assert not torch.equal(layer.theta.detach()[b], theta[b]), "entries in B train"
            weight = layer.module.weight.detach()
            assert int(torch.count_nonzero(weight)) <= layer.k_forward and not weight[~layer.forward].any()
        if changed:
            moved_b += sum(not torch.equal(l.backward, b) for l, (_, b) in zip(method.layers, before))
    assert moved_b > 0, "the test needs refreshes that change B"


# ---------------------------------------------------------------------- resume and export
RESUME = [*TINY, "trainer.deterministic=true", "sparsity.exploration_steps=15", "trainer.max_steps=16",
          "trainer.eval_every=4", "trainer.checkpoint_every=4", "trainer.tensorboard=false"]
ALL_ON = ["sparsity.powerprop=2", "sparsity.alpha_scale=rms", "sparsity.lr_scale=density"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_resume_with_the_options_is_exact(tmp_path, backend):
    extra = ["model=mlp", "model.hidden=[32,32]", "sparsity.backend=sparse"] if backend == "sparse" else []
    common = [*RESUME, *ALL_ON, *extra]
    straight, split = tmp_path / "straight", tmp_path / "split"
    train(make_config(common), straight)
    train(make_config([*common, "trainer.max_steps=8"]), split)
    train(make_config([*common, "resume=auto"]), split)
    a, b = (load_checkpoint(d / "checkpoints" / "last.ckpt") for d in (straight, split))
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for k in a["masks"]:
        assert torch.equal(a["masks"][k]["forward"], b["masks"][k]["forward"])
        assert torch.equal(a["masks"][k]["backward"], b["masks"][k]["backward"])
    groups_a, groups_b = a["optimizer"]["param_groups"], b["optimizer"]["param_groups"]
    assert groups_a == groups_b and len(groups_a) == 1 + len(a["masks"])
    assert all(g.get("lr_scale", 1.0) > 1.0 for g in groups_a[1:])
    for i, state in a["optimizer"]["state"].items():
        for key, value in state.items():
            assert torch.equal(value, b["optimizer"]["state"][i][key]), (i, key)
    # the checkpoint holds θ; what the layer computes with is θ·|θ| on A
    from topkast_cli.export import export_checkpoint
    report = export_checkpoint(make_config([f"ckpt={straight / 'checkpoints' / 'last.ckpt'}"], config_name="export"))
    exported = torch.load(report["plain"], weights_only=True)
    for name, masks in a["masks"].items():
        theta = a["model"][name]
        assert torch.equal(exported[name], torch.where(masks["forward"], theta * theta.abs(), 0)), name


def test_resume_with_another_option_value_is_refused(tmp_path):
    run_dir = tmp_path / "first"
    train(make_config([*TINY, "trainer.max_steps=4", "trainer.tensorboard=false", "sparsity.lr_scale=density"]), run_dir)
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    for change in ("sparsity.lr_scale=null", "sparsity.powerprop=2"):
        args = [*TINY, "sparsity.lr_scale=density", change, f"resume={ckpt}", f"hydra.run.dir={tmp_path / 'second'}"]
        with pytest.raises(UserError, match=change.split("=")[0]):
            preflight("train", args, train_command.check_job)


# ---------------------------------------------------------------------- bad values
BAD = {
    "powerprop-below-1": ("sparsity.powerprop=0.5", ["sparsity.powerprop=0.5", "[1, 10]"]),
    "powerprop-above-10": ("sparsity.powerprop=11", ["sparsity.powerprop=11", "[1, 10]"]),
    "powerprop-word": ("sparsity.powerprop=rms", ["sparsity.powerprop='rms'", "[1, 10]"]),
    "alpha-scale-negative": ("sparsity.alpha_scale=-1", ["sparsity.alpha_scale=-1", "null, rms or a number > 0"]),
    "alpha-scale-word": ("sparsity.alpha_scale=density", ["sparsity.alpha_scale='density'", "rms"]),
    "lr-scale-zero": ("sparsity.lr_scale=0", ["sparsity.lr_scale=0", "null, density or a number > 0"]),
    "lr-scale-word": ("sparsity.lr_scale=rms", ["sparsity.lr_scale='rms'", "density"]),
    "powerprop-on-rigl": ("sparsity=rigl sparsity.powerprop=2", ["sparsity.powerprop"]),
}


@pytest.fixture(scope="module")
def bad_outcomes(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad")

    def one(case):
        args = BAD[case][0].split()
        base = [a for a in TINY if not a.startswith("sparsity.")]  # (TINY's refresh_interval is Top-KAST's)
        return run_topkast(["train", *base, *args, f"hydra.run.dir={tmp / case}"], cwd=tmp, timeout=300), tmp / case

    with ThreadPoolExecutor(max_workers=max(2, min(4, os.cpu_count() or 2))) as pool:
        return dict(zip(BAD, pool.map(one, BAD)))


@pytest.mark.parametrize("case", list(BAD))
def test_a_bad_value_is_one_line_and_exit_2(case, bad_outcomes):
    proc, run_dir = bad_outcomes[case]
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("topkast train: error: "), proc.stderr
    for text in BAD[case][1]:
        assert text in lines[0], (text, lines[0])
    assert not run_dir.exists(), "no run directory for a run that could not start"


@pytest.mark.parametrize(
    "kwargs, match",
    [({"powerprop": float("nan")}, "powerprop"), ({"powerprop": True}, "powerprop"),
     ({"alpha_scale": float("inf")}, "alpha_scale"), ({"lr_scale": [1]}, "lr_scale")],
)
def test_bad_values_in_the_library(kwargs, match):
    with pytest.raises(UserError, match=match):
        TopKAST(0.9, **kwargs)


def test_other_methods_have_no_such_keys():
    for method in ("rigl", "set", "static", "gmp", "dense"):
        cfg = make_config([f"sparsity={method}"])
        assert not {"powerprop", "alpha_scale", "lr_scale"} & set(cfg.sparsity), method
