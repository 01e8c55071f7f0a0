"""topkast sweep: every job validated first, one summary row per job (failed ones too),
summarize-only rebuild, resume=auto in a fixed sweep directory, launcher plugins."""

import csv
import json
import os
import re
import shutil
import signal
import subprocess
import time

import pytest

from conftest import run_topkast, topkast_script
from topkast_cli.cli import main
from topkast_cli.sweep_summary import FILES, merge_params

# A sweep job that takes seconds.
QUICK = [
    "trainer.max_steps=6",
    "trainer.eval_every=3",
    "trainer.log_every=3",
    "trainer.checkpoint_every=3",
    "trainer.progress=false",
    "dataset.num_samples=1000",
    "sparsity.refresh_interval=2",
]


def rows(sweep_dir):
    with (sweep_dir / "summary.csv").open() as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """`topkast sweep` over three sparsities, through the console script."""
    root = tmp_path_factory.mktemp("sweep")
    result = run_topkast(["sweep", "sparsity.forward=0.0,0.5,0.9", *QUICK, f"hydra.sweep.dir={root}"], cwd=root)
    return root, result


def test_sweep_writes_one_row_per_run(sweep):
    root, result = sweep
    assert result.returncode == 0, result.stderr[-2000:]
    assert all((root / name).is_file() and (root / name).stat().st_size > 0 for name in FILES)
    table = rows(root)
    assert [(r["method"], float(r["forward_sparsity"]), float(r["backward_sparsity"])) for r in table] == [
        ("dense", 0.0, 0.0),
        ("topkast", 0.5, 0.0),  # backward null: backward density = 2 x 0.5, capped at 1
        ("topkast", 0.9, 0.8),
    ]
    assert all(r["status"] == "completed" and r["steps"] == "6" for r in table)
    assert abs(float(table[2]["sparse_density"]) - 0.1) < 1e-3
    # each job's directory is named by its swept value only
    assert sorted(r["job"] for r in table) == ["sparsity.forward-0.0", "sparsity.forward-0.5", "sparsity.forward-0.9"]
    md = (root / "summary.md").read_text()
    assert md.count("| topkast |") == 2 and md.count("| dense |") == 1 and "final acc1" in md
    assert "| method |" in result.stdout  # the table is printed


def test_the_table_shows_weights_and_training_flops(sweep):
    root, _ = sweep
    dense, half, sparse = rows(root)
    assert int(dense["nonzero"]) == int(dense["params"]) == int(sparse["params"]) > int(sparse["nonzero"])
    assert dense["train_flops_per"] == "example"
    assert float(dense["train_flops"]) > float(half["train_flops"]) > float(sparse["train_flops"]) > 0
    md = (root / "summary.md").read_text()
    assert "| non-zero weights | dense weights | train FLOPs / example |" in md
    assert f"| {int(sparse['nonzero']):,} | {int(sparse['params']):,} |" in md


def test_each_run_has_its_hparams_in_its_own_tensorboard_file(sweep):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import metadata

    root, _ = sweep
    for forward in ("0.0", "0.5", "0.9"):
        tb = root / f"sparsity.forward-{forward}" / "tb"
        assert [p.name for p in tb.iterdir() if p.is_dir()] == []  # no add_hparams sub-run
        events = EventAccumulator(str(tb))
        events.Reload()
        content = events.PluginTagToContent("hparams")
        start = metadata.parse_session_start_info_plugin_data(content[metadata.SESSION_START_INFO_TAG])
        assert start.hparams["sparsity.forward"].number_value == float(forward)
        assert start.hparams["method"].string_value == ("dense" if forward == "0.0" else "topkast")
        experiment = metadata.parse_experiment_plugin_data(content[metadata.EXPERIMENT_TAG])
        metrics = [m.name.tag for m in experiment.metric_infos]
        assert "val/acc1" in metrics and all(m in events.Tags()["scalars"] for m in metrics)
        assert metadata.SESSION_END_INFO_TAG in content


