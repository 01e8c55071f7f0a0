"""The accuracy suite (bench/suite.py): its tasks compose, its measures say what they claim,
and a quick run writes the report."""

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from bench import suite
from bench.suite import METHODS, SETTINGS, TASKS, Job, Results, Task, collapsed, gap, jobs_for

from conftest import make_config


def _compose(job):
    overrides = [o for o in job.overrides if not o.startswith("dataset.path=")]  # (a file the test need not have)
    if TASKS[job.task].needs is not None:
        overrides.append(f"dataset.path={Path(__file__)}")
    return make_config(overrides)


@pytest.mark.parametrize("name", sorted(TASKS))
def test_every_task_composes_with_every_method(name, tmp_path):
    for job in jobs_for(tmp_path, "current", (), [name], list(METHODS), (0,), quick=False):
        cfg = _compose(job)
        method, forward = METHODS[job.method]
        assert cfg.sparsity._target_.lower().endswith(method)
        assert cfg.seed == 0 and cfg.trainer.threads == 1
        if method != "dense":
            assert cfg.sparsity.forward == forward


def test_every_setting_composes_and_sets_what_it_names(tmp_path):
    for setting, (applies, extra) in SETTINGS.items():
        method = next(m for m in METHODS if METHODS[m][0] == applies[0])
        (job,) = jobs_for(tmp_path, setting, extra, ["digits_mlp"], [method], (0,), quick=False)
        cfg = _compose(job)
        for override in extra:
            key, value = override.split("=", 1)
            got = OmegaConf.select(cfg, key)
            if value.startswith("["):  # a list of names
                assert list(got) == value.strip("[]").split(","), (setting, override)
                continue
            assert (got is None and value == "null") or str(got) == value or float(got) == float(value), (setting, override)


def test_suite_spans_model_families_optimizers_and_batch_norm():
    families = {t.family for t in TASKS.values()}
    assert len(TASKS) >= 7 and len(families) >= 5
    overrides = " ".join(o for t in TASKS.values() for o in t.overrides)
    assert "optimizer=sgd" in overrides and "optimizer=adam" in overrides
    assert any("batch norm" in t.family for t in TASKS.values())
    assert any(t.metric == "bpc" for t in TASKS.values())


def test_gap_is_how_much_worse_than_dense_in_the_tasks_unit():
    acc = Task("a", "f", ())
    lm = Task("b", "f", (), metric="bpc", chance=4.0)
    assert gap(acc, 90.0, 95.0) == pytest.approx(5.0)  # accuracy points below dense
    assert gap(acc, 96.0, 95.0) == pytest.approx(-1.0)  # better than dense: negative
    assert gap(lm, 2.2, 2.0) == pytest.approx(10.0)  # bpc: percent above dense
    assert collapsed(acc, 12.0) and not collapsed(acc, 40.0) and collapsed(acc, None)
    assert collapsed(lm, 4.2) and not collapsed(lm, 2.5)


def _job(setting, task, method, seed):
    return Job(setting, task, method, seed, (), Path("x"))


def _summary(value, metric="acc1"):
    return {"status": "completed", "final": {metric: value}}


def test_results_worst_case_is_the_worst_task_of_the_mean_gap_over_seeds():
    results = {
        _job("current", "digits_mlp", "dense", 0): _summary(97.0), _job("current", "digits_mlp", "dense", 1): _summary(99.0),
        _job("current", "digits_mlp", "topkast90", 0): _summary(96.0), _job("current", "digits_mlp", "topkast90", 1): _summary(94.0),
        _job("current", "mnist1d_cnn", "dense", 0): _summary(90.0),
        _job("current", "mnist1d_cnn", "topkast90", 0): _summary(89.0),
        _job("current", "mnist1d_cnn", "topkast95", 0): {"status": "failed"},
    }
    r = Results(results)
    assert r.dense("digits_mlp") == pytest.approx(98.0)
    assert r.gaps("current", "digits_mlp", "topkast90") == pytest.approx([2.0, 4.0])
    worst, mean, at = suite.worst_and_mean(r, "current", "topkast90", r.tasks())
    assert (worst, at) == (pytest.approx(3.0), "digits_mlp") and mean == pytest.approx(2.0)
    assert r.collapses("current", "mnist1d_cnn", "topkast95") == 1  # a failed run counts
    table = suite.gap_table(r, "current", ["topkast90", "topkast95"], r.tasks())
    assert "| **worst** | | **+3.0** (digits_mlp) |" in table and "-!" in table


def test_quick_suite_writes_report_and_plot(tmp_path):
    path = suite.main(tmp_path, quick=True, jobs=1)
    text = path.read_text()
    assert "Machine:" in text and "Date:" in text
    assert "| **worst** |" in text and "## Targets" in text
    assert "| mnist1d_cnn | topkast90 | former |" in text
    assert (tmp_path / "suite.png").stat().st_size > 0
    # A second call reuses the runs: nothing trains again.
    before = {p: p.stat().st_mtime for p in (tmp_path / "runs").rglob("summary.json")}
    suite.main(tmp_path, quick=True, jobs=1)
    assert before == {p: p.stat().st_mtime for p in (tmp_path / "runs").rglob("summary.json")}
