"""topkast eval: the metric a run logged, densities counted from the weights, bad inputs."""

import json

import pytest
import torch
from omegaconf import open_dict

from conftest import TINY, make_config, run_topkast
from topkast_cli.checkpoint import load_checkpoint
from topkast_cli.cli import main
from topkast_cli.config import compose
from topkast_cli.errors import UserError
from topkast_cli.evaluate import checkpoint_overrides, evaluate_checkpoint
from topkast_cli.run_logs import read_jsonl
from topkast_cli.commands.train import train


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A short Top-KAST 90/80 run (checkpoints at steps 10 and 20)."""
    run_dir = tmp_path_factory.mktemp("run")
    train(make_config(TINY + ["trainer.tensorboard=false"]), run_dir)
    return run_dir


def eval_config(ckpt, *overrides):
    cfg = compose("eval", [f"ckpt={ckpt}", "eval.progress=false", *overrides])
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


def logged(run_dir, step):
    return next(r for r in read_jsonl(run_dir / "metrics.jsonl") if r["step"] == step and r["split"] == "val")


@pytest.mark.parametrize("name", ["last.ckpt", "best.ckpt"])
def test_eval_reproduces_the_logged_metric(run, name, capsys):
    ckpt = run / "checkpoints" / name
    step = load_checkpoint(ckpt)["step"]
    report = evaluate_checkpoint(eval_config(ckpt))
    want = logged(run, step)
    assert report["step"] == step and report["weights"] == "sparse"
    assert report["metrics"]["acc1"] == want["acc1"]
    assert report["metrics"]["loss"] == pytest.approx(want["loss"], rel=1e-6)
    # written next to the checkpoint, and printed as a table
    assert json.loads((run / "checkpoints" / f"{ckpt.stem}.eval.json").read_text())["metrics"] == report["metrics"]
    out = capsys.readouterr().out
    assert "classifier *" in out and "all parameters" in out and f"acc1 {want['acc1']:.2f}" in out


def test_measured_density_equals_the_target(run):
    report = evaluate_checkpoint(eval_config(run / "checkpoints" / "last.ckpt"))
    sparse = [l for l in report["layers"] if l["sparse"]]
    assert [l["name"] for l in sparse] == ["features.2", "features.4", "classifier"]  # first layer dense
    for layer in sparse:
        assert abs(layer["nonzero"] - 0.1 * layer["params"]) <= 0.5  # k = round(D x numel)
        assert layer["flops"] == pytest.approx(layer["dense_flops"] * layer["density"])
    dense_first = report["layers"][0]
    assert dense_first["density"] == 1.0 and dense_first["flops"] == dense_first["dense_flops"]
    assert report["density"]["sparse_density"] == pytest.approx(0.1, abs=1e-3)
    summary = json.loads((run / "summary.json").read_text())
    assert report["density"] == summary["density"]
    assert 0.1 < report["flops"]["ratio"] < 0.2  # the dense first conv keeps some work
    assert report["flops"]["input_shape"] == [1, 40]


def test_dense_theta_and_loader_overrides(run):
    ckpt = run / "checkpoints" / "last.ckpt"
    sparse = evaluate_checkpoint(eval_config(ckpt, "eval.batch_size=7"))
    assert sparse["metrics"]["acc1"] == logged(run, 20)["acc1"]  # the batch size changes nothing
    dense = evaluate_checkpoint(eval_config(ckpt, "eval.dense=true", "eval.split=train"))
    assert dense["weights"] == "dense" and dense["split"] == "train" and dense["samples"] == 800
    assert all(l["nonzero"] == l["params"] for l in dense["layers"])
    assert dense["flops"]["ratio"] == 1.0
    assert (run / "checkpoints" / "last.eval.train.dense.json").is_file()


def test_training_keys_map_to_eval_keys_or_must_agree(run):
    saved = load_checkpoint(run / "checkpoints" / "last.ckpt")["config"]
    assert checkpoint_overrides(["dataset.eval_batch_size=7", "trainer.device=cpu"], saved) == [
        "eval.batch_size=7",
        "eval.device=cpu",
    ]
    assert checkpoint_overrides(["model=cnn1d", "sparsity.forward=0.9", "eval.split=train"], saved) == ["eval.split=train"]
    for contradiction in ("model=mlp", "sparsity.forward=0.8", "model.channels=32", "sparsity=dense"):
        with pytest.raises(UserError, match="contradicts the checkpoint"):
            checkpoint_overrides([contradiction], saved)


def truncated(tmp_path, run):
    data = (run / "checkpoints" / "last.ckpt").read_bytes()
    (tmp_path / "cut.ckpt").write_bytes(data[: len(data) // 2])
    return tmp_path / "cut.ckpt"


def foreign(tmp_path, run):
    torch.save([1, 2, 3], tmp_path / "list.ckpt")
    return tmp_path / "list.ckpt"


def text_file(tmp_path, run):
    (tmp_path / "notes.ckpt").write_text("not a checkpoint\n")
    return tmp_path / "notes.ckpt"


def other_version(tmp_path, run):
    state = load_checkpoint(run / "checkpoints" / "last.ckpt")
    state["format_version"] = 99
    torch.save(state, tmp_path / "v99.ckpt")
    return tmp_path / "v99.ckpt"


@pytest.mark.parametrize(
    "make, args, expect",
    [
        (lambda t, r: t / "missing.ckpt", [], "no such file"),
        (truncated, [], "is truncated"),
        (foreign, [], "not a topkast checkpoint"),
        (text_file, [], "not a topkast checkpoint"),
        (other_version, [], "format version 99"),
        (lambda t, r: r / "checkpoints" / "last.ckpt", ["model=mlp"], "contradicts the checkpoint"),
        (lambda t, r: r / "checkpoints" / "last.ckpt", ["eval.batch_size=0"], "eval.batch_size=0"),
        (lambda t, r: r / "checkpoints" / "last.ckpt", ["eval.nope=1"], "nope"),
        (lambda t, r: None, [], "ckpt=PATH is required"),
        (lambda t, r: t / "a=b" / "last.ckpt", [], "quote a path"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(run, tmp_path, capsys, make, args, expect):
    path = make(tmp_path, run)
    argv = ["eval", *([f"ckpt={path}"] if path is not None else []), *args]
    with pytest.raises(SystemExit) as exit:
        main(argv)
    err = capsys.readouterr().err
    assert exit.value.code == 2
    assert err.count("\n") == 1 and err.startswith("topkast eval: error:") and expect in err, err


def test_console_script(run, tmp_path):
    result = run_topkast(["eval", f"ckpt={run / 'checkpoints' / 'best.ckpt'}", "eval.progress=false"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "sparse network α" in result.stdout and "forward FLOPs" in result.stdout
    assert (run / "checkpoints" / "best.eval.json").is_file()
    assert not any(tmp_path.iterdir())  # eval makes no run directory
