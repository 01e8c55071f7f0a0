"""The user's manual: the configuration reference lists exactly the keys of the config files,
each with a meaning; the site builds with --strict (no broken link, page or anchor) and
without the network; the README's links lead somewhere; and every command of Getting started
runs, on data made here."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from conftest import run_topkast

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "topkast_cli" / "conf"
DOCS = ROOT / "docs"


def config_reference():
    spec = importlib.util.spec_from_file_location("config_reference", DOCS / "config_reference.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("config_reference", module)  # (its dataclasses look themselves up)
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------ the configuration reference
def leaf_keys(path: Path) -> dict[str, object]:
    """{key as typed on the command line: value} of every leaf of a config file, read with
    PyYAML (not with the generator's reader), without what the reference shows otherwise: the
    defaults list, `_target_`/`_partial_`, and the `hydra:` block outside conf/hydra/."""
    name = path.relative_to(CONF).with_suffix("").as_posix()
    group = name.rpartition("/")[0]
    text = path.read_text()
    global_package = text.startswith("# @package _global_")
    prefix = "" if global_package or not group else group.replace("/", ".") + "."
    found = {}

    def walk(node: dict, parents: list[str]):
        for key, value in node.items():
            if (not parents and key == "defaults") or key in ("_target_", "_partial_"):
                continue
            if not parents and key == "hydra" and not name.startswith("hydra/"):
                continue
            if isinstance(value, dict) and value:
                walk(value, [*parents, key])
            else:
                found[prefix + ".".join([*parents, key])] = value

    walk(yaml.safe_load(text) or {}, [])
    return found


def reference_tables(markdown: str) -> dict[str, dict[str, tuple[str, str]]]:
    """{file name: {key: (default, meaning)}} from the generated Markdown."""
    tables: dict[str, dict[str, tuple[str, str]]] = {}
    current = None
    for line in markdown.splitlines():
        m = re.match(r"### `(.+)\.yaml`", line)
        if m:
            current = tables.setdefault(m[1], {})
            continue
        m = re.match(r"\| `([^`]+)` \| (.*?) \| (.*) \|$", line)
        if m and current is not None:
            assert m[1] not in current, f"{m[1]} listed twice"
            current[m[1]] = (m[2], m[3])
    return tables


def test_reference_lists_every_config_key_with_its_default_and_a_meaning():
    markdown = config_reference().markdown()
    tables = reference_tables(markdown)
    files = {p.relative_to(CONF).with_suffix("").as_posix(): p for p in CONF.rglob("*.yaml")}
    assert set(tables) == set(files), "a config file without a table, or a table without a file"
    for name, path in files.items():
        keys, listed = leaf_keys(path), tables[name]
        assert set(listed) == set(keys), (
            f"{name}.yaml: keys not in the reference {sorted(set(keys) - set(listed))}, "
            f"listed but not in the file {sorted(set(listed) - set(keys))}"
        )
        for key, (default, meaning) in listed.items():
            assert meaning.strip(), f"{name}.yaml: {key} has no meaning: comment it in the file"
            shown = "???" if default == "required" else default.strip("`")
            assert yaml.safe_load(f"v: {shown}")["v"] == keys[key], f"{name}.yaml: {key} shown as {default}"
    for name, path in files.items():  # what each file builds is said
        target = (yaml.safe_load(path.read_text()) or {}).get("_target_")
        if target:
            assert f"Builds `{target}`." in markdown, name


def test_a_key_without_a_comment_is_listed_without_a_meaning(tmp_path, monkeypatch):
    """The check above can fail: a new key without a comment gives an empty meaning."""
    ref = config_reference()
    conf = tmp_path / "conf"
    shutil.copytree(CONF, conf)
    with open(conf / "trainer" / "default.yaml", "a") as f:
        f.write("new_key: 3\n")
    monkeypatch.setattr(ref, "CONF", conf)
    rows = reference_tables(ref.markdown())["trainer/default"]
    assert rows["trainer.new_key"] == ("`3`", "")


# ------------------------------------------------------------------------------ the site
def test_site_builds_strict_without_the_network(tmp_path):
    pytest.importorskip("mkdocs", reason="the docs extra is not installed (pip install -e '.[docs]')")
    pytest.importorskip("material", reason="mkdocs-material is not installed (the docs extra)")
    pytest.importorskip("mkdocstrings", reason="mkdocstrings is not installed (the docs extra)")
    site = tmp_path / "site"
    # Any HTTP(S) request would go to a closed local port and fail the build.
    dead = "http://127.0.0.1:9"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1", "HTTP_PROXY": dead, "HTTPS_PROXY": dead,
           "http_proxy": dead, "https_proxy": dead, "NO_PROXY": "", "no_proxy": ""}
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    config_page = (site / "reference" / "configuration" / "index.html").read_text()
    assert "sparsity.refresh_interval" in config_page and "trainer.max_steps" in config_page
    for results in (ROOT / "bench" / "results").glob("*.md"):  # served as they are
        assert (site / "benchmarks" / "results" / results.stem / "index.html").is_file(), results.name
    assert "TopKAST" in (site / "reference" / "api" / "index.html").read_text()


def test_readme_links_lead_somewhere():
    text = (ROOT / "README.md").read_text()
    targets = re.findall(r"\]\(([^)\s]+)\)", text)
    assert targets
    for target in targets:
        if re.match(r"[a-z]+://", target) or target.startswith("#"):
            continue
        assert (ROOT / target.split("#")[0]).exists(), f"README links to {target}, which does not exist"


# ------------------------------------------------------------------- Getting started, run
# Every command in a ```bash block of the page is run, in order, in one directory, as a new
# user would; training commands get fewer steps. Anything the test cannot run fails it.
SHORT = ["trainer.max_steps=10", "trainer.eval_every=null", "trainer.checkpoint_every=null",
         "trainer.log_every=5", "trainer.progress=false", "trainer.threads=1"]
SMALL_MNIST1D = ["dataset.num_samples=1000"]  # the default dataset, smaller


def page_commands(path: Path) -> list[str]:
    commands, inside = [], False
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            inside = line.strip() == "```bash"
            continue
        if inside and line.strip() and not line.lstrip().startswith("#"):
            commands.append(line.strip())
    return commands


def make_recipe(target: str) -> str:
    """The command a Makefile target runs (its one recipe line)."""
    lines = (ROOT / "Makefile").read_text().splitlines()
    start = next(i for i, l in enumerate(lines) if l.startswith(f"{target}:"))
    return lines[start + 1].strip()


def small_text(path: Path) -> None:
    """A few kilobytes of English, made here."""
    words = "the quick brown fox jumps over a lazy dog while seven wise owls watch from an old oak".split()
    lines = [" ".join(words[(i * 7 + j) % len(words)] for j in range(12)) + "." for i in range(400)]
    path.write_text("\n".join(lines) + "\n")


def tensorboard_serves(args: list[str], cwd: Path) -> dict:
    """Start the page's tensorboard command on a free local port; the scalar tags it serves."""
    command = [str(Path(sys.executable).parent / "tensorboard"), *args, "--port", "0", "--host", "127.0.0.1"]
    proc = subprocess.Popen(command, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        url = None
        deadline = time.time() + 120
        while url is None and time.time() < deadline:
            line = proc.stderr.readline()
            assert line or proc.poll() is None, "tensorboard exited"
            m = re.search(r"(http://127\.0\.0\.1:\d+)/", line)
            url = m[1] if m else None
        assert url, "tensorboard did not say where it serves"
        while time.time() < deadline:
            with urllib.request.urlopen(f"{url}/data/plugin/scalars/tags", timeout=10) as r:
                tags = json.load(r)
            if tags:
                return tags
            time.sleep(0.5)
        raise AssertionError("tensorboard served no runs")
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_getting_started_commands_run(tmp_path):
    commands = page_commands(DOCS / "getting-started.md")
    assert commands, "Getting started shows no command"
    small_text(tmp_path / "input.txt")
    for command in commands:
        args = shlex.split(command)
        if args == ["make", "run"]:
            assert make_recipe("run") == "$(BIN)/topkast train", "make run no longer runs topkast train"
            args = ["topkast", "train"]
        if args[0] == "tensorboard":
            tags = tensorboard_serves(args[1:], tmp_path)
            assert any("val/acc1" in run_tags for run_tags in tags.values()), tags
            continue
        assert args[0] == "topkast", f"Getting started shows a command the test cannot run: {command}"
        runs = sorted((tmp_path / "runs" / "train").glob("*"))
        args = [a.replace("<run>", runs[0].name) if runs else a for a in args[1:]]
        if args[0] in ("train", "sweep"):
            args += SHORT + ([] if any(a.startswith("dataset=") for a in args) else SMALL_MNIST1D)
        done = run_topkast(args, cwd=tmp_path, timeout=300)
        assert done.returncode == 0, f"{command}:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
    # What the page says they write is there.
    assert list((tmp_path / "runs" / "train").glob("*/checkpoints/best.eval.json"))
    assert list((tmp_path / "runs" / "sweep").glob("*/summary.md"))
