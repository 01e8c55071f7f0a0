"""topkast export: the plain state_dict holds α and gives eval's metric in the plain model; the
CSR form is smaller and holds the same weights; mistakes are one line."""

import pytest
import torch

from conftest import TINY, make_config, run_topkast
from test_eval import eval_config
from topkast_cli.commands.train import train
from topkast_cli.config import compose
from topkast_cli.evaluate import evaluate_checkpoint
from topkast_cli.export import dense_from_csr, export_checkpoint
from topkast_cli.run import build_model, build_run
from topkast_cli.tasks import evaluate


def export_config(ckpt, *overrides):
    return make_config([f"ckpt={ckpt}", *overrides], config_name="export")


@pytest.fixture(scope="module", params=["masked", "sparse"])
def exported(request, tmp_path_factory):
    """A short Top-KAST run (the sparse backend on an MLP), evaluated and exported."""
    run_dir = tmp_path_factory.mktemp(f"export-{request.param}")
    extra = ["model=mlp", "model.hidden=[64,64]", "sparsity.backend=sparse"] if request.param == "sparse" else []
    cfg = make_config([*TINY, *extra, "trainer.tensorboard=false"])
    train(cfg, run_dir)
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    report = export_checkpoint(export_config(ckpt))
    metric = evaluate_checkpoint(eval_config(ckpt))["metrics"]["acc1"]
    return cfg, report, metric


@pytest.mark.usefixtures("builds_runs")  # (build_run in the test)
def test_the_plain_state_dict_loads_into_the_plain_model_and_gives_evals_metric(exported):
    cfg, report, metric = exported
    run = build_run(cfg)  # only for its data: the plain model is built from the config alone
    plain = build_model(cfg, run.data)
    plain.load_state_dict(torch.load(report["plain"], weights_only=True))
    measured = evaluate(plain, run.data.eval_loader("val"), run.task, torch.device("cpu"))
    assert measured["acc1"] == pytest.approx(metric, abs=1e-9)
    sparse = [n for n in torch.load(report["plain"], weights_only=True) if n.endswith("weight")]
    zeros = sum(int((torch.load(report["plain"], weights_only=True)[n] == 0).sum()) for n in sparse)
    assert zeros > 0, "α has its zeros in place"


def test_the_csr_form_is_smaller_and_holds_the_same_weights(exported):
    _, report, _ = exported
    plain = torch.load(report["plain"], weights_only=True)
    csr = torch.load(report["csr"], weights_only=True)
    assert set(csr) == set(plain)
    layers = [k for k, v in csr.items() if isinstance(v, dict)]
    assert layers
    for name in layers:
        assert torch.equal(dense_from_csr(csr[name]), plain[name])
        assert csr[name]["values"].numel() == int((plain[name] != 0).sum())
    assert report["csr_bytes"] < report["plain_bytes"]
    assert 0 < report["density"]["sparse_density"] < 0.101  # 90% sparse, up to rounding per layer


def test_export_without_a_checkpoint_is_one_line(tmp_path):
    r = run_topkast(["export", f"ckpt={tmp_path}/missing.ckpt"], cwd=tmp_path, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "missing.ckpt" in lines[0] and "no such file" in lines[0], r.stderr


def test_export_config_composes():
    cfg = compose("export", ["ckpt=x.ckpt", "export.output=/tmp"])
    assert cfg.export.output == "/tmp"
