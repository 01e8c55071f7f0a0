"""The configuration reference, generated from the config files in `topkast_cli/conf/` and
their comments: one table per config file (key, default, meaning). A key's meaning is the
comment on its line (and the comment lines indented under it); a file's first comment lines
describe the file. The tables have no other source, so they cannot drift from the configs;
`tests/test_docs.py` checks that every key of every file is listed with a meaning.

Run as a script to print the Markdown: `python docs/config_reference.py`."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

CONF = Path(__file__).resolve().parents[1] / "topkast_cli" / "conf"

# The commands' own configs, then the groups in the order `train.yaml` composes them.
COMMANDS = ("train", "eval", "export", "sweep")
GROUPS = ("optimizer", "scheduler", "trainer", "task", "model", "dataset", "sparsity", "experiment", "hydra/launcher")
# Not listed as keys: the defaults list (shown as what the file composes), `_target_` (shown
# as what it builds), `_partial_` (how it is built) and, outside conf/hydra/, the `hydra:`
# block (Hydra's help texts, logging and output directories; see the run directory's page).
HIDDEN = ("defaults", "_target_", "_partial_")

KEY = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z_][\w.]*):(?: +(?P<rest>.*))?$")


@dataclass
class Key:
    name: str  # as typed on the command line, e.g. sparsity.forward
    default: str  # the value as the file writes it
    meaning: str
    note: str = ""  # a section comment in the file before this key


@dataclass
class ConfigFile:
    name: str  # e.g. sparsity/topkast
    about: list[str] = field(default_factory=list)  # the header comment, line by line
    builds: str = ""
    composes: list[str] = field(default_factory=list)
    keys: list[Key] = field(default_factory=list)
    global_package: bool = False


def split_comment(text: str) -> tuple[str, str]:
    """(value, comment) of the text after `key:`; a `#` inside quotes is part of the value."""
    quote = None
    for i, ch in enumerate(text):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or text[i - 1] == " "):
            return text[:i].strip(), text[i + 1 :].strip()
    return text.strip(), ""


def parse(path: Path, name: str) -> ConfigFile:
    """The keys of one config file with their defaults and comments, read line by line."""
    lines = path.read_text().splitlines()
    out = ConfigFile(name)
    i = 0
    if lines and lines[0].startswith("# @package _global_"):
        out.global_package, i = True, 1
    while i < len(lines) and lines[i].startswith("#"):
        out.about.append(lines[i][1:])
        i += 1
    group = name.rpartition("/")[0]
    prefix = "" if out.global_package or not group else group.replace("/", ".") + "."
    stack: list[tuple[int, str]] = []  # (indent, key) of the mappings above this line
    last: Key | None = None  # the key whose comment a deeper comment-only line continues
    note: list[str] = []
    skip_deeper: int | None = None  # inside a block scalar or a list: lines deeper than this
    for line in lines[i:]:
        stripped = line.strip()
        indent = len(line) - len(line.lstrip(" "))
        if not stripped:
            last = None
            continue
        if skip_deeper is not None:
            if indent > skip_deeper or stripped.startswith("- "):
                continue
            skip_deeper = None
        if stripped.startswith("#"):
            if last is not None and indent > last_indent:
                last.meaning += " " + stripped[1:].strip()
            elif indent == 0 and stack == []:
                note.append(stripped[1:].strip())
            continue
        m = KEY.match(line)
        if not m:
            raise ValueError(f"{path}: cannot read line {line!r}")
        while stack and stack[-1][0] >= indent:
            stack.pop()
        key, (value, comment) = m["key"], split_comment(m["rest"] or "")
        parents = [k for _, k in stack]
        top = (parents or [key])[0]
        last = None
        if key == "defaults" and not parents:
            out.composes = [] if value else out.composes
            skip_deeper = indent
            continue
        if value in ("|", "|-", ">", ">-") or (not value and top == "hydra" and not name.startswith("hydra/")):
            skip_deeper = indent if value else None
            if not value:
                stack.append((indent, key))
            continue
        if top == "hydra" and not name.startswith("hydra/"):
            continue
        if not value:  # a mapping: its keys follow, deeper
            stack.append((indent, key))
            continue
        if key == "_target_" and not parents:
            out.builds = value
            continue
        if key in HIDDEN:
            continue
        last, last_indent = Key(prefix + ".".join([*parents, key]), value, comment, " ".join(note)), indent
        note = []
        out.keys.append(last)
    out.composes = defaults_list(lines)
    return out


def defaults_list(lines: list[str]) -> list[str]:
    """The entries of a file's top-level `defaults:` list, comments dropped."""
    entries, inside = [], False
    for line in lines:
        if line.startswith("defaults:"):
            inside = True
        elif inside and line.startswith("  - "):
            entries.append(split_comment(line[4:])[0])
        elif inside and line.strip() and not line.startswith(" "):
            break
    return entries


def config_files() -> list[ConfigFile]:
    """Every config file, commands first, then each group's options (its default first)."""
    default = default_options()
    found = [parse(CONF / f"{c}.yaml", c) for c in COMMANDS]
    for group in GROUPS:
        names = sorted(p.stem for p in (CONF / group).glob("*.yaml"))
        names.sort(key=lambda n: n != default.get(group))
        found += [parse(CONF / group / f"{n}.yaml", f"{group}/{n}") for n in names]
    return found


