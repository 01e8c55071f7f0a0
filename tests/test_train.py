"""The training loop end to end: outputs of the run-directory contract, exact resume."""

import json

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import TINY, changed_torch_settings, make_config, run_topkast
from topkast_cli.checkpoint import load_checkpoint
from topkast_cli.run_logs import read_jsonl
from topkast_cli.commands.train import train


def test_console_script_writes_the_run_directory_contract(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_topkast(["train", *TINY, f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    for name in [".hydra/config.yaml", "train.log", "checkpoints/last.ckpt", "checkpoints/best.ckpt",
                 "sparsity.jsonl", "metrics.jsonl", "summary.json"]:
        assert (run_dir / name).is_file(), name

    sparsity = read_jsonl(run_dir / "sparsity.jsonl")
    assert sparsity[0]["step"] == 0 and sparsity[-1]["step"] == 20
    # exploration_steps=0.8 of 20 steps: masks lock at step 16 (B = A from then on).
    assert sparsity[0]["phase"] == "explore" and sparsity[-1]["phase"] == "refine"
    assert abs(sparsity[-1]["backward_density"] - sparsity[-1]["forward_density"]) < 1e-9
    first = sparsity[0]
    assert abs(first["forward_density"] - 0.1) < 0.01 and abs(first["backward_density"] - 0.2) < 0.01
    layer = next(iter(first["layers"].values()))
    assert set(layer) == {"numel", "forward_density", "backward_density", "churn", "promotions"}
    assert [r["step"] for r in sparsity] == sorted(r["step"] for r in sparsity)

    metrics = read_jsonl(run_dir / "metrics.jsonl")
    assert [(m["step"], m["split"]) for m in metrics] == [(10, "val"), (20, "val")]
    assert {"loss", "acc1"} <= set(metrics[0])

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["step"] == 20
    assert summary["final"]["acc1"] == metrics[-1]["acc1"]
    assert abs(summary["density"]["sparse_density"] - 0.1) < 0.01

    ckpt = load_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    for key in ["format_version", "step", "epoch", "config", "model", "masks", "optimizer", "scheduler", "rng", "metrics"]:
        assert key in ckpt, key
    assert ckpt["step"] == 20 and isinstance(ckpt["config"], dict)
    name, masks = next(iter(ckpt["masks"].items()))
    assert name in ckpt["model"] and masks["forward"].dtype == torch.bool

    events = EventAccumulator(str(run_dir / "tb")).Reload()
    tags = set(events.Tags()["scalars"])
    expected = {"train/loss", "train/acc1", "train/lr", "train/samples_per_sec", "train/regularization",
                "val/loss", "val/acc1", "sparsity/forward_density", "sparsity/backward_density", "sparsity/churn"}
    assert expected <= tags, expected - tags
    assert any(t.startswith("sparsity/") and t.endswith("/churn") and t != "sparsity/churn" for t in tags)


def test_python_dash_m_is_the_same_cli(tmp_path):
    proc = run_topkast(["--help"], cwd=tmp_path, module=True)
    assert proc.returncode == 0 and "topkast <command>" in proc.stdout


def _final_state(run_dir):
    ckpt = load_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    return ckpt["model"], ckpt["masks"], read_jsonl(run_dir / "metrics.jsonl"), read_jsonl(run_dir / "sparsity.jsonl")


def test_resume_is_exact(tmp_path):
    common = [*TINY, "trainer.deterministic=true", "sparsity.exploration_steps=15", "trainer.max_steps=24",
              "trainer.eval_every=4", "trainer.checkpoint_every=4", "optimizer=sgd", "optimizer.lr=0.05"]
    straight = tmp_path / "straight"
    train(make_config(common), straight)

    split = tmp_path / "split"
    train(make_config([*common, "trainer.max_steps=12"]), split)
    # Same run directory, longer budget: continue from last.ckpt (step 12).
    train(make_config([*common, "resume=auto"]), split)

    model_a, masks_a, metrics_a, sparsity_a = _final_state(straight)
    model_b, masks_b, metrics_b, sparsity_b = _final_state(split)
    for k in model_a:
        assert torch.equal(model_a[k], model_b[k]), k
    for k in masks_a:
        assert torch.equal(masks_a[k]["forward"], masks_b[k]["forward"])
        assert torch.equal(masks_a[k]["backward"], masks_b[k]["backward"])
    assert metrics_a == metrics_b
    # The interrupted run logged an extra end-of-run record at step 12; otherwise the same.
    assert [r for r in sparsity_b if r["step"] != 12] == [r for r in sparsity_a if r["step"] != 12]


def test_bf16_autocast_on_cpu_trains(tmp_path):
    summary = train(make_config([*TINY, "trainer.precision=bf16", "trainer.tensorboard=false"]), tmp_path)
    assert summary["status"] == "completed" and summary["final"]["loss"] < 10


def test_fp16_needs_cuda(tmp_path):
    import pytest
    import torch

    from topkast_cli.errors import UserError

    if torch.cuda.is_available():
        pytest.skip("fp16 is allowed on CUDA")
    with pytest.raises(UserError, match="fp16 needs a CUDA device"):
        train(make_config([*TINY, "trainer.precision=fp16"]), tmp_path)


def test_a_run_in_process_puts_back_the_torch_settings_it_sets(tmp_path, monkeypatch):
    """trainer.threads and trainer.deterministic hold during the run and are undone after it,
    so a caller that trains in-process (a test, a benchmark's worker) keeps its own."""
    from topkast_cli.commands import train as command
    from topkast_cli.run import torch_settings

    during = {}

    def fit(run, *a, **k):
        during.update(torch_settings())
        return real_fit(run, *a, **k)

    real_fit = command.fit
    monkeypatch.setattr(command, "fit", fit)
    before = torch_settings()
    train(make_config([*TINY, "trainer.max_steps=5", "trainer.threads=2", "trainer.deterministic=true",
                       "trainer.tensorboard=false"]), tmp_path)
    assert during["num_threads"] == 2 and during["deterministic_algorithms"] and not during["cudnn.benchmark"]
    assert before["num_threads"] != 2 and not before["deterministic_algorithms"]
    assert torch_settings() == before


LEAKS = {
    "num_threads": lambda: torch.set_num_threads(torch.get_num_threads() + 1),
    "deterministic_algorithms": lambda: torch.use_deterministic_algorithms(True),
    "deterministic_warn_only": lambda: torch.use_deterministic_algorithms(True, warn_only=True),
    "cudnn.benchmark": lambda: setattr(torch.backends.cudnn, "benchmark", not torch.backends.cudnn.benchmark),
    "cudnn.deterministic": lambda: setattr(torch.backends.cudnn, "deterministic", not torch.backends.cudnn.deterministic),
    "default_dtype": lambda: torch.set_default_dtype(torch.float64),
}


@pytest.mark.parametrize("name", LEAKS)
def test_the_settings_guard_names_a_leak_and_puts_it_back(name):
    """conftest's no_leaked_torch_settings fails a test on what this finds."""
    from topkast_cli.run import torch_settings

    before = torch_settings()
    LEAKS[name]()
    assert name in changed_torch_settings(before)
    assert torch_settings() == before
    assert changed_torch_settings(before) == {}
