"""Sphinx configuration of the torch_mtlgrad documentation site.

Build (offline; every warning is an error)::

    python -m sphinx -W --keep-going -b html docs docs/_build/html

The pages are the Markdown files of ``docs/`` (MyST), the API pages come from the docstrings
(autodoc), and the methods table and the methods' own diagnostics are generated from the
registry at build time (:mod:`torch_mtlgrad.catalog`): a page holding a line
``{generated-methods-table}`` or ``{generated-method-diagnostics}`` gets the rendering there.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

project = "torch_mtlgrad"
author = "the torch_mtlgrad authors"
copyright = "the torch_mtlgrad authors"
release = version = "0.1.0"

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
]
source_suffix = {".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "**/.ipynb_checkpoints"]

# Offline: no intersphinx, no remote images; nothing is fetched.
myst_enable_extensions = ["colon_fence", "dollarmath"]
myst_heading_anchors = 4
autodoc_member_order = "bysource"
autodoc_typehints = "description"
# Members without their own docstring show none (not torch's, whose labels are not here).
autodoc_inherit_docstrings = False
autodoc_default_options = {"members": True, "show-inheritance": True}
napoleon_google_docstring = True
napoleon_numpy_docstring = False
html_theme = "alabaster"
html_title = "torch_mtlgrad"
html_static_path: list[str] = []


# -- Pages generated from the code at build time ------------------------------------------------

def _cli_help() -> str:
    import contextlib
    import io

    from torch_mtlgrad.__main__ import main

    out = []
    for argv in (["--help"], ["methods", "--help"], ["run", "--help"]):
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf), contextlib.suppress(SystemExit):
            main(argv)
        out.append(f"`python -m torch_mtlgrad {' '.join(argv)}`:\n\n```text\n{buf.getvalue()}```\n")
    return "\n".join(out)


def _method_api() -> str:
    from torch_mtlgrad import aggregators, catalog

    lines = ["```{eval-rst}"]
    for rec in [*catalog.records(), *catalog.suffix_records()]:
        cls = rec.cls.rsplit(".", 1)[1]
        public = f"torch_mtlgrad.aggregators.{cls}"
        target = public if getattr(aggregators, cls, None) is not None else rec.cls
        lines += [f".. autoclass:: {target}", "   :members:", ""]
    lines.append("```")
    return "\n".join(lines) + "\n"


def _generated() -> dict[str, object]:
    from torch_mtlgrad import catalog

    return {
        "<!-- generated: methods-table -->": catalog.render_markdown,
        "<!-- generated: method-diagnostics -->": catalog.render_diagnostics_markdown,
        "<!-- generated: method-api -->": _method_api,
        "<!-- generated: cli-help -->": _cli_help,
    }


def _fill(app, docname: str, source: list[str]) -> None:
    for marker, make in _generated().items():
        if marker in source[0]:
            source[0] = source[0].replace(marker, make())  # type: ignore[operator]


def setup(app) -> dict[str, bool]:
    app.connect("source-read", _fill)
    return {"parallel_read_safe": True}