def default_options() -> dict[str, str]:
    """{group: option} of train.yaml's defaults list."""
    lines = (CONF / "train.yaml").read_text().splitlines()
    pairs = (entry.split(":", 1) for entry in defaults_list(lines) if ":" in entry)
    return {g.strip(): o.strip() for g, o in pairs}


def option_of(group: str, composes: list[str], default: dict[str, str]) -> str | None:
    """The option of `group` a global-package file runs with: its own `override /group: X`,
    else train.yaml's."""
    for entry in composes:
        m = re.match(rf"override /{group}(?:@\S+)?: *(\S+)", entry)
        if m:
            return m[1]
    return default.get(group)


def inherit_meanings(files: list[ConfigFile]) -> None:
    """A recipe or task file sets keys of other groups: a key it leaves uncommented takes the
    meaning of that key in the option it runs with, with a link to it."""
    by_name = {f.name: f for f in files}
    default = default_options()
    for f in files:
        if not f.global_package:
            continue
        for key in f.keys:
            if key.meaning:
                continue
            group = key.name.split(".", 1)[0]
            option = option_of(group, f.composes, default)
            source = by_name.get(f"{group}/{option}") or by_name["train"]
            found = next((k for k in source.keys if k.name == key.name), None)
            if found is not None and found.meaning:
                key.meaning = f"{found.meaning} (see [{source.name}](#{anchor(source.name)}))"


def anchor(name: str) -> str:
    return name.replace("/", "-")


def escape(text: str) -> str:
    """Comment text as literal Markdown (code spans kept): no HTML, emphasis or table cells."""
    parts = re.split(r"(`[^`]*`)", text)
    for i in range(0, len(parts), 2):
        p = parts[i].replace("\\", "\\\\").replace("<", "&lt;").replace(">", "&gt;")
        parts[i] = re.sub(r"([*_|\[\]])", r"\\\1", p)
    for i in range(1, len(parts), 2):
        parts[i] = parts[i].replace("|", "\\|")
    return "".join(parts)


def about_markdown(lines: list[str]) -> list[str]:
    """A header comment: prose paragraphs, and its indented lines (commands) as code."""
    out: list[str] = []
    para: list[str] = []
    code: list[str] = []

    def flush():
        if para:
            out.extend([escape(" ".join(para)), ""])
            para.clear()
        if code:
            out.extend(["```", *code, "```", ""])
            code.clear()

    for raw in lines:
        if raw.startswith("   ") and raw.strip():
            if para:
                flush()
            code.append(raw[3:])
        elif not raw.strip():
            flush()
        else:
            if code:
                flush()
            para.append(raw.strip())
    flush()
    return out


def file_markdown(f: ConfigFile, default: dict[str, str]) -> list[str]:
    group, _, option = f.name.rpartition("/")
    title = f"`{f.name}.yaml`"
    if group and default.get(group) == option:
        title += " (default)"
    out = [f"### {title} {{#{anchor(f.name)}}}", ""]
    if group and group not in ("experiment", "hydra/launcher"):
        out += [f"Chosen with `{group}={option}`.", ""]
    elif group == "experiment":
        out += [f"Chosen with `experiment={option}`.", ""]
    elif group:
        out += [f"Chosen with `hydra/launcher={option}`.", ""]
    out += about_markdown(f.about)
    facts = []
    if f.builds:
        facts.append(f"Builds `{f.builds}`.")
    if f.composes and f.name not in COMMANDS:
        facts.append("Composes: " + ", ".join(f"`{c}`" for c in f.composes) + ".")
    if facts:
        out += [" ".join(facts), ""]
    if not f.keys:
        out += ["No keys of its own.", ""]
        return out
    head = ["| key | default | meaning |", "|---|---|---|"]
    out += head
    for key in f.keys:
        if key.note:
            out += ["", escape(key.note), "", *head]
        default_text = "required" if key.default == "???" else f"`{key.default}`"
        out.append(f"| `{key.name}` | {default_text} | {escape_keep_links(key.meaning)} |")
    return out + [""]


def escape_keep_links(text: str) -> str:
    """`escape`, except a trailing link that `inherit_meanings` added."""
    m = re.search(r" \(see \[[^\]]+\]\(#[^)]+\)\)$", text)
    return escape(text[: m.start()]) + m[0] if m else escape(text)


def groups_markdown() -> str:
    """A table of the groups and their options, the default first, each linked to its table."""
    files = config_files()
    out = ["| group | options |", "|---|---|"]
    for group in GROUPS:
        names = [f.name for f in files if f.name.rpartition("/")[0] == group]
        links = ", ".join(f"[`{n.rpartition('/')[2]}`](#{anchor(n)})" for n in names)
        out.append(f"| `{group}` | {links} |")
    return "\n".join(out)


def markdown() -> str:
    """The whole generated reference: every config file's table."""
    files = config_files()
    inherit_meanings(files)
    default = default_options()
    out: list[str] = []
    seen_groups = set()
    for f in files:
        group = f.name.rpartition("/")[0]
        if f.name == "train":
            out += ["## Command configs", ""]
        if group and group not in seen_groups:
            seen_groups.add(group)
            out += [f"## `{group}`" + (f" (default `{default[group]}`)" if group in default else ""), ""]
        out += file_markdown(f, default)
    return "\n".join(out)


if __name__ == "__main__":
    print(markdown())
