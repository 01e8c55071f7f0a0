"""`transformers` is optional: without it `model=hf_causal_lm` is one line with the install hint
and exit 2, and nothing else imports it. These run whether or not it is installed (its
absence is simulated); the HF model itself is tested in test_hf_model.py."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import make_config
from test_language_model import write_text
from topkast_cli.errors import UserError
from topkast_cli.models.hf import INSTALL_HINT
from topkast_cli.run import check_run

HINT = "pip install 'topkast-cli[hf]'"


def hf_overrides(path) -> list[str]:
    return [
        "model=hf_causal_lm", "model.n_layer=2", "model.n_embd=32", "model.n_head=2",
        "dataset=textfile", f"dataset.path={path}", "dataset.context=32", "dataset.batch_size=8",
    ]


def test_without_transformers_the_builder_gives_the_install_hint(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` now fails
    with pytest.raises(UserError) as e:
        check_run(make_config(hf_overrides(write_text(tmp_path / "t.txt"))))
    assert str(e.value) == INSTALL_HINT and HINT in INSTALL_HINT


def test_without_transformers_the_console_is_one_line_and_exit_2(tmp_path):
    text = write_text(tmp_path / "t.txt")
    script = (
        "import sys; sys.modules['transformers'] = None\n"
        "from topkast_cli.cli import main\n"
        f"main(['train', *{hf_overrides(text)!r}, 'hydra.run.dir={tmp_path / 'run'}'])\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and HINT in lines[0] and "Traceback" not in proc.stderr, proc.stderr
    assert not (tmp_path / "run").exists()


def test_the_sparsity_library_and_the_commands_do_not_import_transformers():
    """Conv1D is recognised only once a model has loaded it (`layer_types`): importing and
    using the rest costs no `transformers` import."""
    script = (
        "import sys, torch\n"
        "import topkast_cli.commands.train, topkast_cli.commands.export, topkast_cli.flops\n"
        "from topkast_cli.sparsity.layer_types import sparse_layer_types\n"
        "from topkast_cli.sparsity import TopKAST\n"
        "TopKAST(0.5).attach(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)))\n"
        "assert len(sparse_layer_types()) == 4\n"
        "assert not any(m.startswith('transformers') for m in sys.modules), 'transformers was imported'\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
