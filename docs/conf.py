"""Sphinx configuration of the sylva_ray documentation.

Built from Markdown (myst-parser) with the furo theme; the configuration, CLI and API references
are generated from the code at every build (``_ext/sylva_reference.py``, sphinx-argparse, autodoc),
so they cannot drift from it. The test suite builds the site with warnings as errors
(``tests/test_docs.py``); by hand: ``python -m sphinx -W -b html docs docs/_build/html``.
"""

from __future__ import annotations

import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
sys.path.insert(0, str(DOCS / "_ext"))

project = "sylva_ray"
author = "the sylva_ray developers"
copyright = "2026, the sylva_ray developers"  # noqa: A001 -- Sphinx's own setting name

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinxarg.ext",
    "sylva_reference",
    "sylva_diagrams",
]
source_suffix = {".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "examples", "README.md"]
myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 3
# A page missing from every toctree, a reference to nothing: errors under -W.
# Options, field names and quotes stay as typed: "--set" must not become an en dash.
smartquotes = False

autodoc_default_options = {"members": True, "undoc-members": False, "show-inheritance": True}
autodoc_typehints = "description"
autodoc_member_order = "bysource"

html_theme = "furo"
html_title = "sylva_ray"
html_static_path = ["_static"]
