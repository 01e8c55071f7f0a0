"""The package's shape: no import circle (its Hydra plugin included), one place that builds
a model, one owner of the masks, and a sparsity library that knows nothing of the trainer."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "topkast_cli"
# Hydra's launcher plugin: it uses the package; the package never imports it (Hydra's plugin
# scan finds it, in an editable install too: setup.cfg's package_dir).
PLUGIN = PACKAGE.parent / "hydra_plugins"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for top in (PACKAGE, PLUGIN) for p in top.rglob("*.py")}


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Package modules `name` imports, at any level (function-local imports too)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module or ""
            targets = [stem] + [f"{stem}.{a.name}" for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {name: imports(name, path, known) for name, path in mods.items()}


def find_cycle(g: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for m in sorted(g.get(n, ())):
            # A package's __init__ importing its own submodules is not a circle.
            if n.startswith(m + ".") or m.startswith(n + "."):
                continue
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state:
                found = visit(m)
                if found:
                    return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(g):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None


def test_the_graph_sees_imports():
    g = graph()
    assert "topkast_cli.launch" in g["topkast_cli.commands.train"]
    assert "topkast_cli.run" in g["topkast_cli.commands.train"]
    assert "topkast_cli.launch" in g["hydra_plugins.topkast_cli_launcher.slurm_ddp"]  # (inside a function)


def test_no_import_circle():
    assert find_cycle(graph()) is None, " -> ".join(find_cycle(graph()))


def test_the_package_does_not_import_its_plugin():
    """Not at all: not lazily, and not by a module name in a string (importlib)."""
    for name, path in modules().items():
        if name.startswith("topkast_cli"):
            assert "topkast_cli_launcher" not in path.read_text(), name


def test_a_circle_would_be_found():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_cli_only_dispatches_and_launch_knows_no_command():
    g = graph()
    assert not {m for m in g["topkast_cli.launch"] if m.startswith("topkast_cli.commands")}
    # cli dispatches by name: it imports the plumbing's error line and nothing of a command
    assert g["topkast_cli.cli"] <= {"topkast_cli", "topkast_cli.errors", "topkast_cli.launch"}, g["topkast_cli.cli"]


def test_the_sparsity_library_knows_nothing_of_the_trainer():
    g = graph()
    for name, deps in g.items():
        if name.startswith("topkast_cli.sparsity"):
            outside = {d for d in deps if not d.startswith("topkast_cli.sparsity")}
            assert outside <= {"topkast_cli.errors"}, (name, outside)


def test_the_model_constructor_is_called_in_one_place():
    calls = []
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and any(
                isinstance(a, ast.Attribute) and a.attr == "model" for a in node.args
            ) and getattr(node.func, "attr", getattr(node.func, "id", "")) == "instantiate":
                calls.append(name)
    assert calls == ["topkast_cli.run"], calls


def test_only_the_mask_owner_touches_the_compute_side_masks():
    users = {
        module_name(p)
        for p in PACKAGE.rglob("*.py")
        if "forward_mask" in p.read_text() or "backward_mask" in p.read_text()
    }
    # the owner, and its two compute sides (backends)
    compute_sides = {"topkast_cli.sparsity.masking", "topkast_cli.sparsity.sparse_linear"}
    assert users <= {"topkast_cli.sparsity.base", *compute_sides}, users
