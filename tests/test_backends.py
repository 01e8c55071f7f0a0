"""The same algorithm on every backend: a run trained with `masked` and with `sparse` (through
refreshes, the lock and a resume) ends with the same masks and, up to float rounding, the same
parameters; checkpoints resume on the other backend; `auto` chooses per layer and says why."""

import pytest
import torch

from conftest import TINY, make_config
from topkast_cli.checkpoint import load_checkpoint
from topkast_cli.commands.train import train
from topkast_cli.run import build_run
from topkast_cli.sparsity import sparse_linear

# An MLP (Linear layers only) with every layer sparse; refreshes at 5 and 10, the lock at 12.
MLP = [
    *TINY, "model=mlp", "model.hidden=[48,48]", "sparsity.dense_first=false", "sparsity.exploration_steps=12",
    "trainer.deterministic=true", "trainer.tensorboard=false", "sparsity.regularization=0.01",
]


def trained(run_dir, backend, *, until=None, resume=False):
    overrides = [*MLP, f"sparsity.backend={backend}"]
    if until is not None:
        overrides.append(f"trainer.max_steps={until}")
    if resume:
        overrides.append("resume=auto")
    return train(make_config(overrides), run_dir)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("backends")
    out = {}
    # Row blocks of 2-3 rows: values, optimizer state and checkpoints move block by block.
    patch = pytest.MonkeyPatch.context()
    with patch as mp:
        mp.setattr(sparse_linear, "BLOCK", 100)
        _train_all(root, out)
    return out


def _train_all(root, out):
    for name, first, second in [("masked", "masked", None), ("sparse", "sparse", None),
                                ("sparse-then-masked", "sparse", "masked"), ("masked-then-sparse", "masked", "sparse")]:
        if second is None:
            out[name] = (trained(root / name, first), root / name)
        else:
            trained(root / name, first, until=10)
            out[name] = (trained(root / name, second, resume=True), root / name)


def test_every_backend_ends_with_the_same_masks_and_parameters(runs):
    reference = load_checkpoint(runs["masked"][1] / "checkpoints" / "last.ckpt")
    assert reference["sparsity"]["extra"]["locked"]
    for name in ("sparse", "sparse-then-masked", "masked-then-sparse"):
        other = load_checkpoint(runs[name][1] / "checkpoints" / "last.ckpt")
        for key, masks in reference["masks"].items():
            assert torch.equal(masks["forward"], other["masks"][key]["forward"]), (name, key)
            assert torch.equal(masks["backward"], other["masks"][key]["backward"]), (name, key)
        for key, value in reference["model"].items():
            torch.testing.assert_close(other["model"][key], value, rtol=1e-4, atol=1e-5, msg=f"{name}: {key}")
        # The optimizer state is stored in θ's shape on every backend, zero outside B.
        for i, state in reference["optimizer"]["state"].items():
            for key, value in state.items():
                torch.testing.assert_close(other["optimizer"]["state"][i][key], value, rtol=1e-3, atol=1e-6)


def test_summary_records_each_layers_backend(runs):
    assert set(runs["sparse"][0]["backends"].values()) == {"sparse"}
    assert set(runs["masked"][0]["backends"].values()) == {"masked"}
    assert set(runs["sparse-then-masked"][0]["backends"].values()) == {"masked"}
    acc = [runs[name][0]["final"]["acc1"] for name in runs]
    assert max(acc) - min(acc) <= 1.0, acc


@pytest.mark.usefixtures("builds_runs")  # (build_run in the test)
def test_the_sparse_backend_trains_only_b_and_holds_no_dense_gradient():
    run = build_run(make_config([*MLP, "sparsity.backend=sparse"]))
    sizes = {id(p): p.numel() for g in run.optimizer.param_groups for p in g["params"]}
    for layer in run.method.layers:
        assert not layer.theta.requires_grad and id(layer.theta) not in sizes
        assert sizes[id(layer.trained)] == layer.k_backward


@pytest.mark.usefixtures("builds_runs")  # (build_run in the test)
def test_auto_keeps_what_it_cannot_run_masked_and_says_why(tmp_path):
    overrides = [*TINY, "sparsity.backend=auto", "trainer.tensorboard=false"]  # the default CNN
    summary = train(make_config(overrides), tmp_path)
    assert summary["backends"]["features.2.weight"] == "masked"
    assert summary["backends"]["classifier.weight"] in ("masked", "sparse")
    log = (tmp_path / "train.log").read_text() if (tmp_path / "train.log").exists() else ""
    run = build_run(make_config(overrides))
    notes = run.method.backend_notes
    assert "Conv1d" in notes["features.2"] and "ms sparse" in notes["classifier"]
    assert log == "" or "sparsity.backend=auto" in log


@pytest.mark.usefixtures("builds_runs")  # (build_run in the test)
def test_a_rigl_run_on_auto_stays_masked():
    plain = [o for o in MLP if not o.startswith("sparsity.")]
    run = build_run(make_config([*plain, "sparsity=rigl", "sparsity.backend=auto", "sparsity.dense_first=false"]))
    assert set(run.method.backends().values()) == {"masked"}
    assert all("dense gradient" in note for note in run.method.backend_notes.values())


def test_pointwise_convolutions_train_alike_on_both_backends():
    # 1x1 convolutions (one strided) run on the sparse backend as Linear maps over channels:
    # through refreshes they must keep the masked backend's masks and parameters.
    from torch import nn

    from conftest import step
    from topkast_cli.run import build_optimizer
    from topkast_cli.sparsity import TopKAST

    def trained(backend):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(3, 16, 1), nn.ReLU(), nn.Conv2d(16, 16, 1, stride=2), nn.ReLU(),
                              nn.Flatten(), nn.Linear(16 * 4 * 4, 5))
        method = TopKAST(0.8, 0.6, refresh_interval=3, dense_first=False, backend=backend).attach(model)
        assert set(method.backends().values()) == {backend}
        optimizer = build_optimizer(lambda g: torch.optim.Adam(g, lr=0.01), model, method)
        g = torch.Generator().manual_seed(1)
        for i in range(10):
            step(model, method, optimizer, i, (torch.randn(8, 3, 8, 8, generator=g), torch.randint(0, 5, (8,), generator=g)))
        return method

    masked, sparse = trained("masked"), trained("sparse")
    for a, b in zip(masked.layers, sparse.layers):
        assert torch.equal(a.forward, b.forward) and torch.equal(a.backward, b.backward), a.name
        torch.testing.assert_close(b.theta, a.theta, rtol=1e-4, atol=1e-5)
