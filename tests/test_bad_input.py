"""A user's mistake, through the real console script: exit code 2, exactly one line on
stderr naming the key or path and what is allowed, no traceback, and no file of an earlier
run changed (each case gets its own copy of a finished run, hashed before and after).

Most cases also point the run at that copy with `resume=auto`, so a check that came only
after Hydra started would rewrite its .hydra/ and train.log and fail the hash comparison.
The cases run concurrently (each console start costs seconds of imports).
"""

from __future__ import annotations

import hashlib
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from conftest import TINY, run_topkast

CONF = Path(__file__).resolve().parents[1] / "topkast_cli" / "conf"
HAS_CIFAR = (CONF / "dataset" / "cifar10.yaml").exists()

AUTO = ["resume=auto", "hydra.run.dir={run}"]  # resume the earlier run: must stay untouched
FRESH = ["hydra.run.dir={tmp}/{id}-new"]  # a new run directory: must not be created

# id: (arguments after TINY, strings the error line must contain, skip reason or None);
# "dataset=..." cases get no TINY (its dataset.num_samples is MNIST-1D's).
CASES = {
    "unknown-group-option": (["model=resnet5", *AUTO], ["model/resnet5", "cnn1d", "mlp"], None),
    "unknown-key": (["trainer.foo=1", *AUTO], ["trainer.foo", "max_steps", "+trainer.foo"], None),
    "wrong-type": (["trainer.max_steps=abc", *AUTO], ["trainer.max_steps", "integer >= 1"], None),
    "forward-above-1": (["sparsity.forward=1.5", *AUTO], ["sparsity.forward=1.5", "0 <= sparsity.forward < 1"], None),
    "forward-negative": (["sparsity.forward=-0.1", *AUTO], ["sparsity.forward=-0.1", "0 <= sparsity.forward < 1"], None),
    "backward-above-forward": (
        ["sparsity.forward=0.5", "sparsity.backward=0.8", *AUTO],
        ["sparsity.backward=0.8", "backward <= forward"],
        None,
    ),
    "refresh-interval-0": (["sparsity.refresh_interval=0", *AUTO], ["sparsity.refresh_interval=0", ">= 1"], None),
    "batch-size-0": (["dataset.batch_size=0", *AUTO], ["dataset.batch_size=0", ">= 1"], None),
    "negative-lr": (["optimizer.lr=-1", *AUTO], ["optimizer.lr=-1", "> 0"], None),
    "nan-lr": (["optimizer.lr=nan", *AUTO], ["optimizer.lr=nan", "> 0"], None),
    "list-for-number": (["sparsity.forward=[0.5]", *AUTO], ["sparsity.forward", "number"], None),
    "missing-interpolation": (["trainer.max_steps=${{nope}}", *AUTO], ["nope"], None),
    "dense-pattern-matches-nothing": (
        ["sparsity.dense_layers=[nope*]", *AUTO],
        ["sparsity.dense_layers", "nope*", "features.0, features.2"],
        None,
    ),
    "layer-keeps-no-weight": (["sparsity.forward=0.9999", *AUTO], ["features.2", "no weight", "dense_layers"], None),
    "unknown-backend": (["sparsity.backend=banana", *AUTO], ["sparsity.backend='banana'", "masked, sparse, auto"], None),
    "sparse-backend-conv-layer": (
        ["sparsity.backend=sparse", *AUTO],
        ["sparsity.backend=sparse", "layer features.2", "Conv1d", "sparsity.backend=auto"],
        None,
    ),
    "sparse-backend-rigl": (
        ["dataset=mnist1d", "dataset.num_samples=1000", "sparsity=rigl", "sparsity.backend=sparse", *FRESH],
        ["sparsity.backend=sparse", "sparsity=rigl", "dense gradient", "use sparsity.backend=masked"],
        None,
    ),
    "block-not-dividing-a-layer": (
        ["sparsity.block=[4,4]", *AUTO],
        ["sparsity.block=[4, 4] does not divide layer features.2", "25 x 75", "sparsity.dense_layers"],
        None,
    ),
    "block-of-zero-rows": (["sparsity.block=[0,4]", *AUTO], ["sparsity.block=[0, 4]", "two integers >= 1"], None),
    "block-not-integers": (["sparsity.block=[2.5,4]", *AUTO], ["sparsity.block=[2.5, 4]", "two integers >= 1"], None),
    "block-on-a-3x3-conv-on-the-sparse-backend": (
        ["sparsity.block=[5,5]", "sparsity.backend=sparse", *AUTO],
        ["sparsity.backend=sparse cannot run layer features.2", "Conv1d", "1x1 convolutions", "sparsity.backend=auto"],
        None,
    ),
    "non-square-block-on-the-sparse-backend": (
        ["sparsity.block=[5,1]", "sparsity.backend=sparse", *AUTO],
        ["sparsity.backend=sparse cannot run sparsity.block=[5, 1]", "square blocks only", "sparsity.backend=masked"],
        None,
    ),
    "nm-on-the-sparse-backend": (
        ["sparsity.pattern=nm", "sparsity.nm=[1,5]", "sparsity.forward=null", "sparsity.backend=sparse", *AUTO],
        ["sparsity.backend=sparse cannot run sparsity.nm=[1, 5]", "N:M", "sparsity.backend=masked"],
        None,
    ),
    "nm-n-above-m": (
        ["sparsity.pattern=nm", "sparsity.nm=[4,2]", "sparsity.forward=null", *AUTO],
        ["sparsity.nm=[4, 2]", "n must be below m"],
        None,
    ),
    "nm-m-not-dividing-the-inputs": (
        ["sparsity.pattern=nm", "sparsity.nm=[2,4]", "sparsity.forward=0.5", *AUTO],
        ["sparsity.nm=[2, 4]", "layer features.2", "75 inputs", "m=4"],
        None,
    ),
    "nm-and-a-conflicting-forward": (
        ["sparsity.pattern=nm", "sparsity.nm=[1,5]", *AUTO],
        ["sparsity.forward=0.9", "sparsity.nm=[1, 5]", "sparsity.forward=0.8 or null"],
        None,
    ),
    "resume-missing-file": (["resume={tmp}/missing.ckpt", *FRESH], ["resume=", "missing.ckpt", "no such file"], None),
    "resume-directory": (["resume={run}", *FRESH], ["is a directory", "last.ckpt"], None),
    "resume-empty-file": (["resume={tmp}/empty.ckpt", *FRESH], ["empty.ckpt", "is empty"], None),
    "resume-truncated": (["resume={tmp}/truncated.ckpt", *FRESH], ["truncated.ckpt", "truncated"], None),
    "resume-not-a-checkpoint": (["resume={tmp}/notes.txt", *FRESH], ["notes.txt", "not a topkast checkpoint"], None),
    "resume-other-model": (
        ["resume={run}/checkpoints/last.ckpt", "model=mlp"],
        ["model._target_", "CNN1d", "MLP"],
        None,
    ),
    "resume-other-format-version": (["resume={tmp}/v99.ckpt", *FRESH], ["format version 99", "reads version 1"], None),
    "resume-auto-truncated-last": (["resume=auto", "hydra.run.dir={run}"], ["truncated", "last.ckpt"], "truncate"),
    "output-dir-under-a-file": (["hydra.run.dir={tmp}/a_file/run"], ["hydra.run.dir=", "a_file is a file"], None),
    "fresh-run-over-a-run": (["hydra.run.dir={run}"], ["already holds a run", "resume=auto"], None),
    "model-does-not-fit-data": (
        ["dataset=digits", "model=cnn1d", *FRESH],
        ["model (CNN1d) does not fit dataset Digits", "[1, 8, 8]", "conv1d"],
        None,
    ),
    "input-too-small-for-model": (
        ["dataset=synthetic", "dataset.input_shape=[5]", "model=cnn1d", *FRESH],
        ["model (CNN1d)", "dataset Synthetic", "[5]"],
        None,
    ),
    "dataset-root-missing": (
        ["dataset=cifar10", "dataset.root={tmp}/no_such_dir", *FRESH],
        ["dataset.root=", "no_such_dir", "dataset.download=true"],
        None if HAS_CIFAR else "no cifar10 dataset config yet",
    ),
    "dataset-not-downloaded": (
        ["dataset=cifar10", "model=resnet18", "dataset.root={tmp}/empty_dir", "hydra.run.dir={tmp}/{id}-new"],
        ["dataset.root=", "empty_dir"],
        None if HAS_CIFAR else "no cifar10 dataset config yet",
    ),
}