def test_a_sweep_jobs_checkpoint_evaluates_by_its_plain_path(sweep, capsys):
    root, _ = sweep
    final = {r["job"]: float(r["final"]) for r in rows(root)}["sparsity.forward-0.9"]
    main(["eval", f"ckpt={root}/sparsity.forward-0.9/checkpoints/last.ckpt", "eval.progress=false"])
    report = json.loads((root / "sparsity.forward-0.9" / "checkpoints" / "last.eval.json").read_text())
    assert report["metrics"]["acc1"] == pytest.approx(final)
    assert "sparse network α" in capsys.readouterr().out


def test_summarize_rebuilds_without_training(sweep, capsys):
    root, _ = sweep
    before = (root / "summary.csv").read_text()
    for name in FILES:
        (root / name).unlink()
    main(["sweep", "--summarize", str(root)])
    assert all((root / name).is_file() for name in FILES)
    assert (root / "summary.csv").read_text() == before
    assert "| method |" in capsys.readouterr().out
    (root / "summary.md").unlink()
    main(["sweep", f"summarize={root}"])
    assert (root / "summary.md").is_file()


def test_summarize_reports_unfinished_and_missing_jobs(sweep, tmp_path):
    root, _ = sweep
    copy = tmp_path / "copy"
    shutil.copytree(root, copy, ignore=shutil.ignore_patterns("*.ckpt", "tb"))
    (copy / "sparsity.forward-0.5" / "summary.json").unlink()  # killed mid-run
    shutil.rmtree(copy / "sparsity.forward-0.9")  # never started
    with pytest.raises(SystemExit) as exit:
        main(["sweep", "--summarize", str(copy)])
    assert exit.value.code == 1
    status = {r["overrides"].split()[0]: r["status"] for r in rows(copy)}
    assert status == {"sparsity.forward=0.0": "completed", "sparsity.forward=0.5": "incomplete",
                      "sparsity.forward=0.9": "missing"}


def test_summarize_of_a_non_sweep_directory_is_exit_2(tmp_path, capsys):
    for target in (tmp_path, tmp_path / "nope"):
        with pytest.raises(SystemExit) as exit:
            main(["sweep", "--summarize", str(target)])
        assert exit.value.code == 2
        assert capsys.readouterr().err.count("\n") == 1


def test_a_failing_job_is_a_failed_row_and_exit_1(tmp_path):
    # lr=1e30 passes the config checks but the job diverges at run time (its summary.json
    # says failed, with the reason).
    with pytest.raises(SystemExit) as exit:
        main(["sweep", "sparsity.forward=0.9", "optimizer=sgd", "optimizer.lr=0.05,1e30", *QUICK,
              f"hydra.sweep.dir={tmp_path}"])
    assert exit.value.code == 1
    table = {r["job"]: r for r in rows(tmp_path)}
    good, bad = table["optimizer.lr-0.05"], table["optimizer.lr-1e+30"]
    assert good["status"] == "completed"
    assert bad["status"] == "failed" and "the loss is nan" in bad["error"]
    md = (tmp_path / "summary.md").read_text()
    assert "| failed |" in md and "the loss is nan" in md
    assert (tmp_path / "accuracy_vs_sparsity.png").is_file()


@pytest.mark.parametrize(
    "args, expect",
    [
        (["sparsity.forward=0.5,1.5"], "sparsity.forward=1.5"),
        # sweep.yaml's forward sparsities include 0.0 and 0.5: backward 0.7 is above them
        (["sparsity.backward=0.7"], "sparsity.backward=0.7 is above"),
        (["resume=some/last.ckpt"], "resume=auto"),
    ],
)
def test_every_job_is_checked_before_anything_runs(tmp_path, capsys, args, expect):
    sweep_dir = tmp_path / "sweep"
    with pytest.raises(SystemExit) as exit:
        main(["sweep", *args, f"hydra.sweep.dir={sweep_dir}"])
    err = capsys.readouterr().err
    assert exit.value.code == 2 and expect in err and err.count("\n") == 1
    assert not sweep_dir.exists()


