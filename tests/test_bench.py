"""The benchmarks run and write their files (numbers are measured, never asserted)."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.accuracy import pivot
from bench import lm
from bench.lm import SHAKESPEARE

ROOT = Path(__file__).parent.parent


def _row(method, forward, final, seed):
    return {"status": "completed", "method": method, "forward_sparsity": forward, "final": final, "seed": seed}


def test_pivot_is_mean_and_std_over_seeds_per_method_and_sparsity():
    rows = [_row("dense", 0.0, 90.0, 0), _row("dense", 0.0, 92.0, 1),
            _row("topkast", 0.9, 80.0, 0), _row("topkast", 0.9, 84.0, 1), _row("static", 0.8, 70.0, 0),
            {"status": "failed", "method": "static", "forward_sparsity": 0.9, "final": None, "seed": 0}]
    lines = pivot(rows).splitlines()
    assert lines[0] == "| method | 0.8 | 0.9 |"
    assert lines[2] == "| dense | 91.0 ± 1.4 | 91.0 ± 1.4 |"
    assert lines[3] == "| static | 70.0 ± 0.0 | - |"
    assert lines[4] == "| topkast | - | 82.0 ± 2.8 |"


@pytest.mark.usefixtures("builds_runs")  # (bench.backends calls build_run)
def test_quick_backend_table_has_every_backend_machine_and_date(tmp_path):
    from bench import backends

    text = backends.main(tmp_path, quick=True).read_text()
    assert "Machine:" in text and "Date:" in text
    for row in ("| 90/80 | dense |", "| 90/80 | masked |", "| 90/80 | sparse |", "| 90/80 | auto |"):
        assert row in text
    assert "refused: sparsity.backend=sparse cannot run layer features.2" in text  # the CNN's convs
    assert "`auto` at 90/80" in text
    assert backends.HAS_TRANSFORMER or "transformer is not included" in text
    assert "| 1x1 64->256 | 8x64x56x56 | 90/80 |" in text and "| 3x3 64->64 | 8x64x56x56 | 90/80 |" in text
    assert "peak memory (tensors)" in text


@pytest.mark.usefixtures("builds_runs")  # (bench.backends calls build_run)
def test_quick_block_rows_cover_every_block_size():
    from bench import backends

    text = "\n".join(backends.block_table(quick=True))
    assert "| 90/80 | dense | 1.00 (" in text and "| 90/80 | sparse, unstructured (CSR) |" in text
    for b in backends.BLOCKS:
        assert f"| 90/80 | sparse, {b}x{b} blocks (BSR) |" in text  # measured, or refused by the tiny MLP
    assert "peak memory (tensors)" in text


@pytest.mark.slow
def test_quick_bench_writes_every_result(tmp_path):
    out = tmp_path / "results"
    done = subprocess.run([sys.executable, "-m", "bench", "--quick", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    names = {p.name for p in out.iterdir()}
    assert {"speed.md", "memory.md", "backends.md", "scaling.md", "accuracy_mnist1d.md", "accuracy_mnist1d.png",
            "accuracy_digits.csv"} <= names
    assert "| 2 processes (steps/s) |" in (out / "scaling.md").read_text()
    speed = (out / "speed.md").read_text()
    assert "Machine:" in speed and "Date:" in speed and "refresh every 100 steps" in speed
    table = (out / "accuracy_mnist1d.md").read_text()
    assert "| topkast |" in table and "| dense |" in table


def _lm_run(root, row, seed, final, nonzero, params=1000, status="completed"):
    """A finished LM run as the bench leaves it: summary.json and metrics.jsonl."""
    d = root / row / f"seed{seed}"
    d.mkdir(parents=True)
    summary = {"status": status, "metric": "bpc", "final": {"bpc": final}, "wall_time_s": 10.0,
               "density": {"nonzero": nonzero, "params": params}}
    (d / "summary.json").write_text(json.dumps(summary))
    (d / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "split": "val", "bpc": final + 1 - s / 200}) + "\n"
                                             for s in (100, 200)))


def test_lm_table_gathers_runs_of_several_batches_and_marks_every_target(tmp_path):
    root = tmp_path / "runs"
    for seed, (d, t) in enumerate([(2.30, 2.35), (2.32, 2.39)]):  # one batch: dense and Top-KAST 80/60
        _lm_run(root, "dense", seed, d, 900)
        _lm_run(root, "topkast80", seed, t, 200)
    _lm_run(root, "topkast80_w272", 0, 2.20, 850)  # another batch
    _lm_run(root, "rigl80", 0, 9.0, 200, status="failed")
    stats = lm.collect(root)
    assert stats["dense"].finals == [2.30, 2.32] and stats["dense"].curve == pytest.approx({100: 2.81, 200: 2.31})
    assert stats["rigl80"].failed == 1 and stats["rigl80"].mean is None
    status = {t: s for t, _, s in lm.targets(stats)}
    assert status["dense with the tool's LM defaults, 2000 steps: ≤ 2.40 bpc"] == "met"
    assert status["Top-KAST 80/60 − dense ≤ +0.10"] == "met"  # +0.06
    assert status["Top-KAST 90/80 − dense ≤ +0.20"] == "not run"
    assert status["Top-KAST 80% ahead of RigL and static by ≥ 0.03"] == "not run"
    assert status["bigger-but-sparser: Top-KAST 80/60, width 272, non-zeros ≤ dense's, below dense by ≥ 0.05"] == "met"

    out = tmp_path / "results"
    text = lm.report(root, out, quick=False).read_text()
    assert "Machine:" in text and "Date:" in text
    assert "| Top-KAST 80/60 | 2.370 ± 0.028 | 2 | +0.060 | 200 | 1,000 | 10 |" in text
    assert "| RigL 80% | - | 0 (1 failed) |" in text
    assert "Not measured yet" in text  # step times: none saved in this runs directory
    assert {"lm_tinyshakespeare.csv", "lm_tinyshakespeare.png"} <= {p.name for p in out.iterdir()}
    rows = list(csv.DictReader((out / "lm_tinyshakespeare.csv").open()))
    assert [r["row"] for r in rows] == ["dense", "topkast80", "rigl80", "topkast80_w272"]


@pytest.mark.skipif(not SHAKESPEARE.is_file(), reason=f"{SHAKESPEARE} is absent (../shared/data from the repository)")
def test_lm_diagnostics_writes_a_row_per_layer_and_refresh(tmp_path):
    from bench import lm_diagnostics

    out = tmp_path / "diag.csv"
    lm_diagnostics.main(["model.layers=1", "model.width=16", "model.heads=1", "dataset.context=16",
                         "sparsity.refresh_interval=3", "--steps", "10", "--out", str(out)])
    rows = list(csv.DictReader(out.open()))
    assert list(rows[0]) == list(lm_diagnostics.COLUMNS)
    assert sorted({int(r["step"]) for r in rows}) == [3, 6, 8]  # refreshes, then the lock at 80% of the run
    assert len({r["layer"] for r in rows}) == 4  # attention qkv and projection, the MLP's two
    assert all(0 <= float(r["churn"]) <= 1 and float(r["from_A0"]) <= 1 for r in rows)
    assert "promoted_grad_top_half" in out.with_suffix(".md").read_text()


@pytest.mark.slow
@pytest.mark.skipif(not SHAKESPEARE.is_file(), reason=f"{SHAKESPEARE} is absent (../shared/data from the repository)")
def test_quick_lm_bench_writes_its_table(tmp_path):
    out = tmp_path / "results"
    done = subprocess.run([sys.executable, "-m", "bench", "lm", "--quick", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert {"lm_tinyshakespeare.md", "lm_tinyshakespeare.csv", "lm_tinyshakespeare.png"} <= {p.name for p in out.iterdir()}
    table = (out / "lm_tinyshakespeare.md").read_text()
    assert "| dense |" in table and "| Top-KAST 80/60 |" in table and "| Top-KAST 80/60, width 272 |" in table
    assert "relative to dense" in table and "| Top-KAST 90/80, sparse |" in table
    assert "| Top-KAST 80/60 − dense ≤ +0.10 |" in table and "| not run |" in table


@pytest.mark.usefixtures("builds_runs")
def test_quick_blocks_bench_compares_block_sizes_on_the_default_task(tmp_path):
    from bench import blocks, suite

    jobs = blocks.jobs(tmp_path / "runs", [blocks.DEFAULT_TASK], (0,), quick=True)
    assert {j.setting for j in jobs} == {"current", *blocks.BLOCKS}
    assert all(f"sparsity.dense_layers=[{blocks.DENSE[blocks.DEFAULT_TASK]}]" in j.overrides for j in jobs if j.method != "dense")
    results = suite.run_all([j for j in jobs if j.setting != "16x16"], workers=1)  # (the quick model has 8 channels)
    assert all(s["status"] == "completed" for s in results.values()), results
    text = blocks.report(suite.Results(results), [blocks.DEFAULT_TASK], {"unstructured": 0.6, "4x4": 0.4}, tmp_path, (0,), True).read_text()
    assert "Machine:" in text and "| default_task_c32 |" in text and "| 4x4 | 0.40 |" in text
    assert "Aim: 4x4 blocks within 1.5 points of unstructured on the default task:" in text
    assert (tmp_path / "blocks.png").stat().st_size > 0


def test_gpu_structured_rows_run_their_code_on_the_cpu():
    """The GPU bench's 1x1-convolution and 2:4 rows, on the CPU with tiny sizes (a CUDA device
    runs the same code; its block rows are `backends.block_table`, tested above; without a
    device `python -m bench gpu` is skipped)."""
    from bench import gpu

    text = "\n".join(gpu.pointwise_blocks(quick=True, device="cpu") + gpu.semi_structured(quick=True, device="cpu"))
    assert "| 1x1 64->256 | 8x64x56x56 |" in text and "| unstructured | 8x8 |" in text
    assert "| float16 | unavailable:" in text  # torch's semi-structured kernels are CUDA-only


def test_lm_bench_shows_the_curve_of_a_run_that_did_not_finish(tmp_path):
    import json as _json

    from bench import lm

    run = tmp_path / "topkast80_w272" / "seed0"
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text("".join(_json.dumps(r) + "\n" for r in (
        {"step": 200, "split": "val", "bpc": 3.5}, {"step": 200, "split": "train", "loss": 2.0},
        {"step": 400, "split": "val", "bpc": 3.25})))
    assert lm.unfinished(tmp_path) == {"Top-KAST 80/60, width 272, seed 0": {200: 3.5, 400: 3.25}}
    (run / "summary.json").write_text(_json.dumps({"status": "completed"}))
    assert lm.unfinished(tmp_path) == {}