def tree_hashes(root: Path) -> dict[str, str]:
    """sha256 of every file under root (hidden ones too), by relative path."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def earlier_run(tmp_path_factory) -> Path:
    """A finished run made by the console script (with .hydra/, train.log, tb/, ...)."""
    work = tmp_path_factory.mktemp("earlier")
    run = work / "run"
    r = run_topkast(["train", *TINY, f"hydra.run.dir={run}"], cwd=work, env={"OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    return run


def _inputs(tmp: Path, earlier: Path) -> None:
    """The bad files the resume cases point at."""
    last = earlier / "checkpoints" / "last.ckpt"
    data = last.read_bytes()
    (tmp / "empty.ckpt").write_bytes(b"")
    (tmp / "truncated.ckpt").write_bytes(data[: len(data) // 2])
    (tmp / "notes.txt").write_text("not a checkpoint\n")
    state = torch.load(last, weights_only=True)
    torch.save({**state, "format_version": 99}, tmp / "v99.ckpt")
    (tmp / "a_file").write_text("a regular file: nothing can be created under it\n")
    (tmp / "empty_dir").mkdir()


@pytest.fixture(scope="module")
def outcomes(earlier_run, tmp_path_factory):
    """Run every case once (concurrently); per case: the process and the hashes of its own
    copy of the earlier run before and after."""
    tmp = tmp_path_factory.mktemp("cases")
    _inputs(tmp, earlier_run)

    def one(case_id):
        args, _, skip = CASES[case_id]
        if skip and skip != "truncate":
            return None
        run = tmp / case_id
        shutil.copytree(earlier_run, run)
        if skip == "truncate":
            last = run / "checkpoints" / "last.ckpt"
            last.write_bytes(last.read_bytes()[:1000])
        before = tree_hashes(run)
        filled = [a.format(run=run, tmp=tmp, id=case_id) for a in args]
        base = ["trainer.max_steps=2", "trainer.progress=false"] if args[0].startswith("dataset=") else TINY
        proc = run_topkast(["train", *base, *filled], cwd=tmp, timeout=300)
        return proc, before, tree_hashes(run), tmp / f"{case_id}-new"

    with ThreadPoolExecutor(max_workers=max(2, min(4, os.cpu_count() or 2))) as pool:
        return dict(zip(CASES, pool.map(one, CASES)))


@pytest.mark.parametrize("case_id", list(CASES))
def test_mistake_is_one_line_exit_2_and_changes_nothing(case_id, outcomes):
    args, must_contain, skip = CASES[case_id]
    if skip and skip != "truncate":
        pytest.skip(skip)
    proc, before, after, new_dir = outcomes[case_id]
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    line = lines[0]
    assert line.startswith("topkast train: error: "), line
    for text in must_contain:
        assert text in line, (text, line)
    assert after == before, "a file of the earlier run changed"
    if case_id != "dataset-not-downloaded":  # that one is found when the data loads
        assert not new_dir.exists(), "a run directory was made for a run that could not start"
