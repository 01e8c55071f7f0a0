"""MkDocs hooks (mkdocs.yml `hooks:`): the pages that are built from the repository's own files
rather than written in docs/, so that they cannot drift from them.

- `bench/results/` (the benchmarks' results files and their plots) is served as
  `benchmarks/results/`: the files themselves, read where `python -m bench` writes them.
- The configuration reference's tables are generated from `topkast_cli/conf/`
  (`config_reference.py`) into `reference/configuration.md`, in place of its marker lines.

A hook rather than a plugin such as mkdocs-gen-files: a few lines, no extra dependency, and
the pages exist only in the built site (nothing generated is committed)."""

from __future__ import annotations

from pathlib import Path

import config_reference
from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
CONFIG_PAGE = "reference/configuration.md"
MARKERS = {
    "<!-- the group options are generated here -->": config_reference.groups_markdown,
    "<!-- the configuration tables are generated here -->": config_reference.markdown,
}


def on_files(files, config):
    for path in sorted(RESULTS.iterdir()):
        if path.suffix in (".md", ".png", ".csv"):
            files.append(File.generated(config, f"benchmarks/results/{path.name}", abs_src_path=str(path)))
    return files


def on_page_markdown(markdown, page, config, files):
    if page.file.src_uri == CONFIG_PAGE:
        for marker, generate in MARKERS.items():
            if marker not in markdown:
                raise ValueError(f"{CONFIG_PAGE} lost its marker line: {marker}")
            markdown = markdown.replace(marker, generate())
    return markdown