def test_sweep_params_merge_like_hydras_basic_sweeper():
    params = {"sparsity.forward": "0.0,0.5", "seed": "0"}
    assert merge_params(params, ["sparsity.forward=0.8,0.9", "trainer.max_steps=5"]) == [
        "sparsity.forward=0.8,0.9",
        "seed=0",
        "trainer.max_steps=5",
    ]
    assert merge_params(None, []) == []


def test_rerun_continues_each_job_from_its_last_checkpoint(tmp_path, capsys):
    """A sweep killed mid-job, re-run with the same command (fixed hydra.sweep.dir,
    resume=auto), continues the killed job from its last.ckpt and runs the others."""
    args = ["sweep", "sparsity.forward=0.5,0.9", *QUICK, "trainer.max_steps=12", f"hydra.sweep.dir={tmp_path}", "resume=auto"]
    first = tmp_path / "sparsity.forward-0.5"
    proc = subprocess.Popen([topkast_script(), *args], cwd=tmp_path, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True, env=os.environ.copy())
    try:
        deadline = time.time() + 240
        while not (first / "checkpoints" / "last.ckpt").exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.01)
        os.killpg(proc.pid, signal.SIGKILL)  # as a cluster would: no chance to write anything
    finally:
        proc.wait()
    assert not (first / "summary.json").exists(), "the job finished before it could be killed"
    # without resume=auto the directory is refused before anything runs
    with pytest.raises(SystemExit) as refused:
        main([a for a in args if a != "resume=auto"])
    assert refused.value.code == 2 and "continue the sweep with resume=auto" in capsys.readouterr().err
    main(args)
    resumed = re.search(r"resumed from \S+ at step (\d+)", (first / "train.log").read_text())
    assert resumed and 3 <= int(resumed.group(1)) < 12
    steps = [json.loads(line)["step"] for line in (first / "metrics.jsonl").read_text().splitlines()]
    assert steps == [3, 6, 9, 12]  # one history, no step logged twice
    assert [r["status"] for r in rows(tmp_path)] == ["completed", "completed"]


@pytest.mark.parametrize("launcher", [
    ["hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10"],
    pytest.param(["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"], marks=pytest.mark.slow),
], ids=["submitit_local", "joblib"])
def test_launcher_plugins_run_a_two_job_sweep(tmp_path, launcher):
    result = run_topkast(["sweep", "sparsity.forward=0.5,0.9", *QUICK, *launcher, f"hydra.sweep.dir={tmp_path}"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    table = rows(tmp_path)
    assert [(r["forward_sparsity"], r["status"]) for r in table] == [("0.5", "completed"), ("0.9", "completed")]
    assert all((tmp_path / name).is_file() for name in FILES)


def test_slurm_preset_makes_a_valid_sbatch_script(tmp_path, monkeypatch):
    """conf/hydra/launcher/slurm.yaml, turned into submitit parameters the way the submitit
    launcher does, gives the sbatch header we document (no cluster needed: a fake srun)."""
    import submitit
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
    from omegaconf import OmegaConf

    from topkast_cli.config import compose

    (tmp_path / "srun").write_text("#!/bin/sh\nexit 1\n")
    (tmp_path / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    cfg = compose("sweep", ["hydra/launcher=slurm", f"hydra.sweep.dir={tmp_path}/sweep", "hydra.launcher.partition=gpu"])
    params = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert params["_target_"].endswith("SlurmLauncher")
    executor = submitit.AutoExecutor(cluster="slurm", folder=params["submitit_folder"],
                                     slurm_max_num_timeout=params["max_num_timeout"])
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(**{
        k if k in base else f"slurm_{k}": v
        for k, v in params.items() if k not in ("_target_", "submitit_folder", "max_num_timeout")
    })
    script = executor._executor._make_submission_file_text("python -u job.py", "uid")
    for line in ("--partition=gpu", "--time=240", "--signal=USR2@120", "--gpus-per-node=1", "--job-name=train"):
        assert f"#SBATCH {line}" in script
    assert executor._executor.max_num_timeout == 5
